"""``fedctl status``: how a running broker's run stands, as a table (``--watch``: refreshed in place) or JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from fedctl.api.status import status


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(s: dict[str, Any], endpoint: str) -> Group:
    """The status map as rich tables: the run, then its workers."""
    last = s.get("last_round") or {}
    run = Table(title=f"fedctl run {s['run_id']} at {endpoint}", show_header=False, title_justify="left")
    run.add_column("what", style="bold")
    run.add_column("value")
    state = "finished" if s["finished"] else "running"
    run.add_row("model / strategy / policy", f"{s['model']} / {s['strategy']} / {s['policy']}")
    run.add_row("round", f"{s['round']} of {s['rounds']} (model version {s['version']}; {state})")
    opened = s.get("open_round")
    if opened:
        run.add_row("open round", f"{opened['round']}: {opened['received']} of {opened['sampled']} updates, "
                                  f"{opened['seconds_left']:.0f} s to the deadline")
    run.add_row("workers", f"{s['workers_connected']} connected, {s['workers_waiting']} waiting for work")
    run.add_row("last round", f"accuracy {_num(last.get('test_accuracy'))}  loss {_num(last.get('test_loss'))}  "
                              f"{_num(last.get('duration_s'), '{:.2f} s')}  in {_mb(last.get('bytes_in'))}  "
                              f"out {_mb(last.get('bytes_out'))}")
    run.add_row("updates applied", str(s["applied_updates"]))
    refused = s.get("refused") or {}
    run.add_row("refused messages", ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "none")
    if s.get("dp_epsilon") is not None:
        run.add_row("privacy spent", f"ε = {s['dp_epsilon']:.3f}")
    parts: list[Any] = [run]
    transfers = s.get("transfers") or {}
    if transfers.get("inbound"):
        run.add_row("uploads", f"{transfers['inbound']} chunked push(es): {_mb(transfers['inbound_bytes'])} of "
                               f"{_mb(transfers['inbound_total_bytes'])}")
    if s.get("workers") is not None:
        shown = s["workers"]
        title = f"workers ({len(shown)} of {s.get('workers_total', len(shown))})"
        table = Table(title=title, title_justify="left")
        for column in ("worker", "state", "backend", "device", "address", "last heard", "rounds done",
                       "in / out", "staleness", "rtt", "link"):
            table.add_column(column)
        for w in shown:
            link = "-" if w.get("link_bps") is None else f"{w['link_bps'] * 8 / 1e6:.1f} Mbit/s"
            state = w.get("state") or ("waiting" if w["waiting"] else "busy")
            table.add_row(w["worker"], state, w["backend"], w.get("device") or "-", w.get("address") or "-",
                          f"{w['silent_s']:.1f} s ago", _num(w.get("updates"), "{}"),
                          f"{_mb(w.get('bytes_in'))} / {_mb(w.get('bytes_out'))}", _num(w.get("staleness"), "{}"),
                          "-" if w.get("rtt_s") is None else f"{w['rtt_s'] * 1e3:.1f} ms", link)
        parts.append(table)
    events = s.get("events") or []
    if events:
        log = Table(title=f"recent events (last {len(events)})", title_justify="left")
        for column in ("ago", "event", "what"):
            log.add_column(column)
        for e in reversed(events):
            count = f" (×{e['count']})" if e.get("count", 1) > 1 else ""
            log.add_row(f"{e['age_s']:.0f} s", e["kind"], f"{e['text']}{count}")
        parts.append(log)
    return Group(*parts)


@click.command("status")
@click.option("--connect", required=True, help="The broker's endpoint, as workers connect to it (tcp://HOST:PORT).")
@click.option("--server-key", default=None,
              help="The broker's public key (Z85 text or its NAME.key file), when it uses CURVE.")
@click.option("--secret-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A key pair the broker admits (NAME.key_secret, its public key in --allowed-keys).")
@click.option("--watch", is_flag=True, default=False, help="Refresh in place every --interval seconds (Ctrl-C ends).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the broker's status map as JSON.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for the broker's answer.")
def status_cmd(connect: str, server_key: str | None, secret_key: Path | None, watch: bool, interval: float,
               as_json: bool, timeout: float) -> None:
    """Ask a running broker how its run stands: round, model, workers, bytes, refusals (read-only)."""
    def ask() -> dict[str, Any]:
        return status(connect, server_key=server_key, secret_key=secret_key, timeout=timeout)

    if as_json and not watch:
        click.echo(json.dumps(ask(), indent=2, sort_keys=True))
        return
    console = Console()
    if not watch:
        console.print(render(ask(), connect))
        return
    with Live(render(ask(), connect), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            time.sleep(interval)
            current = ask()
            live.update(json.dumps(current, sort_keys=True) if as_json else render(current, connect))

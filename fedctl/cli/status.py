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


# The workers table's columns, most important first: a narrow terminal keeps the first ones whole and drops the
# rest (the whole map is in --json) rather than squeezing every column into an ellipsis.
_WORKER_COLUMNS = ("worker", "state", "last heard", "rounds done", "staleness", "in / out", "rtt", "backend",
                   "device", "address", "link")


def _worker_cells(w: dict[str, Any]) -> dict[str, str]:
    return {
        "worker": w["worker"],
        "state": w.get("state") or ("waiting" if w["waiting"] else "busy"),
        "last heard": f"{w['silent_s']:.1f} s ago",
        "rounds done": _num(w.get("updates"), "{}"),
        "staleness": _num(w.get("staleness"), "{}"),
        "in / out": f"{_mb(w.get('bytes_in'))} / {_mb(w.get('bytes_out'))}",
        "rtt": "-" if w.get("rtt_s") is None else f"{w['rtt_s'] * 1e3:.1f} ms",
        "backend": w["backend"],
        "device": w.get("device") or "-",
        "address": w.get("address") or "-",
        "link": "-" if w.get("link_bps") is None else f"{w['link_bps'] * 8 / 1e6:.1f} Mbit/s",
    }


def _workers_table(s: dict[str, Any], width: int | None) -> Table:
    """The workers table, with as many columns (in ``_WORKER_COLUMNS`` order of importance) as ``width`` holds."""
    rows = [_worker_cells(w) for w in s["workers"]]
    chosen: list[str] = []
    used = 1                                                  # the table's left border
    for column in _WORKER_COLUMNS:
        need = max([len(column)] + [len(row[column]) for row in rows]) + 3   # padding and a border
        if width is not None and chosen and used + need > width:
            continue
        chosen.append(column)
        used += need
    dropped = len(_WORKER_COLUMNS) - len(chosen)
    title = f"workers ({len(rows)} of {s.get('workers_total', len(rows))}"
    title += f"; {dropped} more columns in a wider terminal or --json)" if dropped else ")"
    table = Table(title=title, title_justify="left")
    for column in chosen:
        table.add_column(column, no_wrap=column in ("worker", "state"))
    for row in rows:
        table.add_row(*(row[column] for column in chosen))
    return table


def render(s: dict[str, Any], endpoint: str, width: int | None = None) -> Group:
    """The status map as rich tables: the run, then its workers (columns fitted to ``width`` when given)."""
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
        parts.append(_workers_table(s, width))
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
        console.print(render(ask(), connect, console.width))
        return
    with Live(render(ask(), connect, console.width), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            time.sleep(interval)
            current = ask()
            live.update(json.dumps(current, sort_keys=True) if as_json else render(current, connect, console.width))

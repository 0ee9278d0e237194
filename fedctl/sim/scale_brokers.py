"""``fedctl bench scale --edges …``: one broker against a root with edge brokers, at 1,000 to 10,000 connected
no-op workers, every broker and worker group its own process over TCP loopback.

A cell is (K connected workers, model, E edges; E = 0 is flat). Flat: one ``fedctl serve`` with C = S/K and
``--min-workers K`` (every round samples S of all K; the quorum is S). Two levels: a root with C = 1 over E
``fedctl serve --upstream`` edges, each with C = (S/E)/(K/E) of its K/E workers; the same S train per round.
Workers are the real :class:`~fedctl.worker.client.Worker` with a no-op trainer (:mod:`fedctl.sim.noop_worker`), up to
:data:`PER_PROCESS` per process. Every broker exposes ``--metrics-bind``; measured, per level:

* round time: the median ``duration_s`` of the root's rounds after the first;
* broker CPU seconds per round and peak RSS (``/proc/PID/stat``, ``VmHWM``), sampled until the broker exits;
* heartbeat round trips: the p99 of the root's (and the edges') ``fedctl_heartbeat_rtt_seconds`` histogram, scraped
  just before the run ends (upper bound of the bucket holding the 99th percentile);
* bytes per link: the root's and each edge's bytes in and out per round, from their metrics.jsonl.

Heartbeats go every max(2, N/1000) seconds at a broker with N direct workers (:func:`heartbeat_s`; liveness six
of them, at least a minute): 10,000 workers at 2 s would be 5,000 heartbeats a second into one broker on a 2-core
machine that also runs the 10,000 workers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl.errors import FedctlError
from fedctl.sim.round_bench import cpu_split, free_port, peak_rss_mb

PER_PROCESS = 1000
HEARTBEAT_S = 2.0
"""Heartbeat interval per 1,000 workers a broker serves, at least this: 10 s at 10,000 (2 s would be 10,000
messages a second into one broker, on a 2-core machine that also runs the 10,000 workers)."""
LIVENESS_S = 60.0
SAMPLE_S = 0.5


@dataclass(frozen=True)
class Cell:
    workers: int
    model: str
    edges: int
    sampled: int = 100
    rounds: int = 5

    @property
    def name(self) -> str:
        return f"{self.model}-k{self.workers}-e{self.edges}"


@dataclass
class Broker:
    """A ``fedctl serve`` process of the benchmark and what was measured of it."""

    role: str
    popen: subprocess.Popen[bytes]
    state: Path
    metrics_url: str
    cpu_s: float = 0.0
    cpu_at_first_round: float | None = None
    """CPU seconds when the root's first round was in: start-up (imports, joins) is left out of the per-round
    figure, as the first round is out of the median."""
    peak_mb: float = 0.0
    scrape: str = ""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FEDCTL_PLAIN_LOGS": "1", "PYTHONUNBUFFERED": "1"}


def heartbeat_s(workers: int) -> float:
    """The heartbeat interval of a broker with ``workers`` direct workers (see :data:`HEARTBEAT_S`)."""
    return max(HEARTBEAT_S, workers / 1000)


def _serve(role: str, state: Path, log: Path, direct: int, *args: str) -> Broker:
    port = free_port()
    beat = heartbeat_s(direct)
    cmd = [sys.executable, "-m", "fedctl", "serve", "--state-dir", str(state), "--heartbeat-interval",
           f"{beat:g}", "--liveness", f"{max(LIVENESS_S, 6 * beat):g}", "--round-timeout", "600", "--metrics-bind",
           f"127.0.0.1:{port}", *args]
    with open(log, "wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), stdin=subprocess.DEVNULL)
    return Broker(role, popen, state, f"http://127.0.0.1:{port}/metrics")


def _hosts(endpoint: str, prefix: str, count: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for p in range(math.ceil(count / PER_PROCESS)):
        n = min(PER_PROCESS, count - p * PER_PROCESS)
        with open(logs / f"{prefix}-{p}.log", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "fedctl.sim.noop_worker", endpoint,
                                           f"{prefix}-{p}", str(n)], stdout=out, stderr=subprocess.STDOUT,
                                          env=_env(), stdin=subprocess.DEVNULL))
    return procs


def _sample(b: Broker) -> None:
    if b.popen.poll() is not None:
        return
    user, system = cpu_split(b.popen.pid)
    b.cpu_s = max(b.cpu_s, user + system)
    b.peak_mb = max(b.peak_mb, peak_rss_mb(b.popen.pid))
    try:
        with urllib.request.urlopen(b.metrics_url, timeout=2) as r:
            b.scrape = r.read().decode()
    except OSError:
        pass


def _p99(exposition: str, name: str = "fedctl_heartbeat_rtt_seconds") -> float | None:
    """The upper bound of the bucket holding the 99th percentile of histogram ``name``."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = []
    for family in text_string_to_metric_families(exposition):
        if family.name == name:
            buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket"))
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= 0.99 * total)


def _records(state: Path) -> list[dict[str, Any]]:
    path = state / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def run_cell(cell: Cell, root_dir: Path, say: Any = print) -> dict[str, Any]:
    """Run one cell to the end and return its row."""
    import shutil

    work = root_dir / cell.name
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    per_edge = cell.workers // cell.edges if cell.edges else cell.workers
    flat_c = cell.sampled / cell.workers
    root = _serve("root", work / "root", logs / "root.log", cell.edges or cell.workers, "--bind", "tcp://127.0.0.1:*",
                  "--model", cell.model,
                  "--rounds", str(cell.rounds), "--fraction", f"{1.0 if cell.edges else flat_c:.6g}",
                  "--min-workers", str(cell.edges or cell.workers))  # (every round samples from everyone)
    endpoint = _endpoint(root, logs / "root.log")
    brokers, hosts = [root], []
    if cell.edges:
        for e in range(cell.edges):
            port = free_port()
            brokers.append(_serve(f"edge{e}", work / f"edge{e}", logs / f"edge{e}.log", per_edge, "--bind",
                                  f"tcp://127.0.0.1:{port}", "--upstream", endpoint, "--edge-id", f"edge{e}",
                                  "--model", cell.model, "--min-workers", str(per_edge), "--fraction",
                                  f"{(cell.sampled / cell.edges) / per_edge:.6g}"))
            hosts += _hosts(f"tcp://127.0.0.1:{port}", f"e{e}", per_edge, logs)
    else:
        hosts += _hosts(endpoint, "w", cell.workers, logs)
    say(f"{cell.name}: {len(brokers)} broker(s), {len(hosts)} worker processes")
    started = time.monotonic()
    try:
        while root.popen.poll() is None:
            first_in = bool(_records(root.state))
            for b in brokers:
                _sample(b)
                if first_in and b.cpu_at_first_round is None:
                    b.cpu_at_first_round = b.cpu_s
            dead = [h for h in hosts if h.poll() not in (None, 0)]
            if dead:
                raise FedctlError(f"{cell.name}: a worker process exited {dead[0].returncode}", f"see {logs}")
            if time.monotonic() - started > 3600:
                raise FedctlError(f"{cell.name} did not finish within an hour", f"see {logs}")
            time.sleep(SAMPLE_S)
        for b in brokers:
            b.popen.wait(timeout=120)
        for h in hosts:
            h.wait(timeout=120)
    finally:
        for p in [*(b.popen for b in brokers), *hosts]:
            if p.poll() is None:
                p.kill()
                p.wait()
    if root.popen.returncode != 0:
        raise FedctlError(f"{cell.name}: the root exited {root.popen.returncode}", f"see {logs / 'root.log'}")
    return _row(cell, brokers, time.monotonic() - started)


def _endpoint(b: Broker, log: Path, timeout: float = 120.0) -> str:
    import re

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"broker on (tcp://\S+?:\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if b.popen.poll() is not None:
            raise FedctlError(f"the root broker exited before listening: {log.read_text()[-500:]}", f"see {log}")
        time.sleep(0.1)
    raise FedctlError("the root broker did not listen within two minutes", f"see {log}")


def _row(cell: Cell, brokers: list[Broker], wall: float) -> dict[str, Any]:
    root, edges = brokers[0], brokers[1:]
    records = _records(root.state)
    later = sorted(r["duration_s"] for r in records[1:]) or [r["duration_s"] for r in records]
    rounds = max(len(records) - 1, 1)  # (CPU counted from the first round's end)
    edge_records = [_records(e.state) for e in edges]

    def cpu(b: Broker) -> float:
        return b.cpu_s - (b.cpu_at_first_round or 0.0)

    def per_round(rs: list[dict[str, Any]], key: str) -> float:
        return sum(r.get(key, 0) for r in rs) / max(len(rs), 1)

    return {
        "cell": cell.name, "workers": cell.workers, "model": cell.model, "edges": cell.edges,
        "sampled": cell.sampled, "rounds": len(records), "wall_s": round(wall, 1),
        "round_s_median": later[len(later) // 2] if later else None,
        "root": {"cpu_s_per_round": round(cpu(root) / rounds, 3), "peak_rss_mb": round(root.peak_mb, 1),
                 "heartbeat_p99_s": _p99(root.scrape), "bytes_in_per_round": per_round(records, "bytes_in"),
                 "bytes_out_per_round": per_round(records, "bytes_out"),
                 "participants": [r["participants"] for r in records]},
        "edge": None if not edges else {
            "cpu_s_per_round_max": round(max(cpu(e) for e in edges) / rounds, 3),
            "peak_rss_mb_max": round(max(e.peak_mb for e in edges), 1),
            "heartbeat_p99_s_max": max((p for p in (_p99(e.scrape) for e in edges) if p is not None), default=None),
            "bytes_in_per_round_mean": sum(per_round(rs, "bytes_in") for rs in edge_records) / len(edges),
            "bytes_out_per_round_mean": sum(per_round(rs, "bytes_out") for rs in edge_records) / len(edges)},
    }


def write_report(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """scale_brokers.{json,md,png} in ``out``: one row per cell, flat and two-level side by side."""
    from fedctl.fsio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scale_brokers.json", lambda fh: fh.write(json.dumps({"results": rows}, indent=1).encode()))

    def mb(v: float | None) -> str:
        return "–" if v is None else f"{v / 1e6:.1f}"

    def ms(v: float | None) -> str:
        from fedctl.observe.collector import RTT_SECONDS_BUCKETS

        if v is None:
            return "–"
        return f"> {RTT_SECONDS_BUCKETS[-1] * 1000:.0f}" if math.isinf(v) else f"≤ {v * 1000:.0f}"

    lines = ["# Scale: one broker against a root with edge brokers", "",
             f"No-op workers ({PER_PROCESS} per process); heartbeats every max({HEARTBEAT_S:g}, N/1000) s at a "
             "broker with N direct workers; S workers train per round "
             "(flat: C = S/K; two levels: the root takes every edge, each edge S/E of its K/E). CPU and RSS per "
             "broker process; edge figures are the largest edge's (bytes: the mean edge's).", "",
             "| K | model | edges | round s (median) | root CPU s/round | root peak RSS MiB | root heartbeat p99 ms "
             "| root MB in / out per round | edge CPU s/round | edge peak RSS MiB | edge heartbeat p99 ms "
             "| edge MB in / out per round |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        root, edge = r["root"], r.get("edge") or {}
        lines.append(
            f"| {r['workers']:,} | {r['model']} | {r['edges'] or 'flat'} | {r['round_s_median']:.3f} | "
            f"{root['cpu_s_per_round']:.2f} | {root['peak_rss_mb']:.0f} | {ms(root['heartbeat_p99_s'])} | "
            f"{mb(root['bytes_in_per_round'])} / {mb(root['bytes_out_per_round'])} | "
            + (" – | – | – | – |" if not edge else
               f"{edge['cpu_s_per_round_max']:.2f} | {edge['peak_rss_mb_max']:.0f} | "
               f"{ms(edge['heartbeat_p99_s_max'])} | {mb(edge['bytes_in_per_round_mean'])} / "
               f"{mb(edge['bytes_out_per_round_mean'])} |"))
    atomic_write(out / "scale_brokers.md", lambda fh: fh.write("\n".join(lines + [""]).encode()))
    _plot(rows, out / "scale_brokers.png")
    return {"json": out / "scale_brokers.json", "markdown": out / "scale_brokers.md", "png": out / "scale_brokers.png"}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for model in sorted({r["model"] for r in rows}):
        for edges in sorted({r["edges"] for r in rows}):
            mine = sorted((r for r in rows if r["model"] == model and r["edges"] == edges), key=lambda r: r["workers"])
            if not mine:
                continue
            label = f"{model}, {'flat' if not edges else f'{edges} edges'}"
            ks = [r["workers"] for r in mine]
            axes[0].plot(ks, [r["round_s_median"] for r in mine], marker="o", label=label)
            axes[1].plot(ks, [r["root"]["cpu_s_per_round"] for r in mine], marker="o", label=label)
            axes[2].plot(ks, [r["root"]["bytes_in_per_round"] / 1e6 for r in mine], marker="o", label=label)
    for ax, title in zip(axes, ("round time (s)", "root broker CPU s per round", "root inbound MB per round")):
        ax.set_xscale("log")
        ax.set_xlabel("connected workers")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)

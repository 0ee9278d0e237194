#!/usr/bin/env python3
"""A 1 GB model and update across a rate-limited link, in chunks (issue: large models and slow links).

One `fedctl serve --model wide1g` (16 dense 4096x4096 layers, 1.07 GB of float32) in the root namespace, one worker
in a network namespace behind a veth pair rate-limited by ``tbf`` (100 Mbit/s by default) whose trainer returns
the weights at once. The worker pulls the model (chunks, paced by its credits), pushes its update (chunks, paced
by the broker's credits), and the round is aggregated. Measured: transfer times and throughput, the broker's peak
RSS (from /proc), and the round-trip of the worker's heartbeats throughout.

Needs root (network namespaces). Writes OUT/big_update.json and OUT/big_update.md.

    sudo .venv/bin/python scripts/big_update.py [--rate-mbit 100] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedctl.models import get_model  # noqa: E402
from fedctl.testing.wan import LinkConfig, netns_unavailable, wan_link  # noqa: E402
from fedctl.wire import constants as C  # noqa: E402

log = logging.getLogger("big_update")


# ------------------------------------------------------------------------------------------------ the worker
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _worker(endpoint: str, report: Path) -> None:
    import zmq.asyncio

    from fedctl.testing.trainers import NoOpTrainer
    from fedctl.worker.client import Worker, WorkerConfig

    lines = _Lines()
    logging.getLogger("fedctl").addHandler(lines)
    logging.getLogger("fedctl").setLevel(logging.INFO)
    ctx = zmq.asyncio.Context()
    worker = Worker(WorkerConfig(endpoint, "far-away", "noop", 600, connect_timeout_s=120.0), NoOpTrainer, ctx=ctx)
    beats: list[tuple[float, float]] = []
    started = time.time()

    async def watch() -> None:
        """The broker's echo of each heartbeat: RTT = now - the send time it carries."""
        while True:
            conn = worker.conn
            if conn is None:
                await asyncio.sleep(0.05)
                continue
            msg = await conn.inbox.get()
            if msg.type == C.HEARTBEAT and isinstance(msg.get("t"), float):
                beats.append((time.time() - started, time.time() - msg["t"]))

    watcher = asyncio.ensure_future(watch())
    try:
        summary = await worker.serve()
    finally:
        watcher.cancel()
        ctx.destroy(linger=0)
    report.write_text(json.dumps({"summary": summary, "beats": beats, "log": lines.lines}))


# ------------------------------------------------------------------------------------------------ the driver
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of ``pid`` in MiB, from /proc/PID/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    get = {k: float(v) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}
    return get.get("VmRSS", 0.0), get.get("VmHWM", 0.0)


def _seconds(lines: list[str], pattern: str) -> float | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return float(m.group(1))
    return None


def run(rate_mbit: float, out: Path, timeout_s: float) -> dict[str, Any]:
    spec = get_model("wide1g")
    config = LinkConfig(rate_kbit=rate_mbit * 1000, burst_bytes=256 * 1024, queue_ms=100.0)
    with tempfile.TemporaryDirectory(prefix="fedctl-big-") as tmp, wan_link(config) as link:
        work = Path(tmp)
        port = _free_port(link.host_addr)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        serve = [sys.executable, "-m", "fedctl", "serve", "--model", "wide1g", "--strategy", "fedavg", "--rounds",
                 "1", "--min-workers", "1", "--fraction", "1", "--round-timeout", str(timeout_s), "--bind",
                 f"tcp://{link.host_addr}:{port}", "--insecure", "--state-dir", str(work / "state"),
                 "--liveness", "30", "--history-mb", "0"]
        broker = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        broker_log: list[str] = []
        threading.Thread(target=lambda: broker_log.extend(broker.stdout or []), daemon=True).start()
        samples: list[tuple[float, float]] = []
        peak = 0.0
        started = time.time()
        report = work / "worker.json"
        worker = subprocess.Popen([*link.exec_prefix(), sys.executable, str(Path(__file__).resolve()), "--worker",
                                   "--connect", f"tcp://{link.host_addr}:{port}", "--report", str(report)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        worker_log: list[str] = []
        threading.Thread(target=lambda: worker_log.extend(worker.stdout or []), daemon=True).start()
        try:
            while broker.poll() is None and time.time() - started < timeout_s:
                try:
                    rss, hwm = _rss_mb(broker.pid)
                except OSError:
                    break
                samples.append((round(time.time() - started, 2), round(rss, 1)))
                peak = max(peak, hwm)
                time.sleep(0.25)
            broker.wait(timeout=30)
            worker.wait(timeout=60)
        finally:
            for proc in (broker, worker):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
        if not report.is_file():
            raise SystemExit("the worker wrote no report:\n" + "".join(worker_log[-30:]) + "".join(broker_log[-30:]))
        data = json.loads(report.read_text())
    rtts = np.array([rtt for _, rtt in data["beats"]]) * 1000
    down_s = _seconds(data["log"], r"received the model .* in [0-9]+ chunks in ([0-9.]+) s")
    up_s = _seconds(data["log"], r"pushed [0-9.]+ MB in [0-9]+ chunks in ([0-9.]+) s")
    result = {
        "format": "fedctl-big-update/1", "command": "sudo .venv/bin/python scripts/big_update.py "
                                                    f"--rate-mbit {rate_mbit:g}",
        "link_mbit_per_s": rate_mbit, "model": spec.name, "model_bytes": spec.nbytes,
        "download_s": down_s, "upload_s": up_s,
        "download_mbit_per_s": spec.nbytes * 8 / 1e6 / down_s if down_s else None,
        "upload_mbit_per_s": spec.nbytes * 8 / 1e6 / up_s if up_s else None,
        "broker_peak_rss_mib": round(peak, 1), "broker_rss_timeline": samples,
        "heartbeats": len(rtts), "heartbeat_rtt_ms_p50": float(np.percentile(rtts, 50)) if rtts.size else None,
        "heartbeat_rtt_ms_p99": float(np.percentile(rtts, 99)) if rtts.size else None,
        "heartbeat_rtt_ms_max": float(rtts.max()) if rtts.size else None, "beats": data["beats"],
        "run": data["summary"], "broker_exit": broker.returncode, "worker_exit": worker.returncode,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "big_update.json").write_text(json.dumps(result, indent=1))
    (out / "big_update.md").write_text(markdown(result))
    _plot(result, out / "big_update.png")
    return result


def markdown(r: dict[str, Any]) -> str:
    return (
        "# A 1 GB model and update over a rate-limited link, in chunks\n\n"
        f"`{r['command']}`: `fedctl serve --model {r['model']}` ({r['model_bytes'] / 1e9:.2f} GB of float32) in the "
        f"root namespace, one worker in a network namespace behind a veth pair limited by `tbf` to "
        f"{r['link_mbit_per_s']:g} Mbit/s each way; its trainer returns the weights at once (FedAvg, 1 round).\n\n"
        "| transfer | seconds | Mbit/s |\n|---|---:|---:|\n"
        f"| model, broker → worker ({r['model_bytes'] / 1e9:.2f} GB) | {r['download_s']:.1f} | "
        f"{r['download_mbit_per_s']:.1f} |\n"
        f"| update, worker → broker ({r['model_bytes'] / 1e9:.2f} GB) | {r['upload_s']:.1f} | "
        f"{r['upload_mbit_per_s']:.1f} |\n\n"
        f"Broker peak RSS: **{r['broker_peak_rss_mib']:.0f} MiB** (VmHWM of the `fedctl serve` process; the model "
        f"alone is {r['model_bytes'] / 2**20:.0f} MiB). Worker heartbeats answered during the run: "
        f"{r['heartbeats']}, round-trip p50 {r['heartbeat_rtt_ms_p50']:.0f} ms, p99 {r['heartbeat_rtt_ms_p99']:.0f} "
        f"ms, max {r['heartbeat_rtt_ms_max']:.0f} ms. Exit codes: broker {r['broker_exit']}, worker "
        f"{r['worker_exit']}.\n")


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    t, rss = zip(*r["broker_rss_timeline"]) if r["broker_rss_timeline"] else ((), ())
    ax1.plot(t, rss)
    ax1.set_ylabel("broker RSS (MiB)")
    ax1.axhline(3 * 1024, color="red", linestyle="--", linewidth=0.8, label="3 GiB")
    ax1.legend()
    if r["beats"]:
        bt, rtt = zip(*r["beats"])
        ax2.plot(bt, np.array(rtt) * 1000, ".", markersize=3)
    ax2.set_ylabel("heartbeat RTT (ms)")
    ax2.set_xlabel("seconds since start")
    fig.suptitle(f"{r['model_bytes'] / 1e9:.2f} GB model and update over {r['link_mbit_per_s']:g} Mbit/s, in chunks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        asyncio.run(_worker(args.connect, args.report))
        return 0
    why = netns_unavailable()
    if why:
        print(f"cannot emulate the link here: {why}", file=sys.stderr)
        return 2
    r = run(args.rate_mbit, args.out, args.timeout)
    print(markdown(r))
    return 0 if r["broker_exit"] == 0 and r["worker_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

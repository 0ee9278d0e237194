"""`fedctl bench round`: the cost of one round in the deployment shape — the broker as `fedctl serve`, every worker
its own OS process — side by side with Flower 1.42's gRPC server and clients doing the same work in the same run.

Workload (both systems): dense FedAvg, all N workers every round, each worker's "training" returns w + fixed small
noise for 600 examples, no evaluation, ``rounds`` rounds of which round 1 (connections, first allocations) is left
out. Per cell it measures, between the end of round 1 and the end of the last round:

* s/round, from the server's own round-end timestamps (fedctl: ``elapsed_s`` in metrics.jsonl; Flower: the
  strategy's ``aggregate_fit``);
* the server's CPU seconds per round and its peak RSS (``/proc/PID/stat``, ``VmHWM``), the workers' CPU per round
  each and their mean peak RSS;
* bytes on the wire: loopback bytes per round (``/proc/net/dev``, TCP/IP headers included, both systems) and, for
  fedctl, the broker's own count of model and update bytes against the raw float32 payload (2 · N · model).

Flower runs from its own virtual environment (``flwr==1.42.0`` from PyPI), never a dependency of fedctl.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedctl.errors import ConfigError, FedctlError
from fedctl.models import get_model

FLOWER = "flwr==1.42.0"
PEER = Path(__file__).with_name("flower_peer.py")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RoundBench:
    workers: tuple[int, ...] = (10, 50, 100)
    models: tuple[str, ...] = ("mlp", "wide5m")
    rounds: int = 20
    processes: int | None = None
    """Worker processes (None: one per worker). Fewer puts several workers on one event loop per process."""
    flower: bool = True
    serve_args: tuple[str, ...] = ()
    """Extra `fedctl serve` options (e.g. --history-mb 0); none: the defaults."""
    timeout_s: float = 900.0
    scrape_every_s: float | None = None
    """Serve Prometheus metrics and the dashboard (`--metrics-bind`) during fedctl cells, scrape /metrics this often
    and keep the dashboard's event stream open (None: off)."""

    def __post_init__(self) -> None:
        for m in self.models:
            get_model(m)
        if self.rounds < 3:
            raise ConfigError(f"--rounds must be at least 3 (round 1 is left out), got {self.rounds}")
        if not self.workers or min(self.workers) < 1:
            raise ConfigError("--workers needs positive worker counts", "e.g. --workers 10,50,100")
        if self.processes is not None and self.processes < 1:
            raise ConfigError(f"--processes must be at least 1, got {self.processes}")


# ---------------------------------------------------------------------------------------------- /proc readers
def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def loopback_bytes() -> int:
    """Bytes sent on the loopback interface since boot (each byte once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- Flower's venv
def ensure_flower(venv: Path, say: Callable[[str], None]) -> Path:
    """The Python of a virtual environment holding Flower 1.42 (made, and Flower installed from PyPI, on first use).

    Raises
    ------
    FedctlError
        When the environment cannot be made or Flower cannot be installed (no network, no PyPI).
    """
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import flwr, sys; sys.exit(flwr.__version__ != '1.42.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    say(f"installing {FLOWER} into {venv} (once; fedctl itself never depends on it)")
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", FLOWER]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise FedctlError(f"could not install {FLOWER} into {venv}: {last}",
                              "check that --flower-venv is writable and pip can reach PyPI, or pass --no-flower to "
                              "measure fedctl alone")
    return python


# ---------------------------------------------------------------------------------------------- /metrics
class Scraper(threading.Thread):
    """GET ``url`` every ``every_s`` seconds, as a Prometheus server would, until stopped; counts what it got."""

    def __init__(self, url: str, every_s: float) -> None:
        super().__init__(daemon=True, name="scraper")
        self.url, self.every_s = url, every_s
        self.latencies: list[float] = []
        self.failures = 0
        """Failed scrapes between two that succeeded (not those before the listener is up or after it closed)."""
        self._stop_event = threading.Event()

    def run(self) -> None:
        pending = 0
        while not self._stop_event.wait(self.every_s):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as reply:
                    reply.read()
            except (OSError, ValueError):
                pending += 1 if self.latencies else 0
                continue
            self.latencies.append(time.perf_counter() - started)
            self.failures, pending = self.failures + pending, 0

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def figures(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {"scrapes": len(lat), "scrape_failures": self.failures,
                "scrape_ms_median": 1e3 * statistics.median(lat) if lat else None,
                "scrape_ms_max": 1e3 * lat[-1] if lat else None}


class Viewer(threading.Thread):
    """Holds the dashboard's event stream (``/api/stream``) open and reads it, as an open browser tab does; counts
    the updates it got."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="dashboard viewer")
        self.url = url
        self.updates = 0
        self.bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as reply:
                    for line in reply:
                        if self._stop_event.is_set():
                            return
                        if line.startswith(b"data: "):
                            self.updates += 1
                            self.bytes += len(line)
            except (OSError, ValueError):
                self._stop_event.wait(0.5)  # (not up yet, or gone: as a browser's EventSource, try again)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def figures(self) -> dict[str, Any]:
        return {"dashboard_updates": self.updates, "dashboard_bytes": self.bytes}


# ---------------------------------------------------------------------------------------------- one cell
@dataclass
class Watch:
    """Round-end samples of the server and worker processes."""

    server: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    marks: list[dict[str, float]] = field(default_factory=list)
    server_peak_mb: float = 0.0
    worker_peak_mb: dict[int, float] = field(default_factory=dict)

    def poll_peaks(self) -> None:
        self.server_peak_mb = max(self.server_peak_mb, peak_rss_mb(self.server.pid))
        for w in self.workers:
            self.worker_peak_mb[w.pid] = max(self.worker_peak_mb.get(w.pid, 0.0), peak_rss_mb(w.pid))

    def mark(self, round_no: int) -> None:
        user, system = cpu_split(self.server.pid)
        workers = [cpu_split(w.pid) for w in self.workers]
        self.marks.append({"round": round_no, "t": time.monotonic(), "server_cpu": user + system,
                           "server_sys": system, "worker_cpu": sum(u + s for u, s in workers),
                           "worker_sys": sum(s for _, s in workers), "lo": loopback_bytes()})


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()


def _watch(watch: Watch, rounds_done: Callable[[], int], rounds: int, timeout_s: float,
           on_round: Callable[[int], None]) -> str | None:
    """Sample at every round end until ``rounds`` are done; returns why it stopped early (None: it did not)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < rounds:
        if time.monotonic() > deadline:
            return f"did not finish {rounds} rounds within {timeout_s:.0f} s"
        if watch.server.poll() is not None:
            code = watch.server.returncode
            return f"the server exited with code {code} after round {seen}" + (
                " (killed: out of memory?)" if code == -signal.SIGKILL else "")
        done = rounds_done()
        if done > seen:
            watch.mark(done)
            seen = done
            on_round(seen)
        watch.poll_peaks()
        time.sleep(0.02)
    return None


def _share(first: dict[str, float], last: dict[str, float], who: str) -> float:
    """The system (kernel) share of ``who``'s CPU time between two marks."""
    return (last[f"{who}_sys"] - first[f"{who}_sys"]) / max(last[f"{who}_cpu"] - first[f"{who}_cpu"], 1e-9)


def _measured(watch: Watch, items: Sequence[Any]) -> list[Any]:
    """The items (one per completed round) from the first marked round to the last."""
    if not watch.marks:
        return []
    return list(items[int(watch.marks[0]["round"]) - 1:int(watch.marks[-1]["round"])])


def _figures(watch: Watch, ends: list[float], n: int, model_bytes: int) -> dict[str, Any]:
    if len(watch.marks) < 2 or len(ends) < 2:
        return {}
    first, last = watch.marks[0], watch.marks[-1]
    rounds = last["round"] - first["round"]
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return {"s_per_round": (ends[-1] - ends[0]) / (len(ends) - 1), "round_gaps_s": gaps,
            "median_gap_s": statistics.median(gaps),
            "server_cpu_s_per_round": (last["server_cpu"] - first["server_cpu"]) / rounds,
            "server_sys_share": _share(first, last, "server"),
            "worker_cpu_ms_per_round": 1e3 * (last["worker_cpu"] - first["worker_cpu"]) / rounds / n,
            "worker_sys_share": _share(first, last, "worker"),
            "server_peak_rss_mb": watch.server_peak_mb,
            "worker_peak_rss_mb": statistics.mean(watch.worker_peak_mb.values()) if watch.worker_peak_mb else 0.0,
            "loopback_bytes_per_round": (last["lo"] - first["lo"]) / rounds,
            "raw_payload_per_round": 2 * n * model_bytes}


def _run_cell(server: subprocess.Popen[bytes], workers: list[subprocess.Popen[bytes]], logs: Sequence[Any],
              rounds_file: Path, bench: RoundBench, on_round: Callable[[int], None]) -> tuple[Watch, str | None]:
    """Watch a started cell until its server has ended ``bench.rounds`` rounds (one line each in ``rounds_file``),
    then stop every process and close the logs; returns the samples and why it stopped early (None: it did not)."""
    watch = Watch(server, workers)

    def rounds_done() -> int:
        try:
            return rounds_file.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    try:
        error = _watch(watch, rounds_done, bench.rounds, bench.timeout_s, on_round)
        _stop([server, *workers], 0.0 if error else 60.0)
    finally:
        _stop([server, *workers], 0.0)
        for log in logs:
            log.close()
    return watch, error


def run_fedctl(n: int, model: str, bench: RoundBench, cell_dir: Path,
               on_round: Callable[[int], None]) -> dict[str, Any]:
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    state, port = cell_dir / "state", free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    log = (cell_dir / "serve.log").open("wb")
    scraper = None if bench.scrape_every_s is None else Scraper(f"http://127.0.0.1:{free_port()}/metrics",
                                                                bench.scrape_every_s)
    metrics_args = [] if scraper is None else ["--metrics-bind", scraper.url.split("/")[2]]
    viewer = None if scraper is None else Viewer(scraper.url.replace("/metrics", "/api/stream"))
    server = subprocess.Popen([sys.executable, "-m", "fedctl", "serve", "--bind", endpoint, "--model", model,
                               "--rounds", str(bench.rounds), "--min-workers", str(n), "--state-dir", str(state),
                               *metrics_args, *bench.serve_args], stdout=log, stderr=subprocess.STDOUT)
    if scraper is not None and viewer is not None:
        scraper.start()
        viewer.start()
    procs = bench.processes or n
    per = [n // procs + (1 if i < n % procs else 0) for i in range(min(procs, n))]
    wlog = (cell_dir / "workers.log").open("wb")
    env = {**os.environ, **WORKER_ENV}
    workers = [subprocess.Popen([sys.executable, "-m", "fedctl.sim.noop_worker", endpoint, f"w{i:03d}", str(k)],
                                stdout=wlog, stderr=subprocess.STDOUT, env=env) for i, k in enumerate(per)]
    metrics = state / "metrics.jsonl"
    try:
        watch, error = _run_cell(server, workers, (log, wlog), metrics, bench, on_round)
    finally:
        if scraper is not None and viewer is not None:
            scraper.stop()
            viewer.stop()
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    ends = [r["elapsed_s"] for r in _measured(watch, records)]
    later = records[1:] or records
    return {**_figures(watch, ends, n, get_model(model).nbytes), "completed_rounds": len(records), "error": error,
            **({"update_bytes_per_round": statistics.median(r["update_bytes_in"] for r in later),
                "model_bytes_per_round": statistics.median(r["model_bytes_out"] for r in later),
                "wire_bytes_per_round": statistics.median(r["bytes_in"] + r["bytes_out"] for r in later),
                "participants": min(r["participants"] for r in records)} if records else {}),
            "processes": len(per), **({} if scraper is None else scraper.figures()),
            **({} if viewer is None else viewer.figures())}


def run_flower(python: Path, n: int, model: str, bench: RoundBench, cell_dir: Path,
               on_round: Callable[[int], None]) -> dict[str, Any]:
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    spec = get_model(model)
    shapes = json.dumps([list(p.shape) for p in spec.params])
    port, times = free_port(), cell_dir / "rounds.txt"
    log = (cell_dir / "server.log").open("wb")
    env = {**os.environ, **WORKER_ENV}
    server = subprocess.Popen([str(python), str(PEER), "server", str(port), str(n), str(bench.rounds), shapes,
                               str(times)], stdout=log, stderr=subprocess.STDOUT, env=env)
    time.sleep(1.0)  # Flower's clients give up on a server that is not listening yet
    wlog = (cell_dir / "clients.log").open("wb")
    workers = [subprocess.Popen([str(python), str(PEER), "client", str(port), str(i), shapes],
                                stdout=wlog, stderr=subprocess.STDOUT, env=env) for i in range(n)]
    watch, error = _run_cell(server, workers, (log, wlog), times, bench, on_round)
    rows = [line.split() for line in times.read_text().splitlines()] if times.exists() else []
    ends = [float(r[1]) for r in _measured(watch, rows)]
    return {**_figures(watch, ends, n, spec.nbytes), "completed_rounds": len(rows), "error": error,
            **({"participants": min(int(r[2]) for r in rows)} if rows else {}), "processes": n}


def run(bench: RoundBench, out: Path, flower_python: Path | None,
        on_cell: Callable[[str], None], on_round: Callable[[int], None],
        on_row: Callable[[dict[str, Any]], None] = lambda row: None) -> list[dict[str, Any]]:
    """Every cell, fedctl then Flower; ``on_row`` hears each row as it is measured (the report is rewritten)."""
    rows: list[dict[str, Any]] = []
    for model in bench.models:
        for n in bench.workers:
            for system in ("fedctl", "flower") if flower_python is not None else ("fedctl",):
                on_cell(f"{system}: {n} workers, {model}")
                cell = out / "runs" / "round" / f"{system}-{model}-{n}"
                figures = (run_fedctl(n, model, bench, cell, on_round) if system == "fedctl" else
                           run_flower(flower_python, n, model, bench, cell, on_round))  # type: ignore[arg-type]
                rows.append({"system": system, "workers": n, "model": model, "model_bytes": get_model(model).nbytes,
                             "rounds": bench.rounds, **figures})
                on_row(rows[-1])
    return rows


def summary(bench: RoundBench) -> dict[str, Any]:
    return asdict(bench)

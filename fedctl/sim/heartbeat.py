"""The broker's heartbeat round-trip under load (``fedctl bench heartbeat``): the bench settings, the load
process of no-op workers, the probe that times heartbeats in its own thread, the summary and the report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import resource
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import ClockConfig, SyncConfig
from fedctl.broker.service import Broker
from fedctl.errors import ConfigError, FedctlError, ProtocolError, TransportError
from fedctl.models import get_model
from fedctl.sim.metrics import percentile
from fedctl.sim.report import fmt
from fedctl.strategies import TaskConfig
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeartbeatBench:
    """N no-op workers (in their own process) push dense updates as fast as an async broker takes them while a
    probe heartbeats every ``interval_s`` for ``duration_s``."""

    workers: int = 100
    model: str = "lenet5"
    duration_s: float = 20.0
    interval_s: float = 0.02
    budget_ms: float = 100.0
    warmup_timeout_s: float = 120.0
    idle: bool = False
    """Load test: sync rounds sampling 10 workers (C = 10/K), so the others only heartbeat and wait."""
    durable: bool = True
    """Write each acknowledged update to disk before its ack (the broker's default)."""
    metrics: bool = False
    """Serve /metrics and the dashboard on the broker's loop (as `--metrics-bind` does), scrape /metrics every second
    and keep the dashboard's event stream open and read while probing."""

    def __post_init__(self) -> None:
        get_model(self.model)
        if self.workers < 1 or not self.duration_s > 0 or not self.interval_s > 0:
            raise ConfigError("--workers, --duration and --interval-ms must be positive")

    def broker_config(self, state_dir: Path) -> BrokerConfig:
        if self.idle:
            sampled = min(10, self.workers)
            return BrokerConfig(bind="tcp://127.0.0.1:*", model=self.model, strategy="fedavg", rounds=2**40,
                                task=TaskConfig(1, 50, 0.05), state_dir=state_dir,
                                sync=SyncConfig(sampled / self.workers, sampled, 60.0), done_linger_s=2.0,
                                durable_updates=False)
        return BrokerConfig(bind="tcp://127.0.0.1:*", model=self.model, strategy="fedavg", rounds=2**40,
                            task=TaskConfig(1, 50, 0.05), state_dir=state_dir, policy="async",
                            clock=ClockConfig(max_staleness=1000), done_linger_s=2.0,
                            durable_updates=self.durable)


class HeartbeatProbe:
    """A raw DEALER that joins as a worker which never pulls and sends a heartbeat every ``interval_s`` on a
    fixed schedule (a late reply never delays the next beat), timing each reply matched by ``re``.

    It runs in its own thread with its own zmq context and a blocking socket, so it does not share the broker's
    event loop; waking it costs at most the interpreter's switch interval (5 ms) of GIL hand-over.
    """

    def __init__(self, endpoint: str, interval_s: float, duration_s: float, grace_s: float = 2.0) -> None:
        self.endpoint, self.interval_s, self.duration_s, self.grace_s = endpoint, interval_s, duration_s, grace_s

    def run(self) -> dict[str, Any]:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            self._join(sock)
            result = self._beat(sock)
            sock.send_multipart(encode(make(C.LEAVE, 2**31, reason="probe finished")))
            return result
        finally:
            sock.close(linger=0)
            ctx.term()

    def _join(self, sock: zmq.Socket) -> None:
        sock.send_multipart(encode(make(C.JOIN, 1, worker="heartbeat-probe", backend="probe", num_examples=1)))
        if not sock.poll(30_000):
            raise TransportError(f"the broker at {self.endpoint} did not welcome the probe within 30 s")
        reply = decode(sock.recv_multipart(), C.BROKER_TO_WORKER)
        if reply.type != C.WELCOME:
            raise TransportError(f"the broker answered the probe's join with {reply.type}: {reply.get('reason')}")

    def _beat(self, sock: zmq.Socket) -> dict[str, Any]:
        pending: dict[int, float] = {}
        rtts: list[float] = []
        start = time.perf_counter()
        end, next_send, msg_id = start + self.duration_s, start, 1
        while True:
            now = time.perf_counter()
            if now < end and now >= next_send:
                msg_id += 1
                pending[msg_id] = time.perf_counter()
                sock.send_multipart(encode(make(C.HEARTBEAT, msg_id, t=time.time())))
                next_send += self.interval_s
                continue
            if now >= end and (not pending or now >= end + self.grace_s):
                break
            wait_s = (next_send if now < end else end + self.grace_s) - now
            if sock.poll(max(math.ceil(wait_s * 1000), 0)):
                frames = sock.recv_multipart()
                got = time.perf_counter()
                try:
                    msg = decode(frames, C.BROKER_TO_WORKER)
                except ProtocolError as err:
                    log.warning("probe: undecodable reply (%s)", err)
                    continue
                if msg.type == C.HEARTBEAT and msg.re in pending:
                    rtts.append(got - pending.pop(msg.re))
        return {"sent": msg_id - 1, "answered": len(rtts), "unanswered": len(pending), "rtt_s": rtts,
                "probe_s": time.perf_counter() - start}


def run_noop_workers(endpoint: str, count: int) -> None:
    """Entry point of the load process: ``count`` workers whose trainer returns the weights unchanged at once."""
    logging.getLogger("fedctl").setLevel(logging.ERROR)
    asyncio.run(_noop_workers(endpoint, count))


async def _noop_workers(endpoint: str, count: int) -> None:
    from fedctl.testing.trainers import NoOpTrainer
    from fedctl.worker.client import Worker, WorkerConfig

    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, max(1024, 2 * count + 64))
    try:
        workers = [Worker(WorkerConfig(endpoint, f"noop-{i}", "noop", 600, connect_timeout_s=60.0), NoOpTrainer,
                          ctx=ctx) for i in range(count)]
        # A push racing the end of the run is refused (run finished): that is the end, not a failure.
        await asyncio.gather(*(w.serve() for w in workers), return_exceptions=True)
    finally:
        ctx.destroy(linger=0)


async def wait_loaded(broker: Broker, workers: int, timeout_s: float) -> None:
    """Wait until every load worker joined and the broker applied one update per worker."""
    if not await broker.wait_until(lambda: len(broker.registry) >= workers and broker.applied_total >= workers,
                                   timeout_s):
        raise TransportError(f"only {len(broker.registry)} of {workers} load workers joined and "
                             f"{broker.applied_total} updates were applied within {timeout_s:g} s")


async def _probe(broker: Broker, bench: HeartbeatBench) -> dict[str, Any]:
    await wait_loaded(broker, bench.workers, bench.warmup_timeout_s)
    counters = broker.transport.counters
    applied0, in0, out0, t0 = broker.applied_total, counters.bytes_in, counters.bytes_out, time.monotonic()
    probe = HeartbeatProbe(broker.endpoint, bench.interval_s, bench.duration_s)
    with ThreadPoolExecutor(1, thread_name_prefix="probe") as pool:
        beats = await asyncio.get_running_loop().run_in_executor(pool, probe.run)
    dt = time.monotonic() - t0
    return {**beats, "window_s": dt, "updates_applied": broker.applied_total - applied0,
            "uplink_mb_per_s": (counters.bytes_in - in0) / dt / 1e6,
            "downlink_mb_per_s": (counters.bytes_out - out0) / dt / 1e6}


async def measure_heartbeat(bench: HeartbeatBench, state_dir: Path) -> dict[str, Any]:
    """Broker in this process's loop, load workers in a child process, probe in a thread; returns the figures."""
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, 1024)
    proc, clean, failure, raw = None, False, None, {}
    try:
        broker = Broker(bench.broker_config(state_dir), None, ctx=ctx)
        proc = multiprocessing.get_context("spawn").Process(target=run_noop_workers, daemon=True,
                                                             args=(broker.endpoint, bench.workers))
        listener, scraper, viewer = None, None, None
        if bench.metrics:
            from fedctl.observe.bind import HttpBind
            from fedctl.observe.collector import BrokerMetrics
            from fedctl.observe.dashboard import Dashboard
            from fedctl.observe.http import MetricsServer
            from fedctl.sim.round_bench import Scraper, Viewer

            listener = MetricsServer(BrokerMetrics(broker).registry, HttpBind("127.0.0.1", 0), Dashboard(broker, []))
            url = await listener.start()
            scraper, viewer = Scraper(url + "/metrics", 1.0), Viewer(url + "/api/stream")
            scraper.start()
            viewer.start()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(broker.run())
            proc.start()
            try:
                cpu0, wall0 = time.process_time(), time.monotonic()
                raw = await _probe(broker, bench)
                if scraper is not None and viewer is not None:
                    await asyncio.to_thread(scraper.stop)
                    await asyncio.to_thread(viewer.stop)
                    raw["metrics_scrapes"] = {**scraper.figures(), **viewer.figures()}
                raw["broker_cpu_percent"] = 100 * (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
                raw["broker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                raw["connected"] = len(broker.registry)
            except FedctlError as err:  # raised below as itself, not inside the task group's ExceptionGroup
                failure = err
            finally:
                # The broker has no stop request: end the run as a reached target does (every worker hears done).
                broker.state["target_reached_at"] = broker.store.version
                broker.changed.set()
        clean = True
    finally:
        if proc is not None and proc.pid is not None:
            if clean:  # the workers heard done and leave by themselves
                await asyncio.to_thread(proc.join, 20)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if listener is not None:
            await listener.stop()
        ctx.destroy(linger=0)
    if failure is not None:
        raise failure
    return summarize_heartbeat(bench, raw, get_model(bench.model).num_params * 4)


def summarize_heartbeat(bench: HeartbeatBench, raw: Mapping[str, Any], update_bytes: int) -> dict[str, Any]:
    """RTT percentiles (ms, nearest rank over the answered beats), throughput, and the verdict on the budget."""
    ms = [1000 * r for r in raw["rtt_s"]]
    p99 = percentile(ms, 99)
    return {"setup": {**asdict(bench), "update_bytes": update_bytes}, "heartbeats": raw["sent"],
            "answered": raw["answered"], "unanswered": raw["unanswered"], "rtt_ms_p50": percentile(ms, 50),
            "rtt_ms_p90": percentile(ms, 90), "rtt_ms_p99": p99, "rtt_ms_max": max(ms, default=None),
            "updates_per_s": raw["updates_applied"] / raw["window_s"], "updates_applied": raw["updates_applied"],
            "window_s": raw["window_s"], "uplink_mb_per_s": raw["uplink_mb_per_s"],
            "downlink_mb_per_s": raw["downlink_mb_per_s"],
            "within_budget": p99 is not None and p99 < bench.budget_ms and raw["unanswered"] == 0,
            "broker_cpu_percent": raw.get("broker_cpu_percent"), "broker_peak_rss_mb": raw.get("broker_peak_rss_mb"),
            "connected": raw.get("connected"), "metrics_scrapes": raw.get("metrics_scrapes"),
            "rtt_ms": [round(v, 3) for v in ms]}


def write_heartbeat_report(result: Mapping[str, Any], out: Path, command: str) -> dict[str, Path]:
    """OUT/heartbeat.json (every RTT included) and OUT/heartbeat.md."""
    out.mkdir(parents=True, exist_ok=True)
    s = result["setup"]
    name = "heartbeat-idle" if s.get("idle") else "heartbeat" if s.get("durable", True) else "heartbeat-nodurable"
    name += "-metrics" if s.get("metrics") else ""
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    paths["json"].write_text(json.dumps({"format": "fedctl-heartbeat/1", "command": command, **result}, indent=1))
    verdict = "yes" if result["within_budget"] else "no"
    load = (f"{s['workers']} workers in a separate process are connected to a sync FedAvg broker that samples 10 "
            "per round (their trainer returns the weights at once); the others only heartbeat and wait with a held "
            "pull." if s.get("idle") else
            f"{s['workers']} workers in a separate process push dense {s['model']} updates "
            f"({s['update_bytes'] / 1000:.0f} kB each; their trainer returns the weights unchanged at once) to an "
            "async FedAvg broker as fast as it takes them.")
    lines = [
        "# Heartbeat round-trip " + ("with mostly idle workers" if s.get("idle") else "under load"), "",
        f"{load} A probe in its own thread (own context, blocking DEALER) joins as "
        f"a worker that never pulls and sends a heartbeat every {s['interval_s'] * 1000:g} ms for "
        f"{s['duration_s']:g} s on a fixed schedule; RTT = send → matching reply (by `re`). Percentiles are "
        "nearest-rank over the answered beats.", "",
        "| heartbeats | unanswered | RTT p50 (ms) | p90 | p99 | max | updates applied/s | uplink MB/s "
        f"| p99 < {s['budget_ms']:g} ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {result['heartbeats']} | {result['unanswered']} | {fmt(result['rtt_ms_p50'], '.2f')} | "
        f"{fmt(result['rtt_ms_p90'], '.2f')} | {fmt(result['rtt_ms_p99'], '.2f')} | {fmt(result['rtt_ms_max'], '.2f')} "
        f"| {result['updates_per_s']:.1f} | {result['uplink_mb_per_s']:.1f} | {verdict} |", "",
        f"Broker process (this process: broker + probe thread): {fmt(result.get('broker_cpu_percent'), '.0f')}% of "
        f"one core during the probe, peak RSS {fmt(result.get('broker_peak_rss_mb'), '.0f')} MiB; "
        f"{result.get('connected')} workers connected.", "",
        *([f"With `/metrics` and the dashboard served on the broker's loop, `/metrics` scraped every second and the "
           f"dashboard's event stream open: {result['metrics_scrapes']['scrapes']} scrapes "
           f"({result['metrics_scrapes']['scrape_failures']} failed), median "
           f"{fmt(result['metrics_scrapes']['scrape_ms_median'], '.1f')} ms; "
           f"{result['metrics_scrapes'].get('dashboard_updates', 0)} dashboard updates read.", ""]
          if result.get("metrics_scrapes") else []),
        "Command:", "", "```", command, "```", ""]
    paths["markdown"].write_text("\n".join(lines))
    return paths

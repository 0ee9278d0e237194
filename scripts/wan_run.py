"""Federations over emulated WAN links: ``fedctl serve`` in the root namespace, ``fedctl join`` workers in network
namespaces behind tbf-limited veth pairs and a delay proxy (fedctl.testing.wan); writes bench/results/wan.{json,md}.

Usage (as root): ``.venv/bin/python scripts/wan_run.py [--mode all|mixed|compress|fault] [--rounds 5]
[--slow-workers 1 [2 ...]] [--plaintext] [--out bench/results] [--workdir DIR] [--cleanup]``.

Links: A = 1 Mbit/s (tbf) + 300 ms one way (proxy), B = 10 Mbit/s + 100 ms, C = loopback. The broker binds
``tcp://127.0.0.1:*``; each link's proxy listens on the link's root-side veth address (10.77.X.1) and relays to
it, so the namespaces reach the broker only through their link. By default the run uses CURVE (``fedctl keygen``
for the broker and every worker), as a deployment over a WAN would; ``--plaintext`` leaves it out.

Modes: ``mixed`` — LeNet-5 FedAvg, C = 1, one worker on each of A, B, C; ``fault`` — the same twice, with the proxy of
link A resetting the slow worker's first connection once 100 kB went down (mid-way through the 247 kB model), then
once 100 kB went up (mid-way through its first update);
``compress`` — dense FedSGD vs DGC (sparsity 0.999, scope=model, dense_below=0), B = 0, with ``--slow-workers``
workers each behind its own link A, and the same two runs on loopback as the baseline.
Every namespace, veth and process is removed at exit, also on failure or SIGTERM; ``--cleanup`` removes the
namespaces of a run that was killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The repository root is put on the path first, hence E402.
from fedctl.testing.delay_proxy import CutPlan, DelayProxy  # noqa: E402
from fedctl.testing.wan import (  # noqa: E402
    Link,
    LinkConfig,
    close_link,
    measure_rtt,
    measure_transfer,
    netns_unavailable,
    open_link,
    remove_stale_links,
    start_echo_server,
)

log = logging.getLogger("wan_run")
ENDPOINT = re.compile(r"broker on tcp://127\.0\.0\.1:(\d+)")
DONE = re.compile(r"done: trained (\d+) rounds")
LINK_A = (LinkConfig(rate_kbit=1000), 0.300)
LINK_B = (LinkConfig(rate_kbit=10_000), 0.100)
SERVE_COMMON = ("--model", "lenet5", "--fraction", "1.0", "--round-timeout", "120", "--liveness", "10",
                "--heartbeat-interval", "1", "--seed", "0", "--eval-data", "test")
DGC_OPTS = ("--opt", "sparsity=0.999", "--opt", "scope=model", "--opt", "dense_below=0", "--opt", "warmup_rounds=0")


@dataclass(frozen=True)
class Site:
    """One worker and where it sits: behind an emulated link (rate + one-way delay), or on loopback."""

    name: str
    shard: str
    link: LinkConfig | None = None
    delay_s: float = 0.0
    cut: CutPlan | None = None

    def describe(self) -> str:
        if self.link is None:
            return f"{self.name}: loopback"
        return f"{self.name}: {self.link.rate_kbit / 1000:g} Mbit/s + {self.delay_s * 1000:g} ms"


@dataclass
class Run:
    """One federation: its sites, the serve options, and what it measured."""

    name: str
    sites: list[Site]
    serve_args: tuple[str, ...]
    result: dict[str, Any] = field(default_factory=dict)


def fedctl_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCTL_")}
    env.update(PYTHONPATH=str(REPO), FEDCTL_PLAIN_LOGS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(workdir / "cache"))
    return env


class Procs:
    """The run's subprocesses, each logging to ``logs/NAME.{out,err}``; survivors are killed on close."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    async def start(self, name: str, argv: list[str]) -> asyncio.subprocess.Process:
        logs = self.workdir / "logs"
        with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
            proc = await asyncio.create_subprocess_exec(*argv, cwd=self.workdir, env=fedctl_env(self.workdir),
                                                        stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def log_text(self, name: str, stream: str = "err") -> str:
        return (self.workdir / "logs" / f"{name}.{stream}").read_text(errors="replace")

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()


def fedctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedctl", *args]


async def wait_endpoint(procs: Procs, name: str, timeout_s: float = 60.0) -> int:
    """The port the broker bound, from its 'broker on tcp://127.0.0.1:PORT' log line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = ENDPOINT.search(procs.log_text(name))
        if found:
            return int(found.group(1))
        if procs.procs[name].returncode is not None:
            break
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name} logged no endpoint:\n{procs.log_text(name)[-3000:]}")


def make_keys(workdir: Path, sites: list[Site]) -> dict[str, Path]:
    """CURVE key pairs with ``fedctl keygen``: the broker's, and one per worker in the allowed-keys directory."""
    keys = workdir / "keys"
    for out, name in [(keys / "broker", "broker")] + [(keys / "workers", s.name) for s in sites]:
        if not (out / f"{name}.key").exists():
            subprocess.run(fedctl_argv("keygen", "--out", str(out), "--name", name), check=True,
                           capture_output=True, env=fedctl_env(workdir))
    return {"broker_secret": keys / "broker" / "broker.key_secret", "broker_public": keys / "broker" / "broker.key",
            "allowed": keys / "workers", "workers": keys / "workers"}


@contextlib.asynccontextmanager
async def links_for(sites: list[Site]) -> AsyncIterator[dict[str, Link]]:
    """One namespace + veth + tbf per site with a link, all removed when the block ends."""
    made: dict[str, Link] = {}
    try:
        for site in sites:
            if site.link is not None:
                made[site.name] = await asyncio.to_thread(open_link, site.link)
        yield made
    finally:
        for link in made.values():
            await asyncio.to_thread(close_link, link)


async def federate(run: Run, data_dir: Path, workdir: Path, curve: bool) -> dict[str, Any]:
    """Run one federation to the end; returns what it measured (see :func:`summarise`)."""
    keys = make_keys(workdir, run.sites) if curve else None
    shutil.rmtree(workdir / run.name, ignore_errors=True)  # a finished run's state dir would be resumed, not rerun
    procs, proxies = Procs(workdir / run.name), dict[str, DelayProxy]()
    state_dir = workdir / run.name / "state"
    serve = ["serve", "--bind", "tcp://127.0.0.1:*", "--state-dir", str(state_dir), "--data-dir", str(data_dir),
             "--min-workers", str(len(run.sites)), *SERVE_COMMON, *run.serve_args]
    if keys:
        serve += ["--secret-key", str(keys["broker_secret"]), "--allowed-keys", str(keys["allowed"])]
    async with links_for(run.sites) as links:
        try:
            started = time.monotonic()
            broker = await procs.start("broker", fedctl_argv(*serve))
            port = await wait_endpoint(procs, "broker")
            for site in run.sites:
                proxy = await start_worker(procs, site, port, links.get(site.name), data_dir, keys)
                if proxy is not None:
                    proxies[site.name] = proxy
            codes = await wait_all(procs, timeout_s=600)
            wall_s = time.monotonic() - started
            return summarise(run, procs, proxies, state_dir, codes, wall_s, broker.returncode)
        finally:
            for proxy in proxies.values():
                await proxy.close()
            await procs.close()


async def start_worker(procs: Procs, site: Site, port: int, link: Link | None, data_dir: Path,
                       keys: dict[str, Path] | None) -> DelayProxy | None:
    """Start ``fedctl join`` for ``site``: inside its namespace through a new proxy, or on loopback."""
    endpoint, prefix, proxy = f"tcp://127.0.0.1:{port}", list[str](), None
    if link is not None:
        proxy = DelayProxy(("127.0.0.1", port), listen_host=link.host_addr, delay_up_s=site.delay_s,
                           delay_down_s=site.delay_s, cut=site.cut)
        await proxy.start()
        endpoint, prefix = proxy.endpoint, link.exec_prefix()
    join = ["join", "--connect", endpoint, "--data", site.shard, "--data-dir", str(data_dir), "--backend", "torch",
            "--threads", "1", "--worker-id", site.name]
    if keys:
        join += ["--server-key", str(keys["broker_public"]),
                 "--secret-key", str(keys["workers"] / f"{site.name}.key_secret")]
    try:
        await procs.start(site.name, prefix + fedctl_argv(*join))
    except BaseException:
        if proxy is not None:
            await proxy.close()
        raise
    return proxy


async def wait_all(procs: Procs, timeout_s: float) -> dict[str, int | None]:
    """Exit codes of every process (None: still running after ``timeout_s``, then killed)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs.procs.values())), timeout_s)
    return {name: p.returncode for name, p in procs.procs.items()}


def summarise(run: Run, procs: Procs, proxies: dict[str, DelayProxy], state_dir: Path,
              codes: dict[str, int | None], wall_s: float, broker_code: int | None) -> dict[str, Any]:
    metrics_path = state_dir / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    rounds = [json.loads(line) for line in lines if line.strip()]
    broker_log = procs.log_text("broker")
    workers = {}
    for site in run.sites:
        trained = DONE.search(procs.log_text(site.name, "out"))
        err = procs.log_text(site.name)
        workers[site.name] = {
            "link": site.describe(), "exit": codes.get(site.name),
            "rounds_trained": int(trained.group(1)) if trained else None,
            "dropped_by_broker": len(re.findall(rf"worker {re.escape(site.name)} lost", broker_log)),
            "resent_update": err.count("resending the update"),
            "rejoined": len(re.findall(rf"worker {re.escape(site.name)} rejoined", broker_log)),
            "reconnects": err.count("reconnecting"), "proxy": proxies[site.name].stats() if site.name in proxies
            else None, "log_tail": err.splitlines()[-6:] if codes.get(site.name) != 0 else []}
    per_round = [{"round": r["round"], "duration_s": r["duration_s"], "elapsed_s": r.get("elapsed_s"),
                  "participants": r["participants"], "selected": r["selected"], "bytes_in": r["bytes_in"],
                  "bytes_out": r["bytes_out"], "update_bytes_in": r["update_bytes_in"],
                  "model_bytes_out": r["model_bytes_out"], "test_accuracy": r["test_accuracy"]} for r in rounds]
    return {"run": run.name, "serve_args": list(run.serve_args), "links": [s.describe() for s in run.sites],
            "wall_s": round(wall_s, 2), "broker_exit": broker_code, "rounds_completed": len(rounds),
            "round_duration_s": [r["duration_s"] for r in rounds],
            "bytes_in": sum(r["bytes_in"] for r in rounds), "bytes_out": sum(r["bytes_out"] for r in rounds),
            "final_accuracy": rounds[-1]["test_accuracy"] if rounds else None,
            "rounds_failed": broker_log.count("failed:"), "workers": workers, "per_round": per_round}


def mixed_sites(cut: CutPlan | None = None) -> list[Site]:
    return [Site("A-1mbit-300ms", "shard0", LINK_A[0], LINK_A[1], cut),
            Site("B-10mbit-100ms", "shard1", LINK_B[0], LINK_B[1]), Site("C-loopback", "shard2")]


def plan(mode: str, rounds: int, slow_workers: list[int]) -> list[Run]:
    """The runs of ``mode`` in order."""
    fedavg = ("--strategy", "fedavg", "-E", "1", "-B", "10", "--lr", "0.05", "--rounds", str(rounds),
              "--eval-every", str(rounds))
    runs = []
    if mode in ("all", "mixed"):
        runs.append(Run("mixed", mixed_sites(), fedavg))
    if mode in ("all", "compress"):
        common = ("-B", "0", "--lr", "0.05", "--rounds", str(rounds), "--eval-every", str(rounds))
        dense, dgc = ("--strategy", "fedsgd", *common), ("--strategy", "dgc", *common, *DGC_OPTS)
        for n in slow_workers:
            slow = [Site(f"A{i}-1mbit-300ms", f"shard{i}", LINK_A[0], LINK_A[1]) for i in range(n)]
            local = [Site(f"L{i}-loopback", f"shard{i}") for i in range(n)]
            runs += [Run(f"dense-1mbit-x{n}", slow, dense), Run(f"dgc-1mbit-x{n}", slow, dgc),
                     Run(f"dense-loopback-x{n}", local, dense), Run(f"dgc-loopback-x{n}", local, dgc)]
    if mode in ("all", "fault"):
        runs += [Run("fault-cut-down", mixed_sites(CutPlan(after_bytes=100_000, direction="down")), fedavg),
                 Run("fault-cut-up", mixed_sites(CutPlan(after_bytes=100_000, direction="up")), fedavg)]
    return runs


def partition(workdir: Path) -> Path:
    out = workdir / "shards"
    if not (out / "test.npz").exists():
        subprocess.run(fedctl_argv("partition", "--dataset", "mnist-sample", "--clients", "10", "--iid",
                                   "--out", str(out)), check=True, capture_output=True, env=fedctl_env(workdir))
    return out


def _kb_list(values: list[int]) -> str:
    return ", ".join(f"{v / 1e3:.1f}" for v in values)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as markdown: link calibration, every run, then dense vs DGC."""
    out = ["# Federations over emulated WAN links", "",
           f"`{meta['command']}` — {meta['when']}; LeNet-5 (247 kB dense), MNIST sample in 10 IID shards of 1,000 "
           f"images, {meta['rounds']} rounds, C = 1, CURVE: {meta['curve']}. A link = tbf on both ends of a veth "
           "pair + a proxy adding the one-way delay each way. Round = `duration_s` of metrics.jsonl (from the "
           "round's start, which for round 1 includes waiting for the workers to start and join, to aggregated); "
           "wall = broker start to the last exit. Two CPU cores shared with other work "
           f"(load {meta['load_avg'][0]:.1f}): compare within this file.", "",
           "| link | tbf rate | 1-way delay | measured down | measured up | RTT through the proxy |",
           "|---|---|---|---|---|---|"]
    for c in meta["calibration"]:
        out.append(f"| {c['link']} | {c['rate_kbit']:g} kbit/s | {c['delay_s'] * 1000:g} ms | "
                   f"{c['down_kbit_s']:.0f} kbit/s | {c['up_kbit_s']:.0f} kbit/s | {c['rtt_ms']:.0f} ms |")
    out += ["", "| run | links | wall s | rounds s | MB in / out | exits (workers / broker) | slow worker: trained, "
            "dropped, reconnects, cuts, longest silence up |", "|---|---|---|---|---|---|---|"]
    for r in results:
        slow = next(iter(r["workers"].values()))
        proxy = slow["proxy"] or {}
        exits = " ".join(str(w["exit"]) for w in r["workers"].values()) + f" / {r['broker_exit']}"
        out.append(f"| {r['run']} | {'; '.join(r['links'])} | {r['wall_s']:.1f} | "
                   f"{', '.join(f'{d:.2f}' for d in r['round_duration_s'])} | "
                   f"{r['bytes_in'] / 1e6:.2f} / {r['bytes_out'] / 1e6:.2f} | {exits} | "
                   f"{slow['rounds_trained']}, {slow['dropped_by_broker']}, {slow['reconnects']}, "
                   f"{len(proxy.get('cuts', []))}, {proxy.get('max_gap_up_s', '-')} s |")
    compress = [r for r in results if r["run"].startswith(("dense-", "dgc-"))]
    if compress:
        out += ["", "## Dense FedSGD vs DGC (B = 0)", "",
                "| run | wall s | sum of rounds s | mean of rounds 2+ s | rounds s | up kB per round | "
                "down kB per round |", "|---|---|---|---|---|---|---|"]
        for r in compress:
            later = r["round_duration_s"][1:] or r["round_duration_s"]
            out.append(f"| {r['run']} | {r['wall_s']:.1f} | {sum(r['round_duration_s']):.2f} | "
                       f"{sum(later) / max(len(later), 1):.2f} | "
                       f"{', '.join(f'{d:.2f}' for d in r['round_duration_s'])} | "
                       f"{_kb_list([p['bytes_in'] for p in r['per_round']])} | "
                       f"{_kb_list([p['bytes_out'] for p in r['per_round']])} |")
    return "\n".join(out) + "\n"


async def calibrate() -> list[dict[str, Any]]:
    """Measured rate of links A and B (one transfer each way through the veth) and RTT through their proxies."""
    echo = await start_echo_server()
    rows = []
    try:
        for name, (config, delay_s), nbytes in (("A", LINK_A, 250_000), ("B", LINK_B, 1_000_000)):
            link = await asyncio.to_thread(open_link, config)
            try:
                took = {d: await measure_transfer(link, nbytes, d) for d in ("down", "up")}
            finally:
                await asyncio.to_thread(close_link, link)
            async with DelayProxy(echo.sockets[0].getsockname()[:2], delay_up_s=delay_s,
                                  delay_down_s=delay_s) as proxy:
                rtts = await measure_rtt(*proxy.listen, samples=5)
            rows.append({"link": name, "rate_kbit": config.rate_kbit, "delay_s": delay_s, "bytes": nbytes,
                         "down_s": round(took["down"], 3), "up_s": round(took["up"], 3),
                         "down_kbit_s": nbytes * 8 / took["down"] / 1e3, "up_kbit_s": nbytes * 8 / took["up"] / 1e3,
                         "rtt_ms": 1e3 * sorted(rtts)[len(rtts) // 2]})
    finally:
        echo.close()
    return rows


async def main_async(args: argparse.Namespace, meta: dict[str, Any]) -> list[dict[str, Any]]:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # finally blocks then remove links and processes
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedwan-"))
    data_dir = partition(workdir)
    meta["calibration"] = await calibrate()
    log.info("links measured: %s", meta["calibration"])
    results = []
    for run in plan(args.mode, args.rounds, args.slow_workers):
        log.info("run %s: %s", run.name, "; ".join(s.describe() for s in run.sites))
        result = await federate(run, data_dir, workdir, curve=not args.plaintext)
        log.info("run %s: wall %.1f s, rounds %s, exits %s", run.name, result["wall_s"], result["round_duration_s"],
                 {k: w["exit"] for k, w in result["workers"].items()})
        results.append(result)
    log.info("logs and state under %s", workdir)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["all", "mixed", "compress", "fault"], default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow-workers", type=int, nargs="+", default=[1],
                        help="compress mode: worker counts to run, each worker behind its own link A")
    parser.add_argument("--plaintext", action="store_true", help="no CURVE keys")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", default=None, help="logs, keys, shards, state (default: a new temp dir)")
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces left by a killed run, then exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cleanup:
        log.info("removed %s", remove_stale_links() or "nothing")
        return 0
    why = netns_unavailable()
    if why:
        log.error("cannot emulate links here: %s", why)
        return 2
    meta: dict[str, Any] = {"command": " ".join(["scripts/wan_run.py", *sys.argv[1:]]),
                            "when": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "curve": not args.plaintext,
                            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    try:
        results = asyncio.run(main_async(args, meta))
    except asyncio.CancelledError:  # SIGTERM: links, proxies and processes are already gone
        log.error("interrupted; nothing written")
        return 143
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    (args.out / "wan.md").write_text(markdown(results, meta))
    ok = all(r["broker_exit"] == 0 and all(w["exit"] == 0 for w in r["workers"].values()) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Edge brokers over emulated WAN links (issue 17): two sites, each behind its own 10 Mbit/s (tbf) + 50 ms one-way
(delay proxy) link to the root, four ``fedctl join`` workers per site; writes bench/results/wan_edges.{json,md}.

Usage (as root): ``.venv/bin/python scripts/wan_edges.py [--rounds 4] [--model mlp] [--out bench/results]``.

* **flat**: the root in the root namespace; every worker in its site's namespace connects to the root through the
  site's proxy, so all four workers' models and updates cross the site's link.
* **edges**: in each site's namespace a ``fedctl serve --upstream`` edge (its workers on the namespace's loopback);
  only the edge crosses the link, with one model down and one merged update up per round.

Measured from the root's metrics.jsonl and the proxies: the root's inbound update bytes per round (must fall by the
fan-in, 4), bytes on each WAN link, round time. Same seed, same shards, FedAvg C = 1 at every level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wan_run import REPO, Procs, fedctl_argv, wait_all, wait_endpoint  # noqa: E402

from fedctl.testing.delay_proxy import DelayProxy  # noqa: E402
from fedctl.testing.wan import LinkConfig, close_link, netns_unavailable, open_link  # noqa: E402

log = logging.getLogger("wan_edges")
LINK, DELAY_S = LinkConfig(rate_kbit=10_000), 0.050
SITES, PER_SITE = 2, 4


def _records(state: Path) -> list[dict[str, Any]]:
    path = state / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


async def federate(mode: str, data: Path, work: Path, rounds: int, model: str) -> dict[str, Any]:
    procs, proxies, links = Procs(work / mode), [], []
    state = work / mode / "root"
    started = time.monotonic()
    try:
        await procs.start("root", fedctl_argv(
            "serve", "--bind", "tcp://127.0.0.1:*", "--state-dir", str(state), "--model", model, "--rounds",
            str(rounds), "--min-workers", str(SITES * PER_SITE if mode == "flat" else SITES), "--seed", "0",
            "--round-timeout", "300", "--liveness", "15", "--eval-data", "test", "--data-dir", str(data)))
        port = await wait_endpoint(procs, "root")
        for s in range(SITES):
            link = await asyncio.to_thread(open_link, LINK)
            links.append(link)
            proxy = DelayProxy(("127.0.0.1", port), listen_host=link.host_addr, delay_up_s=DELAY_S,
                               delay_down_s=DELAY_S)
            await proxy.start()
            proxies.append(proxy)
            ns = link.exec_prefix()
            target = proxy.endpoint
            if mode == "edges":
                await procs.start(f"edge{s}", ns + fedctl_argv(
                    "serve", "--bind", "tcp://127.0.0.1:7000", "--upstream", proxy.endpoint, "--edge-id",
                    f"edge{s}", "--model", model, "--min-workers", str(PER_SITE), "--round-timeout", "200",
                    "--state-dir", str(work / mode / f"edge{s}")))
                target = "tcp://127.0.0.1:7000"
            for w in range(PER_SITE):
                i = s * PER_SITE + w
                await procs.start(f"w{i}", ns + fedctl_argv(
                    "join", "--connect", target, "--data", f"shard{i}", "--data-dir", str(data), "--backend",
                    "torch", "--threads", "1", "--worker-id", f"w{i}", "--connect-timeout", "120"))
        codes = await wait_all(procs, timeout_s=900)
    finally:
        for proxy in proxies:
            await proxy.close()
        await procs.close()
        for link in links:
            await asyncio.to_thread(close_link, link)
    failed = {k: v for k, v in codes.items() if v != 0}
    if failed:
        raise RuntimeError(f"{mode}: exit codes {failed}; logs in {work / mode / 'logs'}")
    records = _records(state)
    later = [r["duration_s"] for r in records[1:]]
    return {"mode": mode, "rounds": len(records), "wall_s": round(time.monotonic() - started, 1),
            "final_accuracy": records[-1]["test_accuracy"],
            "root_update_bytes_in_per_round": statistics.mean(r["update_bytes_in"] for r in records),
            "root_bytes_in_per_round": statistics.mean(r["bytes_in"] for r in records),
            "root_bytes_out_per_round": statistics.mean(r["bytes_out"] for r in records),
            "round_s_median": statistics.median(later) if later else records[0]["duration_s"],
            "participants": [r["participants"] for r in records],
            "link_bytes_up_per_round": statistics.mean(p.stats()["bytes_up"] for p in proxies) / len(records),
            "link_bytes_down_per_round": statistics.mean(p.stats()["bytes_down"] for p in proxies) / len(records)}


def report(rows: list[dict[str, Any]], out: Path) -> None:
    flat, edges = (next(r for r in rows if r["mode"] == m) for m in ("flat", "edges"))
    ratio = flat["root_update_bytes_in_per_round"] / edges["root_update_bytes_in_per_round"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "wan_edges.json").write_text(json.dumps({"link": f"{LINK.rate_kbit / 1000:g} Mbit/s + "
                                                   f"{DELAY_S * 1000:g} ms", "sites": SITES, "per_site": PER_SITE,
                                                   "fan_in_ratio": ratio, "results": rows}, indent=1))
    lines = ["# Edge brokers over WAN links", "",
             f"{SITES} sites, each behind {LINK.rate_kbit / 1000:g} Mbit/s (tbf) + {DELAY_S * 1000:g} ms one way "
             f"(delay proxy), {PER_SITE} workers per site; FedAvg, C = 1. Flat: every worker crosses its site's "
             "link to the root; edges: one edge per site crosses it.", "",
             "| topology | root update MB in / round | root MB in / out per round | MB up / down per WAN link "
             "per round | round s (median) | final accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['root_update_bytes_in_per_round'] / 1e6:.2f} | "
                     f"{r['root_bytes_in_per_round'] / 1e6:.2f} / {r['root_bytes_out_per_round'] / 1e6:.2f} | "
                     f"{r['link_bytes_up_per_round'] / 1e6:.2f} / {r['link_bytes_down_per_round'] / 1e6:.2f} | "
                     f"{r['round_s_median']:.2f} | {r['final_accuracy']:.4f} |")
    lines += ["", f"The root's inbound update bytes per round fall by {ratio:.2f}× (the fan-in is {PER_SITE}).", "",
              "Reproduce (as root): `.venv/bin/python scripts/wan_edges.py`", ""]
    (out / "wan_edges.md").write_text("\n".join(lines))


async def main(args: argparse.Namespace) -> int:
    why = netns_unavailable()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="wan-edges-"))
    data = work / "shards"
    made = await asyncio.create_subprocess_exec(*fedctl_argv("partition", "--dataset", "mnist-sample", "--iid",
                                                             "--clients", str(SITES * PER_SITE), "--out", str(data)))
    if await made.wait() != 0:
        return 1
    rows = [await federate(mode, data, work, args.rounds, args.model) for mode in ("flat", "edges")]
    report(rows, args.out)
    print((args.out / "wan_edges.md").read_text())
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    logging.basicConfig(level=logging.INFO)
    sys.exit(asyncio.run(main(parser.parse_args())))

"""Compression that pays for itself (docs/protocol.md §4.4), over real loopback sockets: the worker's kernel
measures a fast link, so nothing is deflated under ``auto``; ``always`` deflates both directions; a broker told
that a worker's link is slow deflates that worker's model only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig

MODEL_BYTES = 109_386 * 4


def run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, broker_compress: str,
        worker_compress: str) -> tuple[list[dict[str, Any]], list[Any]]:
    async def scenario() -> list[Any]:
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, rounds=3, sync=SyncConfig(1.0, 2, 20.0),
                                                         compress=broker_compress))
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, compress=worker_compress) for i in range(2)]
        await fed.run_federation(broker, workers)
        return workers

    workers = fed.run_async(scenario())
    return fed.read_metrics(state_dir), workers


@pytest.mark.timeout(60)
def test_loopback_measures_fast_and_sends_plain(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    metrics, workers = run(fed, ctx, state_dir, "auto", "auto")
    for w in workers:  # the kernel's delivery rate of a loopback connection: far above the break-even ~27 MB/s
        assert w.link_bps is not None and w.link_bps > 50e6, w.link_bps
    for m in metrics:  # every model and every update went plain: raw payload plus framing
        assert 2 * MODEL_BYTES <= m["model_bytes_out"] < 2 * MODEL_BYTES * 1.01, m
        assert 2 * MODEL_BYTES <= m["update_bytes_in"] < 2 * MODEL_BYTES * 1.01, m


@pytest.mark.timeout(60)
def test_always_deflates_both_directions(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    metrics, _ = run(fed, ctx, state_dir, "always", "always")
    for m in metrics:  # byte-planed fp32 weights shrink by ~7-14% (random init less than trained)
        assert m["model_bytes_out"] < 2 * MODEL_BYTES * 0.97, m
        assert m["update_bytes_in"] < 2 * MODEL_BYTES * 0.97, m


def test_the_broker_deflates_only_for_a_slow_link() -> None:
    """The pure decision the broker makes per worker from its pull's ``link_bps``."""
    from fedctl.wire.compression import CodecCost, worth_compressing

    cost = CodecCost()
    raw = 5_200_000
    assert not worth_compressing(raw, None, cost), "unmeasured: plain"
    assert not worth_compressing(raw, 3_000_000_000, cost), "loopback"
    assert not worth_compressing(raw, 12_500_000, cost), "100 Mbit/s: deflating costs more than it saves"
    assert worth_compressing(raw, 1_250_000, cost), "10 Mbit/s"
    assert worth_compressing(raw, 125_000, cost), "1 Mbit/s"
    assert worth_compressing(raw, None, cost, "always") and not worth_compressing(raw, 1, cost, "never")
    cost.observe(raw, raw, 0.01)  # incompressible and fast to try: the measured ratio moves toward 1
    assert cost.ratio > 0.9

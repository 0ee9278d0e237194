"""Chunked transfers over real sockets (docs/protocol.md §7.1): models and updates above ``chunk_above`` go as
chunks of slices, paced by credits, and the run is bit-identical to one without chunks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio
from test_hostile import RawPeer  # this directory is on sys.path (pytest prepend import mode)

from fedctl.broker.policy import SyncConfig
from fedctl.models import get_model, init_params
from fedctl.wire import chunks
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.tensors import TensorSlice

SHAPES = {p.name: p.shape for p in get_model("mlp").params}  # 109,386 float32 = 437 kB


async def federate(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, **overrides: Any) -> tuple[Any, Any, Any]:
    broker = fed.start_broker(ctx, fed.broker_config(state_dir, rounds=2, sync=SyncConfig(1.0, 2, 20.0), seed=3,
                                                     **overrides))
    crew = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(2)]
    summary, *_ = await fed.run_federation(broker, crew)
    return summary, broker, dict(broker.store.weights)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_a_chunked_run_equals_a_plain_one(fed: Any, ctx: zmq.asyncio.Context, tmp_path: Path, durable: bool) -> None:
    plain_summary, plain, plain_weights = fed.run_async(federate(fed, ctx, tmp_path / "plain",
                                                                 durable_updates=durable))
    summary, broker, weights = fed.run_async(federate(fed, ctx, tmp_path / "chunked", durable_updates=durable,
                                                      chunk_above=8192, chunk_bytes=16384))
    assert summary["rounds"] == plain_summary["rounds"] == 2
    assert all(np.array_equal(weights[k], plain_weights[k]) for k in plain_weights)
    n = chunks.count(SHAPES, 16384)
    assert n == 27
    # 2 rounds x 2 workers: every model and every update went in chunks, nothing whole.
    assert broker.bytes_in_by_type.get(C.CHUNK, 0) > 4 * 400_000
    assert broker.bytes_out_by_type.get(C.CHUNK, 0) > 4 * 400_000
    assert broker.bytes_in_by_type[C.PUSH] < 4 * 1000, "push headers only"
    assert "chunk" not in plain.bytes_in_by_type
    assert broker.rejected == {}, "no stray chunk or credit"
    del broker, summary
    gc.collect()
    assert list((tmp_path / "chunked").rglob("spool-*")) == [], "spool files are removed once applied"


@pytest.mark.timeout(60)
def test_bad_chunks_are_refused_and_change_nothing(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    async def scenario() -> None:
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, rounds=1, sync=SyncConfig(1.0, 1, 20.0),
                                                         chunk_above=8192, chunk_bytes=16384))
        run = asyncio.create_task(broker.run())
        peer = RawPeer(ctx, broker.endpoint)
        try:
            welcome = await peer.ask(peer.msg(C.JOIN, worker="mallory", backend="numpy", num_examples=10))
            assert welcome["run"]["chunk_above"] == 8192 and welcome["run"]["chunk_bytes"] == 16384
            stray = await peer.ask(peer.msg(C.CHUNK, slices={"fc3.bias": TensorSlice((10,), 0, np.ones(2, "<f4"))},
                                            xfer=77, index=0))
            assert stray.type == C.ERROR and stray["code"] == ErrorCode.UNKNOWN_TRANSFER
            model = await peer.ask(peer.msg(C.PULL))
            assert model.type == C.MODEL and model["chunks"] == 27 and not model.tensors
            for _ in range(2):  # the first window of chunks, then the broker waits for credit
                chunk = await peer.recv()
                assert chunk.type == C.CHUNK and chunk["xfer"] == model.id
            weights = init_params(get_model("mlp"), 0)
            header = peer.msg(C.PUSH, round=model["round"], base_version=model["version"], seq=0, kind="weights",
                              num_examples=10, chunks=27)
            go = await peer.ask(header)
            assert go.type == C.CREDIT and go["received"] == 0
            pieces = list(chunks.split(weights, SHAPES, 16384))
            credit = await peer.ask(peer.msg(C.CHUNK, slices=pieces[0], xfer=go["xfer"], index=0))
            assert credit.type == C.CREDIT and credit["received"] == 1
            # Chunk 2 where chunk 1 belongs: the push itself is refused and its spool dropped.
            refused = await peer.ask(peer.msg(C.CHUNK, slices=pieces[2], xfer=go["xfer"], index=1))
            assert refused.type == C.ERROR and refused["code"] == ErrorCode.MODEL_MISMATCH
            assert refused.re == go["xfer"] and "starts at model element" in refused["reason"]
            assert broker.inbound == {} and list(broker.spool_dir.glob("spool-*")) == []
            assert broker.policy.current is not None and broker.policy.current.received == []
        finally:
            peer.close()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    fed.run_async(scenario())

"""The broker's reader answers heartbeats ahead of the pushes queued before them (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio
from test_hostile import RawPeer, good_tensors  # this directory is on sys.path (pytest prepend import mode)

from fedctl.broker.policy import SyncConfig
from fedctl.wire import constants as C

PEERS = 20


@pytest.mark.timeout(60)
def test_a_heartbeat_is_answered_before_the_pushes_queued_ahead_of_it(fed: Any, ctx: zmq.asyncio.Context,
                                                                      state_dir: Path) -> None:
    async def scenario() -> None:
        # Round 1 waits for 50 workers, so it never opens: each push is decoded in full, then refused.
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, sync=SyncConfig(1.0, 50, 30.0)))
        run = asyncio.create_task(broker.run())
        peers = [RawPeer(ctx, broker.endpoint) for _ in range(PEERS)]
        probe = RawPeer(ctx, broker.endpoint)
        try:
            for i, peer in enumerate([*peers, probe]):
                welcome = await peer.ask(peer.msg(C.JOIN, worker=f"w{i}", backend="numpy", num_examples=10))
                assert welcome.type == C.WELCOME
            push = peers[0].push(good_tensors())  # ~0.4 MB of dense MLP weights
            for peer in peers:
                await peer.send(push)
            await probe.send(probe.msg(C.HEARTBEAT, t=1.0))
            time.sleep(0.5)  # block the loop: the pushes and the heartbeat all wait in the broker's socket now
            beat = await probe.recv()
            refusals = [await peer.recv() for peer in peers]
            assert beat.type == C.HEARTBEAT
            assert all(r.type == C.ERROR for r in refusals)
            # Reply ids count the broker's messages in the order it sent them.
            assert beat.id < min(r.id for r in refusals), (beat.id, sorted(r.id for r in refusals))
        finally:
            for peer in [*peers, probe]:
                peer.close()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    fed.run_async(scenario())

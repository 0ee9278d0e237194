"""A broker killed while the checkpoint of a sync round is being written must lose nothing it acknowledged. Since
issue 14 a sync round acknowledges its updates only once its checkpoint is durable (the checkpoint holds them; no
update is written on its own), so in that window nothing of the round is acknowledged: the workers, still
running, resend their updates to the restarted broker, which completes the round again to the same model."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.durable import PendingStore
from fedctl.broker.policy import SyncConfig
from fedctl.broker.store import Checkpointer


@pytest.mark.timeout(200)
def test_a_broker_killed_while_the_checkpoint_is_written_gets_the_round_again_from_the_workers(
        fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = Checkpointer.save
    blocked, release, killed = threading.Event(), threading.Event(), threading.Event()
    version_2: dict[str, np.ndarray] = {}

    def slow_disk(self: Checkpointer, store: Any, state: dict[str, Any], applied: Any = ()) -> None:
        if store.version == 2 and not killed.is_set():
            version_2.update({k: v.copy() for k, v in store.weights.items()})
            blocked.set()
            release.wait(30)
            raise OSError("the broker was killed while writing its checkpoint")  # nothing of it reached the disk
        real_save(self, store, state, applied)

    monkeypatch.setattr(Checkpointer, "save", slow_disk)
    config = fed.broker_config(state_dir, rounds=4, sync=SyncConfig(1.0, 3, 60.0), keep_models=None)

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config)
        crew = [asyncio.ensure_future(fed.mlp_worker(ctx, broker.endpoint, i).serve()) for i in range(3)]
        first = asyncio.ensure_future(broker.run())
        while not blocked.is_set():  # round 2 aggregated, its checkpoint hangs
            assert not first.done() and not any(t.done() for t in crew)
            await asyncio.sleep(0.01)
        assert sorted(broker.core.held.get(2, {})) == ["w0", "w1", "w2"], "round 2's acks wait for its checkpoint"
        assert not list((state_dir / "pending").glob("batch-*")), "no update is written on its own"
        killed.set()
        first.cancel()  # kill -9 of the broker alone: the workers keep running and reconnect
        await asyncio.gather(first, return_exceptions=True)
        release.set()
        assert json.loads((state_dir / "state.json").read_text())["round"] == 1, "checkpoint 2 never reached disk"
        assert PendingStore(state_dir).load_round() == (2, ("w0", "w1", "w2"))
        second = fed.start_broker(ctx, replace(config, bind=broker.endpoint))
        assert second.state["round"] == 1 and second.core.policy.current.number == 2 and not second.core.updates
        results = await asyncio.gather(second.run(), *crew)
        assert results[0]["rounds"] == 4

    fed.run_async(scenario(), 120.0)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    with np.load(state_dir / "model-2.npz") as redone:  # round 2 completed again from the resent updates
        for name, w in version_2.items():
            assert redone[name].tobytes() == w.tobytes(), name
    journal = [json.loads(line) for line in (state_dir / "journal.jsonl").read_text().splitlines()]
    applied = [(e["worker"], e["round"]) for e in journal]
    assert sorted(applied) == sorted({(f"w{i}", r) for i in range(3) for r in range(1, 5)}), applied

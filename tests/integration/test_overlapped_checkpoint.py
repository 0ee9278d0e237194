"""The checkpoint of round r is written while round r+1's models go out (issue 14). A broker that dies in that
window — models of round r+1 handed out and trained on, checkpoint r not yet durable — must lose nothing it
acknowledged: no update of round r+1 is acknowledged before checkpoint r is durable, and the restarted broker
reopens round r with every acknowledged update of it and completes it again, to the same model."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.durable import PendingStore
from fedctl.broker.policy import SyncConfig
from fedctl.broker.store import Checkpointer


@pytest.mark.timeout(200)
def test_a_broker_killed_while_the_checkpoint_is_written_loses_no_acknowledged_update(
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

    async def first_life() -> int:
        broker = fed.start_broker(ctx, config)
        tasks = [asyncio.ensure_future(broker.run()),
                 *(asyncio.ensure_future(fed.mlp_worker(ctx, broker.endpoint, i).serve()) for i in range(3))]
        # Checkpoint 2 hangs; round 3's models went out, the workers trained and pushed, the broker admitted all
        # three — but their updates wait for the ack gate in the durable writer (none acknowledged).
        def round_3_answered() -> bool:
            current = broker.core.policy.current
            return current is not None and current.number == 3 and len(current.received) == 3

        while not (blocked.is_set() and round_3_answered()):
            assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
            await asyncio.sleep(0.01)
        waiting = broker.durable_queue._unfinished_tasks  # queued or taken by the gated writer, none written
        killed.set()
        for t in tasks:  # kill -9: nothing more runs; only the disk survives
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        release.set()
        return waiting

    waiting = fed.run_async(first_life(), 80.0)
    assert waiting >= 3
    state = json.loads((state_dir / "state.json").read_text())
    assert state["round"] == 1, "checkpoint 2 never reached the disk"
    pending = PendingStore(state_dir)
    assert pending.load_round() == (2, ("w0", "w1", "w2")), "round 3 was not recorded: its acks had to wait"
    assert sorted((u.worker, u.round) for u in pending.load_updates()) == [("w0", 2), ("w1", 2), ("w2", 2)]

    async def second_life() -> Any:
        broker = fed.start_broker(ctx, config)
        assert broker.state["round"] == 1 and broker.core.policy.current.number == 2
        assert sorted(u.worker for u in broker.core.updates) == ["w0", "w1", "w2"], "every acked update is back"
        crew = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(3)]
        await fed.run_federation(broker, crew)
        return broker

    fed.run_async(second_life(), 80.0)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    with np.load(state_dir / "model-2.npz") as redone:  # round 2 completed again from the same updates
        for name, w in version_2.items():
            assert redone[name].tobytes() == w.tobytes(), name
    journal = [json.loads(line) for line in (state_dir / "journal.jsonl").read_text().splitlines()]
    applied = [(e["worker"], e["round"]) for e in journal]
    assert sorted(applied) == sorted({(f"w{i}", r) for i in range(3) for r in range(1, 5)}), applied

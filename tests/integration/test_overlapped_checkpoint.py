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
from fedctl.broker.policy import ClockConfig, SyncConfig
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


@pytest.mark.timeout(200)
def test_a_broker_stopped_between_checkpoint_and_metrics_line_writes_the_line_again(
        fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sync rounds write a round's metrics line after its checkpoint (the evaluation overlaps the checkpoint). A
    broker stopped in between must not leave the committed round without its line."""
    real_append = Checkpointer.append_metrics
    blocked, release, stopped = threading.Event(), threading.Event(), threading.Event()
    lost: list[dict[str, Any]] = []

    def stalled_line(self: Checkpointer, *records: dict[str, Any], sync: bool = True) -> None:
        if any(r["round"] == 2 for r in records) and not stopped.is_set():
            lost.extend(records)
            blocked.set()
            release.wait(30)
            raise OSError("the broker was stopped before round 2's metrics line was written")
        real_append(self, *records, sync=sync)

    monkeypatch.setattr(Checkpointer, "append_metrics", stalled_line)
    config = fed.broker_config(state_dir, rounds=4, sync=SyncConfig(1.0, 3, 60.0), keep_models=None)

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config)
        crew = [asyncio.ensure_future(fed.mlp_worker(ctx, broker.endpoint, i).serve()) for i in range(3)]
        first = asyncio.ensure_future(broker.run())
        while not blocked.is_set():
            assert not first.done() and not any(t.done() for t in crew)
            await asyncio.sleep(0.01)
        stopped.set()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        release.set()
        assert json.loads((state_dir / "state.json").read_text())["round"] == 2, "round 2 is committed"
        assert [m["round"] for m in fed.read_metrics(state_dir)] == [1], "and its line is missing"
        second = fed.start_broker(ctx, replace(config, bind=broker.endpoint))
        results = await asyncio.gather(second.run(), *crew)
        assert results[0]["rounds"] == 4

    fed.run_async(scenario(), 120.0)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert [m.get("recovered", False) for m in metrics] == [False, True, False, False]
    original, recovered = lost[0], metrics[1]
    # the model of round 2 evaluated again gives the very figures the lost line held; the counters are the same
    assert recovered["test_accuracy"] == original["test_accuracy"] is not None
    assert recovered["test_loss"] == original["test_loss"]
    for field in ("version", "participants", "update_bytes_in", "train_loss", "duration_s", "strategy"):
        assert recovered[field] == original[field], field
    assert json.loads((state_dir / "state.json").read_text())["unrecorded"]["round"] == 4  # the last round's copy


@pytest.mark.timeout(200)
def test_an_async_broker_stopped_between_its_lines_and_checkpoint_leaves_no_gap(
        fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SSP/async brokers write their metrics lines before the checkpoint that holds those versions: a stop in
    between leaves lines of versions the restart trims and redoes, so every version has exactly one line."""
    real_save = Checkpointer.save
    stopped = threading.Event()

    def failing_disk(self: Checkpointer, store: Any, state: dict[str, Any], applied: Any = ()) -> None:
        if store.version >= 3 and not stopped.is_set():
            stopped.set()
            raise OSError("the broker was stopped before this checkpoint's commit")
        real_save(self, store, state, applied)

    monkeypatch.setattr(Checkpointer, "save", failing_disk)
    config = fed.broker_config(state_dir, policy="async", rounds=8, clock=ClockConfig(), eval_every=1,
                               sync=SyncConfig(1.0, 1, 20.0), liveness_s=2.0, heartbeat_interval_s=0.25)

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config)
        crew = [asyncio.ensure_future(fed.mlp_worker(ctx, broker.endpoint, i, n=120).serve()) for i in range(3)]
        first = asyncio.ensure_future(broker.run())
        await asyncio.gather(first, return_exceptions=True)  # the failed checkpoint ends this broker
        assert stopped.is_set()
        committed = json.loads((state_dir / "state.json").read_text())["version"]
        written = [m["version"] for m in fed.read_metrics(state_dir)]
        assert written and max(written) > committed, "lines beyond the committed version were on disk"
        second = fed.start_broker(ctx, replace(config, bind=broker.endpoint))
        assert [m["version"] for m in fed.read_metrics(state_dir)] == list(range(1, committed + 1))
        results = await asyncio.gather(second.run(), *crew)
        assert results[0]["version"] >= 8

    fed.run_async(scenario(), 120.0)
    versions = [m["version"] for m in fed.read_metrics(state_dir)]
    assert versions == list(range(1, len(versions) + 1)) and versions[-1] >= 8, versions


@pytest.mark.timeout(200)
def test_a_run_that_reached_its_target_stays_complete_after_a_restart(
        fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    """--target-accuracy ends a sync run in the round that reaches it; a broker started again on its state dir
    must find the run complete (from the round's metrics line) instead of training on."""
    config = fed.broker_config(state_dir, rounds=30, target_accuracy=0.3, sync=SyncConfig(1.0, 2, 60.0))

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config)
        crew = [asyncio.ensure_future(fed.mlp_worker(ctx, broker.endpoint, i).serve()) for i in range(2)]
        first = await broker.run()
        await asyncio.gather(*crew)
        ended = first["rounds"]
        assert ended < 30 and fed.read_metrics(state_dir)[-1]["test_accuracy"] >= 0.3
        second = fed.start_broker(ctx, replace(config, bind=broker.endpoint))
        again = await asyncio.wait_for(second.run(), 30)
        assert again["rounds"] == ended, "the restarted broker trained past the target"
        assert [m["round"] for m in fed.read_metrics(state_dir)] == list(range(1, ended + 1))

    fed.run_async(scenario(), 120.0)

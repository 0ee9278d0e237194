"""SSP and async over real sockets: stragglers, lock-step at S = 0, the hard staleness limit, a dead worker."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from fedctl.broker.policy import ClockConfig, SyncConfig
from fedctl.strategies import TaskConfig


def clock_run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, policy: str, versions: int, workers: int = 3,
              slow: dict[int, float] | None = None, kill: dict[int, float] | None = None, delay_s: float = 0.0,
              **clock: Any) -> tuple[Any, list[Any], list[dict[str, Any]]]:
    """A federation under ``policy``; ``slow`` maps worker index → slowdown, ``kill`` index → seconds to live."""

    async def scenario() -> tuple[Any, list[Any]]:
        config = fed.broker_config(state_dir, policy=policy, rounds=versions, task=TaskConfig(1, 20, 0.05),
                                   clock=ClockConfig(**clock), eval_every=3, sync=SyncConfig(1.0, 1, 20.0),
                                   liveness_s=2.0, heartbeat_interval_s=0.25)
        broker = fed.start_broker(ctx, config)
        crew = [fed.mlp_worker(ctx, broker.endpoint, i, n=120, slowdown=(slow or {}).get(i, 1.0), delay_s=delay_s)
                for i in range(workers)]

        async def serve(i: int, w: Any) -> Any:
            if kill and i in kill:
                try:
                    return await asyncio.wait_for(w.serve(), kill[i])
                except TimeoutError:  # cancelled: its socket is closed, the broker hears nothing more
                    return None
            return await w.serve()

        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(broker.run())
            for i, w in enumerate(crew):
                tg.create_task(serve(i, w))
        return run.result(), crew

    summary, crew = fed.run_async(scenario(), timeout_s=80)
    return summary, crew, fed.read_metrics(state_dir)


@pytest.mark.timeout(90)
def test_async_lets_fast_workers_run_ahead_of_a_straggler(fed: Any, ctx: zmq.asyncio.Context,
                                                          state_dir: Path) -> None:
    # Each update costs at least 50 ms of emulated device time, so the 8x slowdown dominates the messaging overhead
    # even on a loaded machine.
    summary, crew, metrics = clock_run(fed, ctx, state_dir, "async", versions=24, slow={0: 8.0}, delay_s=0.05)
    assert summary["version"] == 24 and [m["round"] for m in metrics] == list(range(1, 25))
    slow, fast = crew[0].rounds_trained, min(w.rounds_trained for w in crew[1:])
    assert fast >= 2 * max(slow, 1), (slow, [w.rounds_trained for w in crew])
    assert max(max(m["staleness"]) for m in metrics) >= 1  # the straggler's updates arrive late ...
    assert metrics[-1]["test_loss"] < metrics[2]["test_loss"]  # ... and the model still improves
    assert metrics[-1]["max_clock"] - metrics[-1]["min_clock"] >= 2


@pytest.mark.timeout(90)
def test_ssp_zero_keeps_every_worker_in_lock_step(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    _, crew, metrics = clock_run(fed, ctx, state_dir, "ssp:0", versions=12, slow={0: 3.0})
    for m in metrics:
        assert m["max_clock"] - m["min_clock"] <= 1, m  # a worker that pushed waits for the others
    counts = [w.rounds_trained for w in crew]
    assert max(counts) - min(counts) <= 1, counts


@pytest.mark.timeout(90)
def test_ssp_bound_holds_pulls_and_reports_them(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    _, crew, metrics = clock_run(fed, ctx, state_dir, "ssp:1", versions=15, slow={0: 6.0})
    assert all(m["max_clock"] - m["min_clock"] <= 2 for m in metrics)
    assert max(m["held_pulls"] for m in metrics) >= 1  # fast workers were held for the straggler


@pytest.mark.timeout(90)
def test_async_hard_limit_refuses_old_updates_and_never_applies_one(fed: Any, ctx: zmq.asyncio.Context,
                                                                    state_dir: Path) -> None:
    _, _, metrics = clock_run(fed, ctx, state_dir, "async", versions=20, workers=4, slow={0: 4.0},
                              max_staleness=1)
    assert all(t <= 1 for m in metrics for t in m["staleness"]), [m["staleness"] for m in metrics]
    assert metrics[-1]["refused_stale_total"] >= 1  # the straggler's updates were too old


@pytest.mark.timeout(90)
def test_a_killed_worker_does_not_hang_ssp(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    summary, crew, metrics = clock_run(fed, ctx, state_dir, "ssp:1", versions=40, kill={0: 1.0}, delay_s=0.2)
    assert summary["version"] == 40
    assert crew[0].rounds_trained < min(w.rounds_trained for w in crew[1:])
    # The dead one expired (liveness 2 s) and its clock stopped counting: the others ran on past it.
    dead_clock = crew[0].rounds_trained
    assert any(m["connected"] == 2 for m in metrics), [m["connected"] for m in metrics]
    assert metrics[-1]["min_clock"] > dead_clock + 1
    assert math.isfinite(metrics[-1]["min_clock"])

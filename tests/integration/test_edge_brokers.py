"""Edge brokers through real sockets: a root, two edges (each a Broker with the EdgeDriver plus an EdgeUplink
worker of the root) and four numpy-MLP workers compute the same global model as the same four workers on one
broker — one full-batch round of FedSGD, FedAvg and DGC (sparse merged as sparse) — while the root receives one
push per edge instead of one per worker. Refusals at the edge and a strategy an edge cannot merge end the edge in
one line."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.edge.driver import EdgeDriver
from fedctl.edge.link import EdgeLink
from fedctl.edge.run import EDGE_ROUNDS, Upstream, check_edge, run_edge
from fedctl.errors import ConfigError
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig
from fedctl.wire import constants as C

ROUNDS = 2
CASES = {
    "fedsgd": ("fedsgd", TaskConfig(1, 0, 0.5)),
    "fedavg": ("fedavg", TaskConfig(2, 0, 0.3)),
    "dgc": ("dgc", TaskConfig(1, 0, 0.3, options={"sparsity": 0.9, "sample_ratio": 1.0})),  # (exact top-k)
}


def _root_config(fed: Any, state: Path, strategy: str, task: TaskConfig, workers: int) -> Any:
    return fed.broker_config(state, strategy=strategy, task=task, rounds=ROUNDS, sync=SyncConfig(1.0, workers, 20.0))


def _edge(fed: Any, ctx: Any, state: Path, strategy: str, task: TaskConfig, root: str, name: str) -> tuple[Any, Any]:
    config = fed.broker_config(state, strategy=strategy, task=task, rounds=EDGE_ROUNDS,
                               sync=SyncConfig(1.0, 2, 20.0))
    check_edge(config, evaluates=False)
    link = EdgeLink()
    broker = Broker(config, None, ctx=ctx, driver=partial(EdgeDriver, link=link))
    return broker, run_edge(broker, link, Upstream(root, edge_id=name, connect_timeout_s=10.0), ctx)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_levels_compute_the_flat_global_model(fed: Any, ctx: Any, tmp_path: Path, case: str) -> None:
    strategy, task = CASES[case]

    async def flat() -> tuple[dict[str, np.ndarray], int]:
        broker = fed.start_broker(ctx, _root_config(fed, tmp_path / "flat", strategy, task, 4))
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, n=120 + 60 * i) for i in range(4)]  # (unequal n_k)
        await fed.run_federation(broker, workers)
        return dict(broker.store.weights), broker.core.bytes_in_by_type.get(C.PUSH, 0)

    async def two_level() -> tuple[dict[str, np.ndarray], int, list[Any]]:
        root = fed.start_broker(ctx, _root_config(fed, tmp_path / "root", strategy, task, 2))
        edges = [_edge(fed, ctx, tmp_path / f"edge{e}", strategy, task, root.endpoint, f"edge{e}") for e in range(2)]
        workers = [fed.mlp_worker(ctx, edges[i // 2][0].endpoint, i, n=120 + 60 * i) for i in range(4)]
        results = await fed.run_federation(root, workers, [run for _, run in edges])
        return dict(root.store.weights), root.core.bytes_in_by_type.get(C.PUSH, 0), results

    flat_w, flat_in = fed.run_async(flat(), 60)
    two_w, two_in, results = fed.run_async(two_level(), 60)
    for name in flat_w:
        np.testing.assert_allclose(two_w[name], flat_w[name], rtol=2e-5, atol=1e-6, err_msg=name)
    initial = init_params(get_model("mlp"), 7)
    assert all(not np.allclose(two_w[k], initial[k]) for k in ("fc1.weight", "fc3.weight")), "the rounds trained"
    edge_summaries = results[-2:]
    assert [s["upstream"]["rounds_trained"] for s in edge_summaries] == [ROUNDS, ROUNDS]
    assert all(s["rounds"] == ROUNDS for s in edge_summaries), "each edge ran one round per parent round"
    if case != "dgc":  # dense: the root receives 2 pushes of one model each per round instead of 4
        assert two_in == pytest.approx(flat_in / 2, rel=0.05)
    else:  # sparse: the edges forward the union of their workers' top-k, sparse (float32: no residual to round into)
        dense = sum(w.nbytes for w in flat_w.values())
        assert two_in < 0.5 * ROUNDS * 2 * dense
    records = fed.read_metrics(tmp_path / "edge0")
    assert [r["parent_round"] for r in records] == list(range(1, ROUNDS + 1))
    assert all(r["participants"] == 2 and r["forwarded"] for r in records)


def test_the_root_sees_each_edge_as_one_worker_with_its_workers_examples(fed: Any, ctx: Any, tmp_path: Path) -> None:
    strategy, task = CASES["fedavg"]

    async def main() -> dict[str, Any]:
        root = fed.start_broker(ctx, _root_config(fed, tmp_path / "root", strategy, task, 1))
        broker, run = _edge(fed, ctx, tmp_path / "edge", strategy, task, root.endpoint, "edge-a")
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, n=100 + 50 * i) for i in range(2)]
        seen: dict[str, Any] = {}

        async def watch() -> None:
            while "edge-a" not in seen:
                record = root.registry.get("edge-a")
                if record is not None:
                    seen["edge-a"] = (record.backend, record.num_examples)
                await asyncio.sleep(0.01)

        await fed.run_federation(root, workers, [run, watch()])
        return seen

    seen = fed.run_async(main(), 60)
    assert seen["edge-a"] == ("edge", 100 + 150)


@pytest.mark.parametrize("overrides, message", [
    ({"policy": "async"}, "synchronously"),
    ({"secure_aggregation": True, "sync": SyncConfig(1.0, 3, 20.0)}, "in the clear"),
    ({"dp_noise_multiplier": 1.0}, "in the clear"),
    ({"target_accuracy": 0.9}, "evaluates nothing"),
    ({"strategy": "scaffold"}, "cannot run behind edge brokers"),
    ({"strategy": "ssgd", "task": TaskConfig(options={"combine": "mean-sent"})}, "mean-sent"),
])
def test_what_an_edge_cannot_do_is_refused_at_start(fed: Any, tmp_path: Path, overrides: dict[str, Any],
                                                     message: str) -> None:
    config = fed.broker_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_edge(config, evaluates=False)
    assert err.value.fix


def test_an_edge_started_with_another_strategy_than_its_parent_stops_in_one_line(fed: Any, ctx: Any,
                                                                                 tmp_path: Path) -> None:
    async def main() -> None:
        root = fed.start_broker(ctx, _root_config(fed, tmp_path / "root", "fedavg", TaskConfig(1, 0, 0.1), 1))
        broker, run = _edge(fed, ctx, tmp_path / "edge", "fedsgd", TaskConfig(1, 0, 0.1), root.endpoint, "e")
        workers = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(2)]
        tasks = [asyncio.ensure_future(c) for c in (root.run(), *(w.serve() for w in workers))]
        try:
            await run
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with pytest.raises(ConfigError, match="parent runs strategy 'fedavg'") as err:
        fed.run_async(main(), 60)
    assert "--strategy fedavg" in err.value.fix

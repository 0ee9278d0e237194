"""The Python API end to end in one process, on real loopback sockets and the bundled MNIST sample: partition,
simulate a user task, export its model and load it into the task's module, a background broker with two joins from
threads (one on arrays), stopping a broker, a busy port, and a simulation called where an event loop runs (Jupyter).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import fedctl
from fedctl.errors import ConfigError, TransportError

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]

TASK = """
    from torch import nn

    name = "tiny-mnist"

    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
"""


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> fedctl.Partition:
    """The bundled MNIST sample in 3 IID shards (plus test.npz), written through the API."""
    return fedctl.partition(tmp_path_factory.mktemp("api") / "shards", dataset="mnist-sample", clients=3, seed=0)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "tiny.py"
    path.write_text(textwrap.dedent(TASK))
    return path


def _fedctl_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fedctl-")]


def _bindable(endpoint: str) -> bool:
    """Whether a fresh socket can bind ``endpoint`` (the broker's socket is closed)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(endpoint)
        return True
    except zmq.ZMQError:
        return False
    finally:
        sock.close(0)
        ctx.term()


def test_partition_gives_the_shards(partition: fedctl.Partition) -> None:
    assert partition.shards == ["shard0", "shard1", "shard2"]
    assert (Path(partition) / "test.npz").is_file() and partition.manifest["clients"] == 3


def test_simulate_a_user_task_then_export_its_model(partition: fedctl.Partition, task: Path,
                                                   tmp_path: Path) -> None:
    seen: list[dict] = []
    run = fedctl.simulate(task=task, data=partition, rounds=2, lr=0.05, state_dir=tmp_path / "run", parallel=1,
                          on_round=seen.append)
    assert run.rounds == 2 and run.version == 2 and run.state_dir == tmp_path / "run"
    assert [m["round"] for m in run.metrics] == [1, 2] == [m["round"] for m in seen]
    assert run.metrics[-1]["test_accuracy"] == run.test_accuracy and (run.test_accuracy or 0) > 0.7, run.metrics
    assert run.summary["workers"] == 3 and run.wall_s is not None and (run.state_dir / "simulate.json").is_file()
    assert fedctl.Run.from_state_dir(run.state_dir).metrics == run.metrics

    import torch

    exported = fedctl.export(run.state_dir, format="pt", best=True, task=task, out=f"{tmp_path}/out/")
    assert exported.path == tmp_path / "out" / "tiny-mnist-best-round2.pt" and exported.round == 2
    assert exported.best == run.best and exported.best is not None and exported.best["round"] == 2
    from fedctl.tasks import load_task

    module = load_task(str(task)).model()  # type: ignore[misc]
    module.load_state_dict(torch.load(exported), strict=True)  # path-like
    with np.load(run.state_dir / "model-best.npz") as npz:
        assert np.array_equal(module.state_dict()["3.bias"].numpy(), npz["3.bias"])
    with pytest.raises(ConfigError, match="suffix of --format npz"):
        fedctl.export(run.state_dir, format="pt", out=tmp_path / "m.npz")


def test_a_background_broker_and_two_joins_from_threads(partition: fedctl.Partition, tmp_path: Path) -> None:
    from fedctl.data.shards import load_shard

    shard = load_shard(Path(partition), "shard2")  # normalised images [n, 1, 28, 28], as a data holder has them
    arrays = (shard.x, shard.y)
    results: dict[str, fedctl.JoinResult] = {}
    errors: list[BaseException] = []

    def join(name: str, **kwargs: Any) -> None:
        try:
            results[name] = fedctl.join(connect=broker.endpoint, threads=1, connect_timeout=30, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            errors.append(err)

    with fedctl.serve_background(bind="tcp://127.0.0.1:*", rounds=2, min_workers=2, state_dir=tmp_path / "run",
                                 eval_data="test", data_dir=partition, heartbeat_interval=0.5,
                                 liveness=5.0) as broker:
        assert broker.endpoint is not None and broker.endpoint.startswith("tcp://127.0.0.1:")
        threads = [threading.Thread(target=join, args=("shard", ), kwargs={"data": "shard0", "data_dir": partition}),
                   threading.Thread(target=join, args=("arrays", ), kwargs={"data": arrays, "holdout": 0})]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        run = broker.wait(60)
    assert run.rounds == 2 and [m["participants"] for m in run.metrics] == [2, 2] and (run.test_accuracy or 0) > 0.7
    assert broker.metrics == run.metrics
    assert {r.rounds_trained for r in results.values()} == {2} and results["arrays"].worker_id.startswith("arrays")
    assert _bindable(broker.endpoint) and not _fedctl_threads(), "sockets closed, threads ended"


def test_stopping_a_background_broker_closes_its_socket(tmp_path: Path) -> None:
    broker = fedctl.serve_background(bind="tcp://127.0.0.1:*", rounds=3, state_dir=tmp_path / "run")
    assert not broker.done() and broker.endpoint is not None
    assert not _bindable(broker.endpoint)
    broker.stop(timeout=30)
    assert broker.done() and _bindable(broker.endpoint) and not _fedctl_threads()
    with pytest.raises(CancelledError):
        broker.wait()
    assert not (tmp_path / "run").exists(), "a broker stopped before its first round leaves no empty state dir"


def test_a_busy_endpoint_is_refused_at_start(tmp_path: Path) -> None:
    with fedctl.serve_background(bind="tcp://127.0.0.1:*", state_dir=tmp_path / "a") as first:
        assert first.endpoint is not None
        with pytest.raises(TransportError, match="already in use"):
            fedctl.serve_background(bind=first.endpoint, state_dir=tmp_path / "b")
        with pytest.raises(TransportError, match="already in use"):
            fedctl.serve(bind=first.endpoint, state_dir=tmp_path / "c")
    assert not _fedctl_threads() and not (tmp_path / "b").exists()


def test_simulate_where_an_event_loop_runs(partition: fedctl.Partition, tmp_path: Path) -> None:
    async def cell() -> fedctl.Run:  # a notebook cell: the kernel's loop runs in this thread
        return fedctl.simulate(data=partition, rounds=1, state_dir=tmp_path / "run", parallel=1, workers=2)

    run = asyncio.run(cell())
    assert run.rounds == 1 and run.summary["workers"] == 2 and not _fedctl_threads()


def test_the_examples_of_docs_python_api_run(tmp_path: Path) -> None:
    """Every ```python block of docs/python-api.md, in order, in an empty directory (a block whose first line is
    ``# NAME.py`` is written as that file; ```python no-run blocks are left out)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python-api.md").read_text(), re.S)
    script = []
    for block in blocks:
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w-]+\.py", first):
            (tmp_path / first[2:]).write_text(block)
        else:
            script.append(block)
    assert len(script) >= 6
    (tmp_path / "examples.py").write_text("\n".join(script))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--rounds must be at least 1, got 0" in done.stdout and "tcp://127.0.0.1:" in done.stdout

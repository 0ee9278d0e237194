"""``fedctl simulate --ray`` on a local Ray cluster the test starts (``ray start --head``) and stops: the virtual
workers in Ray actors (two groups) train the same accuracy curve, bit for bit, as the one-process simulation with
the same seed; without a cluster, or with a wrong address, it is one line."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fedctl

pytest.importorskip("ray", reason="fedctl[ray] is not installed (make install installs it)")
pytestmark = pytest.mark.timeout(400)
RAY = Path(sys.executable).with_name("ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster on this machine, stopped afterwards; its address."""
    port = _port()
    temp = tmp_path_factory.mktemp("ray")
    started = subprocess.run([str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2",
                              "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)],
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _curve(state: Path) -> list[tuple[float, float]]:
    lines = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(m["test_accuracy"], m["train_loss"]) for m in lines]


def test_ray_actors_train_the_one_process_curve(cluster: str, tmp_path: Path) -> None:
    common = ("simulate", "--dataset", "mnist-sample", "--clients", "10", "--rounds", "3", "--fraction", "0.5",
              "--min-workers", "10", "--backend", "torch", "--seed", "1")
    local = fedctl(tmp_path, *common, "--state-dir", str(tmp_path / "local"), timeout=200)
    assert local.returncode == 0, local.stderr
    on_ray = fedctl(tmp_path, *common, "--state-dir", str(tmp_path / "ray"), "--ray", cluster,
                    "--ray-workers-per-actor", "5", timeout=300)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "in 2 Ray actors" in on_ray.stdout, on_ray.stdout
    assert _curve(tmp_path / "ray") == _curve(tmp_path / "local")
    assert len(_curve(tmp_path / "ray")) == 3 and _curve(tmp_path / "ray")[-1][0] > 0.85
    summary = json.loads((tmp_path / "ray" / "simulate.json").read_text())
    assert summary["ray"]["actors"] == 2 and summary["workers"] == 10


def test_no_cluster_at_the_address_is_one_line(tmp_path: Path) -> None:
    run = fedctl(tmp_path, "simulate", "--dataset", "mnist-sample", "--clients", "4", "--rounds", "1",
                 "--state-dir", str(tmp_path / "s"), "--ray", f"127.0.0.1:{_port()}", timeout=200)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "no Ray cluster at --ray" in run.stderr and "ray start --head" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "s").exists() and not (tmp_path / "partitions").exists(), "refused before anything"

"""examples/fashion-cnn-batchnorm: its run.sh starts `fedctl serve --task` with a PyTorch and an MXNet worker of the
same CNN (BatchNorm, dropout, 1 M parameters) and evaluates the result with evaluate.py.

The smoke test runs one round on 2,000 examples per worker of the MNIST sample bundled with fedctl (the same shapes as
Fashion-MNIST), with FedBN. The slow tests are the README's runs on Fashion-MNIST (Debian's dataset-fashion-mnist):
both BatchNorm choices, each at least 0.88 test accuracy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fedctl_env

EXAMPLE = REPO / "examples" / "fashion-cnn-batchnorm"
FASHION = Path("/usr/share/datasets/fashion-mnist")
STATISTICS = re.compile(r"with (shard\d)'s statistics: ([0-9.]+)")

pytest.importorskip("torch")
try:
    import mxnet  # noqa: F401 - MXNet 1.9 fails on numpy>=1.24 with AttributeError, not ImportError
except (ImportError, OSError, AttributeError):
    pytest.skip("mxnet is not usable here", allow_module_level=True)


def run_example(tmp: Path, batchnorm: str, timeout: float, **knobs: str) -> tuple[str, list[dict], Path]:
    """run.sh in ``tmp``: its stdout, the broker's metrics records and the run directory."""
    out = tmp / f"fashion-{batchnorm}"
    env = {**fedctl_env(tmp), "FEDCTL": f"{sys.executable} -m fedctl", "PYTHON": sys.executable, **knobs}
    run = subprocess.run(["bash", str(EXAMPLE / "run.sh"), batchnorm, str(out)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(out.glob("*.log")))
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{logs}"
    metrics = [json.loads(line) for line in (out / "state" / "metrics.jsonl").read_text().splitlines()]
    broker_log = (out / "serve.log").read_text()
    assert "(torch, " in broker_log and "(mxnet, " in broker_log, "a PyTorch and an MXNet worker joined"
    return run.stdout, metrics, out


@pytest.mark.timeout(180)
def test_smoke_one_round_torch_and_mxnet_fedbn_on_the_mnist_sample(tmp_path: Path) -> None:
    stdout, metrics, out = run_example(tmp_path, "local", 170, DATASET="mnist-sample", CLIENTS="5", ROUNDS="1")
    assert [m["round"] for m in metrics] == [1] and metrics[0]["participants"] == 2
    saved = json.loads((out / "state" / "state.json").read_text())
    names = [p["name"] for p in saved["spec"]["params"]]
    assert len(names) == 14 and not any("running" in n for n in names), "FedBN: no statistics in the run's model"
    accuracies = dict(STATISTICS.findall(stdout))
    assert set(accuracies) == {"shard0", "shard1"}, stdout
    assert all(float(a) > 0.8 for a in accuracies.values()), stdout  # one epoch on 2 x 2,000 digits


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("batchnorm", ["aggregated", "local"])
def test_fashion_mnist_reaches_88_percent_with_a_torch_and_an_mxnet_worker(tmp_path: Path, batchnorm: str) -> None:
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (make fashion-mnist)")
    stdout, metrics, _ = run_example(tmp_path, batchnorm, 880)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    recalibrated = [float(a) for _, a in STATISTICS.findall(stdout)]
    assert len(recalibrated) == 2 and min(recalibrated) >= 0.88, stdout
    if batchnorm == "aggregated":  # the broker's own test evaluation uses the averaged statistics
        assert metrics[-1]["test_accuracy"] >= 0.88, metrics[-1]

"""``fedctl partition`` run as a subprocess: output directory, summary line, usage errors and exit codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedctl.data.shards import list_shards, load_shard

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def _fedctl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCTL_")}
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "cache"), FEDCTL_PLAIN_LOGS="1")
    return subprocess.run([sys.executable, "-m", "fedctl", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=100, check=False)


def test_partition_non_iid(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    run = _fedctl(tmp_path, "partition", "--dataset", "mnist-sample", "--clients", "10",
                  "--shards-per-client", "2", "--seed", "1", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "10 clients" in run.stdout and "1000 examples per client" in run.stdout and str(out) in run.stdout
    assert list_shards(out) == [f"shard{k}" for k in range(10)]
    assert load_shard(out, "shard9").num_examples == 1000


@pytest.mark.parametrize("flags", [["--iid", "--shards-per-client", "2"], []])
def test_exactly_one_scheme(tmp_path: Path, flags: list[str]) -> None:
    run = _fedctl(tmp_path, "partition", "--dataset", "mnist-sample", *flags, "--out", str(tmp_path / "o"))
    assert run.returncode == 2
    assert "exactly one of --iid and --shards-per-client N, --dirichlet ALPHA, --quantity-skew BETA" in run.stderr
    assert not (tmp_path / "o").exists()


def test_missing_dataset_is_one_line_with_fix(tmp_path: Path) -> None:
    run = _fedctl(tmp_path, "partition", "--dataset", "mnist", "--source-dir", str(tmp_path / "empty"), "--iid",
                  "--out", str(tmp_path / "o"))
    assert run.returncode == 3  # DataError
    assert "Traceback" not in run.stderr
    assert "not found" in run.stderr and "--download" in run.stderr


def test_partition_own_csv_dirichlet(tmp_path: Path) -> None:
    """A data holder's CSV, Dirichlet label skew: shards a worker loads, the histogram printed and in the manifest."""
    rng = np.random.default_rng(0)
    with open(tmp_path / "patients.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["age", "pressure", "diagnosis", "weight"])
        for i in range(400):
            writer.writerow([f"{rng.uniform(20, 80):.1f}", f"{rng.normal(120, 15):.1f}",
                             ("healthy", "flu", "covid", "cold")[i % 4], f"{rng.normal(70, 10):.1f}"])
    out = tmp_path / "shards"
    run = _fedctl(tmp_path, "partition", "--input", "patients.csv", "--label-column", "diagnosis", "--clients", "5",
                  "--dirichlet", "0.5", "--seed", "3", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "patients.csv: 5 clients (Dirichlet label skew, alpha 0.5)" in run.stdout
    assert "40 test examples" in run.stdout and str(out) in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "fedctl-partition/2" and manifest["classes"] == ["cold", "covid", "flu", "healthy"]
    assert manifest["feature_shape"] == [3] and manifest["alpha"] == 0.5
    table = run.stdout.splitlines()
    header = next(line for line in table if "examples" in line)
    assert all(name in header for name in ("shard", "cold", "covid", "flu", "healthy"))
    for entry in manifest["shards"]:
        row = next(line for line in table if f" {entry['name']} " in line)
        assert [int(n) for n in row.replace("│", " ").split()[1:]] == [entry["num_examples"],
                                                                       *entry["label_histogram"]]
    assert sum(s["num_examples"] for s in manifest["shards"]) == 360 and min(
        s["num_examples"] for s in manifest["shards"]) >= 1
    assert list_shards(out) == [f"shard{k}" for k in range(5)]
    shard = load_shard(out, "shard4")
    assert shard.x.shape == (manifest["shards"][4]["num_examples"], 3) and shard.x.dtype == np.float32
    assert 20 <= float(shard.x[:, 0].min()) and float(shard.x[:, 0].max()) <= 80  # features as they are


def test_partition_input_with_dataset_options_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2)), y=np.arange(10) % 2)
    run = _fedctl(tmp_path, "partition", "--input", "d.npz", "--source-dir", str(tmp_path), "--iid", "--clients", "2",
                  "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "--source-dir, which is for a registered dataset" in run.stderr
    assert not (tmp_path / "o").exists()


def test_partition_mnist_quantity_skew(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    run = _fedctl(tmp_path, "partition", "--dataset", "mnist-sample", "--clients", "8", "--quantity-skew", "0.5",
                  "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "8 clients (quantity skew, beta 0.5)" in run.stdout and "2000 test examples" in run.stdout
    sizes = [load_shard(out, k).num_examples for k in range(8)]
    assert sum(sizes) == 10_000 and min(sizes) >= 1 and max(sizes) > 2 * min(sizes)

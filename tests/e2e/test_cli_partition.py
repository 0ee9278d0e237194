"""``fedctl partition`` run as a subprocess: output directory, summary line, usage errors and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    assert "exactly one of --iid and --shards-per-client" in run.stderr
    assert not (tmp_path / "o").exists()


def test_missing_dataset_is_one_line_with_fix(tmp_path: Path) -> None:
    run = _fedctl(tmp_path, "partition", "--dataset", "mnist", "--source-dir", str(tmp_path / "empty"), "--iid",
                  "--out", str(tmp_path / "o"))
    assert run.returncode == 3  # DataError
    assert "Traceback" not in run.stderr
    assert "not found" in run.stderr and "--download" in run.stderr

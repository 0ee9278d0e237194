"""User mistakes end in one ``error: cause — fix`` line on stderr and the error's exit code, never a traceback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import LOOPBACK_ANY, Launcher, fedctl

pytestmark = pytest.mark.timeout(120)

# Exit codes of fedctl.errors (and click's usage errors).
USAGE, CONFIG, DATA, TRANSPORT = 2, 2, 3, 7


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a FedctlError, checked to be the last line and to carry a fix."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert " — " in errors[0], f"no fix after the cause: {errors[0]}"
    return errors[0]


def test_missing_shard_lists_the_available_ones(tmp_path: Path, partition_dir: Path) -> None:
    run = fedctl(tmp_path, "join", "--data", "shard99", "--data-dir", str(partition_dir), "--backend", "torch")
    assert run.returncode == DATA
    line = error_line(run.stderr)
    assert "shard99" in line and "shard0" in line and "shard4" in line and "test" in line, line


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    run = fedctl(tmp_path, "join", "--data", "shard0", "--data-dir", str(missing), "--backend", "torch")
    assert run.returncode == DATA
    line = error_line(run.stderr)
    assert str(missing) in line and "fedctl partition" in line, line


def test_missing_eval_data_fails_before_serving(tmp_path: Path, partition_dir: Path) -> None:
    run = fedctl(tmp_path, "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "s"),
                 "--eval-data", "validation", "--data-dir", str(partition_dir))
    assert run.returncode == DATA
    assert "'validation'" in error_line(run.stderr)


@pytest.mark.parametrize("args, option", [
    (("serve", "--model", "resnet"), "--model"),
    (("join", "--data", "shard0", "--backend", "caffe"), "--backend"),
    (("serve", "--strategy", "fednova"), "--strategy"),  # (fedprox exists now)
])
def test_unknown_choice_is_a_usage_error(tmp_path: Path, args: tuple[str, ...], option: str) -> None:
    run = fedctl(tmp_path, *args)
    assert run.returncode == USAGE
    line = error_line(run.stderr)
    assert f"invalid value for '{option}'" in line and args[-1] in line and "--help" in line, line


def test_fraction_out_of_range(tmp_path: Path) -> None:
    run = fedctl(tmp_path, "serve", "--fraction", "1.5", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "s"))
    assert run.returncode == CONFIG
    line = error_line(run.stderr)
    assert "1.5" in line and "--fraction" in line, line


@pytest.mark.parametrize("args", [
    ("serve", "--bind", "tcp://127.0.0.1:99999"),  # libzmq would silently bind port 99999 % 65536
    ("serve", "--bind", "tcp://127.0.0.1"),
    ("join", "--connect", "tcp://127.0.0.1:*", "--data", "shard0"),
    ("join", "--connect", "127.0.0.1:5555", "--data", "shard0"),
])
def test_bad_endpoint(tmp_path: Path, partition_dir: Path, args: tuple[str, ...]) -> None:
    extra = ("--state-dir", str(tmp_path / "s")) if args[0] == "serve" else ("--data-dir", str(partition_dir))
    run = fedctl(tmp_path, *args, *extra)
    assert run.returncode == CONFIG
    assert args[2] in error_line(run.stderr)


def test_port_in_use(tmp_path: Path, spawn: Launcher) -> None:
    first = spawn("serve-1", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "s1"))
    endpoint = first.wait_endpoint()
    run = fedctl(tmp_path, "serve", "--bind", endpoint, "--state-dir", str(tmp_path / "s2"))
    assert run.returncode == TRANSPORT
    line = error_line(run.stderr)
    assert "already in use" in line and endpoint in line and "--bind" in line, line
    assert first.popen.poll() is None, first.describe()  # the first broker is unharmed


def test_broker_unreachable(tmp_path: Path, partition_dir: Path) -> None:
    started = time.monotonic()
    run = fedctl(tmp_path, "join", "--connect", "tcp://127.0.0.1:1", "--connect-timeout", "3", "--data", "shard0",
                 "--data-dir", str(partition_dir), "--backend", "torch")
    assert run.returncode == TRANSPORT
    line = error_line(run.stderr)
    assert "tcp://127.0.0.1:1" in line and "fedctl serve" in line and "--connect-timeout" in line, line
    # Startup (PyTorch import) plus about 3 s of trying, not the default 60 s.
    assert time.monotonic() - started < 30


def test_partition_with_both_schemes(tmp_path: Path) -> None:
    out = tmp_path / "o"
    run = fedctl(tmp_path, "partition", "--dataset", "mnist-sample", "--iid", "--shards-per-client", "2",
                 "--out", str(out))
    assert run.returncode == USAGE
    assert "exactly one of --iid and --shards-per-client" in error_line(run.stderr)
    assert not out.exists()

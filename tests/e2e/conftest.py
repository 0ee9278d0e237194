"""E2E fixtures: the ``fedctl`` CLI in real subprocesses, a partition of the bundled sample, process cleanup.

Every process writes stdout/stderr to files under the test's tmp dir (no pipes to fill up and block), the broker
binds ``tcp://127.0.0.1:*`` and its endpoint is read from its log line (no racy free-port guessing), and every
process a test started is killed at teardown if it is still running, so a failing test never leaks a broker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ENDPOINT = re.compile(r"broker on (tcp://[^\s:]+:\d+)")
LOOPBACK_ANY = "tcp://127.0.0.1:*"


def fedctl_env(tmp: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: no inherited FEDCTL_* options, plain logs, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCTL_")}
    env.update(PYTHONPATH=str(REPO), FEDCTL_PLAIN_LOGS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               XDG_CACHE_HOME=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    return env


def fedctl(tmp: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``fedctl ARGS`` to completion in ``tmp``; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "fedctl", *args], cwd=tmp, env=fedctl_env(tmp),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A test run started in the background (nohup, `&`)
    inherits SIGINT as ignored, and the Ctrl-C tests would then see a process that cannot be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Proc:
    """One ``fedctl`` subprocess whose stdout and stderr go to files ``logs/NAME.out`` and ``logs/NAME.err``."""

    def __init__(self, name: str, args: tuple[str, ...], tmp: Path) -> None:
        self.name, self.args = name, args
        logs = tmp / "logs"
        logs.mkdir(exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen([sys.executable, "-m", "fedctl", *args], cwd=tmp, env=fedctl_env(tmp),
                                          stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          preexec_fn=_default_sigint)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def describe(self) -> str:
        """Exit status and the tail of both streams, for assertion messages."""
        tail = "\n".join(self.stderr.splitlines()[-25:])
        return (f"[{self.name}] fedctl {' '.join(self.args)}\n  exit {self.popen.returncode}\n"
                f"  stdout: {self.stdout[-2000:]!r}\n  stderr tail:\n{tail}")

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test (after killing the process) if it runs longer than ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            pytest.fail(f"{self.name} did not exit within {timeout:g} s\n{self.describe()}")

    def wait_endpoint(self, timeout: float = 60.0) -> str:
        """The endpoint a broker bound, parsed from its 'broker on tcp://HOST:PORT' log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ENDPOINT.search(self.stderr)
            if found:
                return found.group(1)
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited before logging its endpoint\n{self.describe()}")
            time.sleep(0.05)
        pytest.fail(f"{self.name} logged no endpoint within {timeout:g} s\n{self.describe()}")


class Launcher:
    """Starts ``fedctl`` subprocesses for one test and kills the survivors at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def __call__(self, name: str, *args: str) -> Proc:
        proc = Proc(name, args, self.tmp)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> list[str]:
        survivors = [p.name for p in self.procs if p.popen.poll() is None]
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(timeout=10)
        return survivors


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Launcher]:
    """``spawn(name, *fedctl_args) -> Proc``; processes still running when the test ends are killed."""
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.cleanup()


@pytest.fixture(scope="session")
def partition_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled MNIST sample cut into 5 IID shards of 2,000 examples (plus test.npz), once per session."""
    tmp = tmp_path_factory.mktemp("partition")
    out = tmp / "shards"
    run = fedctl(tmp, "partition", "--dataset", "mnist-sample", "--clients", "5", "--iid", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.glob("*.npz")) == [f"shard{i}.npz" for i in range(5)] + ["test.npz"]
    return out


def read_metrics(state_dir: Path) -> list[dict[str, Any]]:
    """The complete records of ``state_dir/metrics.jsonl`` (a line still being appended is left out)."""
    path = state_dir / "metrics.jsonl"
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]

"""Whole runs of the CLI in real processes: ``fedctl serve`` + ``fedctl join`` workers over loopback TCP.

A mixed PyTorch/MXNet FedAvg run, a FedSGD run, a run that loses a SIGKILLed worker mid-run, and ``fedctl demo``.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import LOOPBACK_ANY, Launcher, Proc, fedctl, read_metrics

pytestmark = pytest.mark.timeout(240)
EXIT_TIMEOUT_S = 150.0


def serve(spawn: Launcher, state_dir: Path, *options: str) -> tuple[Proc, str]:
    """Start ``fedctl serve`` on a loopback port chosen by the OS; returns the process and its endpoint."""
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(state_dir), *options)
    return broker, broker.wait_endpoint()


def join(spawn: Launcher, endpoint: str, data_dir: Path, shard: int, backend: str) -> Proc:
    return spawn(f"join-{shard}-{backend}", "join", "--connect", endpoint, "--data", f"shard{shard}",
                 "--data-dir", str(data_dir), "--backend", backend, "--threads", "1", "--connect-timeout", "60")


def wait_all(procs: list[Proc]) -> dict[str, int]:
    """Wait for every process (one shared deadline) and return the exit codes by name."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    return {p.name: p.wait(max(deadline - time.monotonic(), 1.0)) for p in procs}


def assert_all_exit_0(procs: list[Proc], codes: dict[str, int]) -> None:
    failed = [p for p in procs if codes[p.name] != 0]
    assert not failed, "\n\n".join(p.describe() for p in failed)


def test_mixed_torch_mxnet_fedavg_run(spawn: Launcher, partition_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    broker, endpoint = serve(spawn, state, "--rounds", "3", "--min-workers", "3", "--eval-data", "test",
                             "--data-dir", str(partition_dir), "--eval-backend", "torch")
    workers = [join(spawn, endpoint, partition_dir, i, backend)
               for i, backend in enumerate(["torch", "mxnet", "torch"])]
    procs = [broker, *workers]
    assert_all_exit_0(procs, wait_all(procs))

    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(m["participants"] == 3 and m["selected"] == 3 for m in metrics), metrics
    accuracy = [m["test_accuracy"] for m in metrics]
    # MLP, FedAvg E=1 B=10 η=0.1 on 3×2,000 IID examples: ~0.86 → ~0.91 over three rounds.
    assert all(later > earlier for earlier, later in itertools.pairwise(accuracy)), accuracy
    assert accuracy[-1] > 0.85, accuracy
    assert "run complete: 3 rounds" in broker.stdout and f"test accuracy {accuracy[-1]:.4f}" in broker.stdout
    assert "(mxnet," in broker.stderr and "(torch," in broker.stderr  # the broker saw both frameworks join
    for worker in workers:
        assert "done: trained 3 rounds; run finished at round 3" in worker.stdout, worker.describe()


def test_fedsgd_run(spawn: Launcher, partition_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    broker, endpoint = serve(spawn, state, "--strategy", "fedsgd", "--batch-size", "0", "--rounds", "2",
                             "--min-workers", "2")
    workers = [join(spawn, endpoint, partition_dir, 3, "torch"), join(spawn, endpoint, partition_dir, 4, "mxnet")]
    procs = [broker, *workers]
    assert_all_exit_0(procs, wait_all(procs))
    metrics = read_metrics(state)
    assert [(m["round"], m["participants"]) for m in metrics] == [(1, 2), (2, 2)]
    assert "run complete: 2 rounds" in broker.stdout


def test_run_survives_a_killed_worker(spawn: Launcher, partition_dir: Path, tmp_path: Path) -> None:
    state, rounds = tmp_path / "state", 6
    broker, endpoint = serve(spawn, state, "--rounds", str(rounds), "--min-workers", "2", "--round-timeout", "10",
                             "--liveness", "3", "--heartbeat-interval", "0.5")
    workers = [join(spawn, endpoint, partition_dir, i, "torch") for i in range(3)]

    deadline = time.monotonic() + 90
    pushed: list[Proc] = []
    while not pushed:  # kill a worker mid-run: the first one whose update was accepted
        assert time.monotonic() < deadline, "\n".join(p.describe() for p in [broker, *workers])
        assert all(p.popen.poll() is None for p in [broker, *workers]), "\n".join(p.describe() for p in workers)
        pushed = [w for w in workers if "pushed" in w.stderr]
        time.sleep(0.05)
    victim = pushed[0]
    victim.popen.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    completed_at_kill = len(read_metrics(state))
    assert completed_at_kill < rounds - 1, f"{completed_at_kill} rounds were complete at the kill"

    survivors = [broker, *(w for w in workers if w is not victim)]
    assert_all_exit_0(survivors, wait_all(survivors))
    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    # The round open at the kill may still count the victim's last update; every later one has 2 participants.
    assert all(m["participants"] == 2 for m in metrics[completed_at_kill + 1:]), metrics
    # No round waited for its 10 s deadline: a dropped connection or the 3 s liveness limit freed it.
    assert max(m["duration_s"] for m in metrics) < 9.0, [m["duration_s"] for m in metrics]


def test_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = fedctl(tmp_path, "demo", "--workers", "3", "--rounds", "3", "--out", str(out), timeout=200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    final = re.search(r"final test accuracy\W+([01]\.\d+)", run.stdout)
    assert final is not None, run.stdout
    assert float(final.group(1)) > 0.85, run.stdout
    assert re.search(r"workers exited 0\W+3/3", run.stdout), run.stdout
    assert len(read_metrics(out / "state")) == 3


def test_dgc_run_with_torch_and_mxnet_workers_that_keep_state(spawn: Launcher, partition_dir: Path,
                                                              tmp_path: Path) -> None:
    state = tmp_path / "state"
    broker, endpoint = serve(spawn, state, "--strategy", "dgc", "--batch-size", "0", "--lr", "0.05", "--rounds", "3",
                             "--min-workers", "2", "--opt", "sparsity=0.99", "--opt", "scope=model")
    workers = [spawn(f"join-dgc-{backend}", "join", "--connect", endpoint, "--data", f"shard{i}", "--data-dir",
                     str(partition_dir), "--backend", backend, "--threads", "1", "--state-dir",
                     str(tmp_path / f"worker-{backend}"))
               for i, backend in enumerate(["torch", "mxnet"])]
    procs = [broker, *workers]
    assert_all_exit_0(procs, wait_all(procs))
    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    dense_push = 109_386 * 4
    assert all(m["update_bytes_in"] < 2 * dense_push / 20 for m in metrics), [m["update_bytes_in"] for m in metrics]
    for backend in ("torch", "mxnet"):
        assert (tmp_path / f"worker-{backend}" / "worker-state.npz").is_file()


def test_strategies_command_lists_every_algorithm_and_its_options(tmp_path: Path) -> None:
    done = fedctl(tmp_path, "strategies")
    assert done.returncode == 0, done.stderr
    for name in ("fedavg", "fedsgd", "dgc", "ssgd"):
        assert name in done.stdout
    for option in ("sparsity", "momentum", "warmup_rounds", "theta_u", "theta_d", "dp_epsilon"):
        assert option in done.stdout


def test_a_bad_strategy_option_is_refused_with_its_fix(tmp_path: Path) -> None:
    done = fedctl(tmp_path, "serve", "--bind", LOOPBACK_ANY, "--strategy", "dgc", "--opt", "sparsity=1.5",
                  "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2
    assert "sparsity" in done.stderr and "in [0, 1)" in done.stderr
    done = fedctl(tmp_path, "serve", "--bind", LOOPBACK_ANY, "--strategy", "fedavg", "--opt", "sparsity=0.9",
                  "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 2 and "no option 'sparsity'" in done.stderr

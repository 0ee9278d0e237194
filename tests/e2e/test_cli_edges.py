"""Edge brokers as real processes: ``fedctl serve`` (root) ← two ``fedctl serve --upstream`` edges ← four
``fedctl join`` workers. One edge is SIGKILLed while its workers train and started again on the same address: the
root's open round fails over (its quorum is both edges) and is retried, the workers reconnect to the new edge, and
the run completes every round with both edges; the mistakes a user makes with the new options are one line each."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import LOOPBACK_ANY, Launcher, Proc, fedctl, read_metrics

pytestmark = pytest.mark.timeout(300)
ROUNDS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edge(spawn: Launcher, name: str, root: str, port: int, state: Path) -> Proc:
    return spawn(name, "serve", "--bind", f"tcp://127.0.0.1:{port}", "--upstream", root, "--edge-id", name,
                 "--min-workers", "2", "--round-timeout", "30", "--liveness", "3", "--heartbeat-interval", "0.5",
                 "--state-dir", str(state))


def join(spawn: Launcher, port: int, data_dir: Path, shard: int) -> Proc:
    return spawn(f"join-{shard}", "join", "--connect", f"tcp://127.0.0.1:{port}", "--data", f"shard{shard}",
                 "--data-dir", str(data_dir), "--backend", "torch", "--threads", "1", "--connect-timeout", "60")


def wait_for(condition: object, procs: list[Proc], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s\n" + "\n".join(p.describe() for p in procs))
        time.sleep(0.1)


def test_a_killed_edge_comes_back_and_the_run_completes(spawn: Launcher, partition_dir: Path,
                                                        tmp_path: Path) -> None:
    state = tmp_path / "root"
    root = spawn("root", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(state), "--rounds", str(ROUNDS),
                 "--min-workers", "2", "--round-timeout", "60", "--liveness", "3", "--heartbeat-interval", "0.5",
                 "--eval-data", "test", "--data-dir", str(partition_dir), "--eval-backend", "torch")
    endpoint = root.wait_endpoint()
    ports = [free_port(), free_port()]
    edges = [edge(spawn, f"edge{e}", endpoint, ports[e], tmp_path / f"edge{e}") for e in range(2)]
    workers = [join(spawn, ports[i // 2], partition_dir, i) for i in range(4)]
    everyone = [root, *edges, *workers]

    # Kill edge1 as soon as round 1 is in: the root has handed round 2 out, and edge1's workers are training it.
    wait_for(lambda: len(read_metrics(state)) >= 1, everyone, 120, "no round completed")
    edges[1].popen.send_signal(signal.SIGKILL)
    assert edges[1].wait(10) == -signal.SIGKILL
    done_at_kill = len(read_metrics(state))
    assert done_at_kill < ROUNDS, "the kill came too late to matter"
    time.sleep(4)  # the root and edge1's workers notice (liveness 3 s)
    again = edge(spawn, "edge1", endpoint, ports[1], tmp_path / "edge1")

    survivors = [root, edges[0], again, *workers]
    deadline = time.monotonic() + 200
    codes = {p.name: p.wait(max(deadline - time.monotonic(), 1.0)) for p in survivors}
    failed = [p for p in survivors if codes[p.name] != 0]
    assert not failed, "\n\n".join(p.describe() for p in failed)

    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    assert all(m["participants"] == 2 for m in metrics), [(m["round"], m["participants"]) for m in metrics]
    assert metrics[-1]["test_accuracy"] > 0.85, metrics[-1]
    assert "edge1" in again.stderr and "joining" in again.stderr
    assert "edge done" in again.stdout and "edge done" in edges[0].stdout
    for w in workers[2:]:
        assert "reconnecting" in w.stderr or "rejoin" in w.stderr.lower(), w.describe()
        assert "done:" in w.stdout, w.describe()
    # The root heard two workers, each with its two workers' examples.
    assert root.stderr.count("joined (edge, 4000 examples") == 3, root.stderr[-3000:]  # (edge1 twice)


@pytest.mark.parametrize("args, message", [
    (("--upstream", "tcp://127.0.0.1:1", "--policy", "async"), "synchronously"),
    (("--upstream", "tcp://127.0.0.1:1", "--eval-data", "mnist-sample:test"), "evaluates nothing"),
    (("--upstream", "tcp://127.0.0.1:1", "--strategy", "scaffold"), "cannot run behind edge brokers"),
    (("--upstream", "127.0.0.1:5555"), "--upstream"),
    (("--server-key", "x" * 40), "no --upstream"),
    (("--upstream", "tcp://127.0.0.1:1", "--server-key", "x" * 40), "key pair"),
])
def test_edge_mistakes_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    run = fedctl(tmp_path, "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "s"), *args, timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    [line] = [x for x in run.stderr.strip().splitlines() if x.strip()]
    assert message in line, line
    assert not (tmp_path / "s").exists(), "a refused start leaves no state dir"

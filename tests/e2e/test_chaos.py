"""Chaos: SIGKILL the broker mid-round three times and two workers once during one run, restart them with the
same commands, and check the run ends as an undisturbed one does, with every accepted update applied once.

Sync rounds acknowledge an update once the round's checkpoint holds it, so a kill mid-round leaves updates that
were received but not acknowledged: their workers must send them again. Async brokers acknowledge an update once
it is written under pending/: a kill must lose none of those."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Launcher, Proc, read_metrics

from fedctl.broker.durable import PendingStore

pytestmark = pytest.mark.timeout(420)
ROUNDS, WORKERS = 6, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(spawn: Launcher, name: str, port: int, state: Path) -> Proc:
    return spawn(name, "-v", "serve", "--bind", f"tcp://127.0.0.1:{port}", "--state-dir", str(state), "--rounds",
                 str(ROUNDS), "--min-workers", str(WORKERS), "--fraction", "1.0", "--round-timeout", "90",
                 "--liveness", "4", "--heartbeat-interval", "0.5", "--seed", "3")


def join(spawn: Launcher, name: str, port: int, data: Path, shard: int, state: Path) -> Proc:
    # --slowdown stretches each update to seconds, unequal per worker, so a kill can land between two pushes.
    return spawn(name, "join", "--connect", f"tcp://127.0.0.1:{port}", "--data", f"shard{shard}", "--data-dir",
                 str(data), "--backend", "torch", "--threads", "1", "--connect-timeout", "120", "--slowdown",
                 str(6 + 10 * shard),
                 "--state-dir", str(state / f"worker{shard}"))


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def pushed_in_round(broker: Proc, round_no: int) -> bool:
    """True once the broker accepted an update of round ``round_no`` (its ack waits for the round's checkpoint: a
    kill now is mid-round, and that worker must resend)."""
    return f"update of round {round_no} from " in broker.stderr


def kill9(proc: Proc) -> None:
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(timeout=10)


def test_broker_killed_three_times_and_two_workers_once(spawn: Launcher, partition_dir: Path,
                                                        tmp_path: Path) -> None:
    port, state = free_port(), tmp_path / "chaos"
    broker = serve(spawn, "broker-0", port, state)
    workers = {i: join(spawn, f"worker{i}-0", port, partition_dir, i, tmp_path) for i in range(WORKERS)}
    for kill, round_no in ((1, 1), (2, 3), (3, 5)):  # in rounds 1, 3 and 5, each after an update came in
        wait_for(lambda r=round_no, b=broker: pushed_in_round(b, r), 150, f"an update in round {round_no}")
        kill9(broker)
        if kill == 2:  # two workers die too, one of them possibly mid-push
            for i in (0, 1):
                kill9(workers[i])
                workers[i] = join(spawn, f"worker{i}-1", port, partition_dir, i, tmp_path)
        broker = serve(spawn, f"broker-{kill}", port, state)
    codes = {p.name: p.wait(240) for p in [broker, *workers.values()]}
    assert all(c == 0 for c in codes.values()), "\n\n".join(p.describe() for p in [broker, *workers.values()])

    metrics = read_metrics(state)
    final = json.loads((state / "state.json").read_text())
    assert final["round"] == ROUNDS and final["version"] == ROUNDS  # as an undisturbed run ends
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    journal = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
    ids = Counter((e["worker"], e["round"]) for e in journal)
    assert all(n == 1 for n in ids.values()), f"an update was applied twice: {ids}"
    per_version = Counter(e["version"] for e in journal)
    assert [per_version[v] for v in range(1, ROUNDS + 1)] == [m["participants"] for m in metrics]
    assert all(m["participants"] == WORKERS for m in metrics)
    assert PendingStore(state).load_updates() == [], "nothing left pending after the last round"
    resumed = [p.name for p in spawn.procs if p.name.startswith("broker-") and " resumed: " in p.stderr]
    assert resumed == ["broker-1", "broker-2", "broker-3"], "each restart resumed the open round"
    resent = [p.name for p in spawn.procs if p.name.startswith("worker") and "resending the update" in p.stderr]
    assert resent, "the workers whose updates were not acknowledged sent them again"


def acked_not_applied(state: Path) -> bool:
    """True while an acknowledged update waits in pending/ and no committed version holds it yet."""
    if not (state / "pending").is_dir() or not (state / "journal.jsonl").is_file():
        return False
    applied = {(e["worker"], e["round"]) for e in map(json.loads, (state / "journal.jsonl").read_text().splitlines())}
    return any((u.worker, u.round) not in applied for u in PendingStore(state).load_updates())


def test_async_broker_killed_twice_applies_every_acked_update_once(spawn: Launcher, partition_dir: Path,
                                                                   tmp_path: Path) -> None:
    """--policy async with a buffer of 3: acknowledged updates wait on disk until three have come; killing the
    broker then must lose none of them and apply none twice; the worker clocks survive the restarts."""
    port, state, versions = free_port(), tmp_path / "async", 6

    def serve_async(name: str) -> Proc:
        return spawn(name, "serve", "--bind", f"tcp://127.0.0.1:{port}", "--state-dir", str(state), "--rounds",
                     str(versions), "--policy", "async", "--buffer", "3", "--min-workers", "1", "--liveness", "4",
                     "--heartbeat-interval", "0.5", "--seed", "3")

    broker = serve_async("broker-0")
    workers = [join(spawn, f"worker{i}", port, partition_dir, i, tmp_path) for i in range(WORKERS)]
    for kill in (1, 2):
        wait_for(lambda: acked_not_applied(state), 150, "an acknowledged update not yet applied")
        kill9(broker)
        broker = serve_async(f"broker-{kill}")
    codes = {p.name: p.wait(240) for p in [broker, *workers]}
    assert all(c == 0 for c in codes.values()), "\n\n".join(p.describe() for p in [broker, *workers])

    final = json.loads((state / "state.json").read_text())
    assert final["version"] == versions
    journal = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
    ids = Counter((e["worker"], e["round"]) for e in journal)
    assert all(n == 1 for n in ids.values()), f"an update was applied twice: {ids}"
    per_worker = Counter(e["worker"] for e in journal)
    for worker, n in per_worker.items():  # clocks kept counting across restarts: ticks 1..n, no gap, no repeat
        assert sorted(e["round"] for e in journal if e["worker"] == worker) == list(range(1, n + 1)), worker
    assert PendingStore(state).load_updates() == [], "nothing left pending at the end"
    restored = [p.name for p in spawn.procs if p.name.startswith("broker-") and "restored" in p.stderr]
    assert restored, "a restart restored acknowledged updates"

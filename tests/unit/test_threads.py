"""The local worker registry (flock-held files) and the thread budgets of ``fedctl join --threads``."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedctl.errors import ConfigError
from fedctl.worker import threads
from fedctl.worker.threads import (
    CpuLoad,
    FixedThreads,
    LocalWorkers,
    SharedThreads,
    as_budget,
    default_runtime_dir,
    worker_threads,
)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "fedctl" / "workers"


def test_registry_counts_each_live_registration(registry: Path) -> None:
    first = LocalWorkers(registry)
    assert first.count() == 1  # empty (or missing) directory: this process alone
    regs = [LocalWorkers(registry) for _ in range(3)]
    for reg in regs:
        reg.register()
    assert first.count() == 3
    assert regs[0].register() == regs[0].path  # idempotent
    regs[1].close()
    assert first.count() == 2
    assert sorted(p.name for p in registry.iterdir()) == sorted(r.path.name for r in (regs[0], regs[2]) if r.path)
    with LocalWorkers(registry):
        assert first.count() == 3
    assert first.count() == 2


def test_a_killed_workers_file_stops_counting(registry: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from fedctl.worker.threads import LocalWorkers; "
            "w = LocalWorkers(Path(sys.argv[1])); w.register(); print(w.path, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(registry)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        path = Path(child.stdout.readline().strip())
        mine = LocalWorkers(registry)
        mine.register()
        assert mine.count() == 2
        child.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel drops the lock
        child.wait(timeout=10)
        assert path.exists()
        assert mine.count() == 1
        assert not path.exists()  # removed by the count that found it unlocked
    finally:
        child.kill()
        child.wait(timeout=10)


def test_half_made_and_foreign_files_are_ignored(registry: Path) -> None:
    me = LocalWorkers(registry)
    me.register()
    (registry / ".123-abcd.worker").write_text("being registered")  # hidden until locked and renamed
    (registry / "notes.txt").write_text("not a worker")
    assert me.count() == 1
    assert (registry / "notes.txt").exists()


def test_registry_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "open"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="not a private directory"):
        LocalWorkers(shared / "workers").register()


def test_registry_may_sit_in_a_sticky_directory_like_tmp(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    with LocalWorkers(tmp / "workers") as me:
        assert me.count() == 1


def test_unusable_registry_warns_and_auto_still_works(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "open"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with caplog.at_level(logging.WARNING, logger="fedctl.worker.threads"):
        budget = worker_threads("auto", {}, directory=shared / "workers")
    assert "cannot register" in caplog.text
    assert isinstance(budget, SharedThreads)
    # On an idle machine (other processes' load pinned at 0, so the test does not depend on this machine's load):
    idle = dataclasses.replace(budget, load=CpuLoad(busy_s=lambda: 0.0, own_s=lambda: 0.0, sleep=lambda _: None))
    assert idle.threads() == budget.cpus


def test_shared_threads_divide_the_cpus_and_keep_the_framework_cap(registry: Path) -> None:
    regs = [LocalWorkers(registry) for _ in range(3)]
    for reg in regs:
        reg.register()
    budget = SharedThreads(regs[0], cpus=8)
    assert budget.threads() == 2  # 8 // 3
    assert budget.threads(cap=1) == 1
    assert "at most the framework's own default" in budget.describe()
    assert budget.threads(cap=16) == 2
    assert "3 live fedctl worker(s)" in budget.describe()
    regs[2].close()
    assert budget.threads() == 4
    assert SharedThreads(regs[0], cpus=1).threads() == 1
    more = [LocalWorkers(registry) for _ in range(6)]
    for reg in more:
        reg.register()
    assert budget.threads() == 1  # 8 CPUs, 8 workers
    assert budget.last == 1


def test_worker_threads_option_and_environment(registry: Path) -> None:
    auto = worker_threads("auto", {}, directory=registry)
    assert isinstance(auto, SharedThreads) and auto.workers.path is not None and auto.load is not None
    fixed = worker_threads("3", {"OMP_NUM_THREADS": "1"}, directory=registry)
    assert isinstance(fixed, FixedThreads) and fixed.threads(cap=1) == 3 and fixed.source == "--threads 3"
    assert fixed.workers is not None and fixed.workers.path is not None  # counted by the automatic ones
    omp = worker_threads("auto", {"OMP_NUM_THREADS": "4,2"}, directory=registry)
    assert isinstance(omp, FixedThreads) and omp.threads() == 4 and omp.describe() == "4 (OMP_NUM_THREADS=4)"
    assert isinstance(worker_threads("AUTO", {"OMP_NUM_THREADS": ""}, directory=registry), SharedThreads)
    assert auto.workers.count() == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ConfigError, match="--threads"):
            worker_threads(bad, {}, directory=registry)


def test_as_budget() -> None:
    assert as_budget(None) is None
    fixed = as_budget(2)
    assert isinstance(fixed, FixedThreads) and fixed.threads() == 2
    with pytest.raises(ConfigError):
        as_budget(0)


def test_default_runtime_dir(tmp_path: Path) -> None:
    assert default_runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "fedctl" / "workers"
    fallback = default_runtime_dir({"XDG_RUNTIME_DIR": "relative/dir"})
    assert fallback.parent.name == f"fedctl-{os.getuid()}"
    assert default_runtime_dir({}) == fallback


def test_cgroup_cpu_limit(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert threads._cgroup_cpu_limit(tmp_path) == 1
    assert 1 <= threads.available_cpus() <= (os.cpu_count() or 1)


def test_count_is_cheap(registry: Path) -> None:
    regs = [LocalWorkers(registry) for _ in range(20)]
    for reg in regs:
        reg.register()
    started = time.perf_counter()
    for _ in range(50):
        assert regs[0].count() == 20
    assert (time.perf_counter() - started) / 50 < 0.05  # asked once per round, not per step


class _Busy(CpuLoad):
    """Other processes keep ``value`` CPUs busy."""

    def __init__(self, value: float | None) -> None:
        super().__init__()
        self.value = value

    def others_busy(self) -> float | None:
        return self.value


def test_shared_threads_leave_the_cpus_other_processes_use(registry: Path) -> None:
    me = LocalWorkers(registry)
    me.register()
    load = _Busy(0.1)
    budget = SharedThreads(me, cpus=8, load=load)
    assert budget.threads() == 8  # background noise does not cost a thread
    load.value = 2.9
    assert budget.threads() == 5
    assert "2.9 CPUs busy with other processes" in budget.describe()
    load.value = 3.8  # a CPU 80% busy elsewhere is not free: a descheduled thread stalls its whole team
    assert budget.threads() == 4
    load.value = 12.0
    assert budget.threads() == 1
    load.value = None  # unmeasurable: the registry alone decides
    assert budget.threads() == 8
    load.value = 0.0
    others = [LocalWorkers(registry) for _ in range(3)]
    for reg in others:
        reg.register()
    assert budget.threads() == 2  # the registry's share is the other limit
    assert budget.threads(cap=1) == 1


def test_cpu_load_counts_other_processes_only() -> None:
    clock, busy, own = [0.0], [100.0], [5.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        busy[0] += 1.5 * seconds  # others keep 1.5 CPUs busy during the first sample

    load = CpuLoad(busy_s=lambda: busy[0], own_s=lambda: own[0], clock=lambda: clock[0], sleep=sleep,
                   first_sample_s=0.1)
    assert load.others_busy() == pytest.approx(1.5)
    clock[0] += 2.0
    busy[0] += 3.0  # 3 CPU-seconds busy over 2 s, 2.5 of them this process's own
    own[0] += 2.5
    assert load.others_busy() == pytest.approx(0.25)
    clock[0] += 1.0
    own[0] += 0.5  # tick rounding can make our own time exceed the machine's: never negative
    assert load.others_busy() == 0.0
    assert load.others_busy() == 0.0  # no time passed
    assert CpuLoad(busy_s=lambda: None).others_busy() is None


def test_proc_stat_parsing(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 50 250 9000 100 0 20 30 0 0\ncpu0 500 25 125 4500 50 0 10 15 0 0\n")
    hz = os.sysconf("SC_CLK_TCK")
    assert threads._proc_stat_busy_s(stat) == pytest.approx((1000 + 50 + 250 + 20 + 30) / hz)
    assert threads._proc_stat_busy_s(tmp_path / "missing") is None
    stat.write_text("garbage\n")
    assert threads._proc_stat_busy_s(stat) is None
    if Path("/proc/stat").exists():
        real = threads._proc_stat_busy_s()
        assert real is not None and real > 0

"""CPU threads of a worker's framework: a fixed count, or a fair share of this machine's CPUs among live workers.

Every PyTorch or MXNet process starts an OpenMP pool sized for the whole machine. Five ``fedctl join`` processes on
two cores then run ten spinning threads on two cores, and the same local training takes 10-100x longer. So every
``fedctl join`` registers itself in a per-user directory (one file per process, held with ``flock``, so a crashed
worker stops counting the moment the kernel drops its lock), and a worker on ``--threads auto`` sizes its pool to
``max(1, cpus // live_workers)`` before every local training call, and no more than the CPUs other processes left
free lately (:class:`CpuLoad`). Nothing here imports a framework: the adapters ask a :class:`ThreadBudget` for the
count and apply it themselves.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import secrets
import stat
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedctl.errors import ConfigError

__all__ = [
    "CpuLoad",
    "FixedThreads",
    "LocalWorkers",
    "SharedThreads",
    "ThreadBudget",
    "as_budget",
    "available_cpus",
    "default_runtime_dir",
    "worker_threads",
]

log = logging.getLogger(__name__)

_SUFFIX = ".worker"


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), rounded up; None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), bounded by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def default_runtime_dir(env: Mapping[str, str]) -> Path:
    """Where the workers of this user register: ``$XDG_RUNTIME_DIR/fedctl/workers``, else ``/tmp/fedctl-UID/workers``.

    ``env`` is the environment (the CLI passes ``os.environ``).
    """
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "fedctl" / "workers"
    return Path(tempfile.gettempdir()) / f"fedctl-{os.getuid()}" / "workers"


def _private_dir(path: Path) -> None:
    """Create ``path`` and its parent (mode 700) and refuse either if another user owns it or can write to it (its
    files decide our thread count). A parent like /tmp (sticky, owned by root) is accepted."""
    for d in (path.parent, path):
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
        private = st.st_uid == os.getuid() and not st.st_mode & 0o022
        sticky = d == path.parent and st.st_uid in (0, os.getuid()) and bool(st.st_mode & stat.S_ISVTX)
        if not stat.S_ISDIR(st.st_mode) or not (private or sticky):
            raise PermissionError(f"{d} is not a private directory of this user (owner uid {st.st_uid}, "
                                  f"mode {stat.filemode(st.st_mode)})")


class LocalWorkers:
    """The live worker processes of this user on this machine, as a directory of ``flock``-held files.

    :meth:`register` adds this process: it creates a file under a hidden name, takes an exclusive ``flock`` on it and
    only then renames it into place, so every visible file was locked when it appeared. :meth:`count` tries a shared
    lock on each visible file: one that it gets belongs to a process that is gone (the kernel released its lock when
    it died, however it died), and is removed. Each ``LocalWorkers`` object registers at most one file; several
    objects in one process count as several workers (tests use that).

    Parameters
    ----------
    directory:
        The registry directory (created mode 700 on :meth:`register`); see :func:`default_runtime_dir`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path: Path | None = None
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    def register(self) -> Path:
        """Register this process (idempotent); returns its file. Raises OSError if the directory is unusable."""
        if self.path is not None:
            return self.path
        _private_dir(self.directory)
        name = f"{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        tmp = self.directory / f".{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, self.directory / name)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._fd, self.path = fd, self.directory / name
        self._finalizer = weakref.finalize(self, _release, fd, self.path)
        return self.path

    def close(self) -> None:
        """Unregister: remove the file and drop the lock (also done at exit, or by the kernel if the process dies)."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd = self.path = self._finalizer = None

    def __enter__(self) -> LocalWorkers:
        self.register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self) -> int:
        """Live registered workers (this one included when registered); at least 1. Removes dead workers' files."""
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(_SUFFIX) and not n.startswith(".")]
        except OSError:
            names = []
        live = sum(1 for name in names if _is_live(self.directory / name))
        return max(1, live)


def _release(fd: int, path: Path) -> None:
    # Unlink before closing: once the lock is gone another counter could take the file for a dead worker's.
    path.unlink(missing_ok=True)
    os.close(fd)


def _is_live(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # removed meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # its process holds the lock
    except OSError:
        return False
    else:
        path.unlink(missing_ok=True)  # nobody holds it: the worker died without cleaning up
        return False
    finally:
        os.close(fd)


def _proc_stat_busy_s(path: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds all CPUs of the machine spent busy since boot (``/proc/stat``), or None where there is none."""
    try:
        with open(path) as f:
            fields = f.readline().split()
        # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
        ticks = [int(v) for v in fields[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 8 or fields[0] != "cpu":
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuLoad:
    """How many CPUs other processes kept busy lately: the machine's busy time (``/proc/stat``) minus this process's
    own, over the time since the previous call (the first call samples ``first_sample_s``).

    Other ``fedctl join`` processes are in it too; :class:`SharedThreads` takes the smaller of the two limits. In a
    container ``/proc/stat`` covers the whole host, which can only make the count smaller.
    """

    def __init__(self, busy_s: Callable[[], float | None] = _proc_stat_busy_s, own_s: Callable[[], float] = _own_cpu_s,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 first_sample_s: float = 0.05) -> None:
        self._busy_s, self._own_s, self._clock, self._sleep = busy_s, own_s, clock, sleep
        self._first_sample_s = first_sample_s
        self._last: tuple[float, float, float] | None = None

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._busy_s()
        return None if busy is None else (self._clock(), busy, self._own_s())

    def others_busy(self) -> float | None:
        """Average CPUs busy with other processes since the previous call; None where it cannot be measured."""
        if self._last is None:
            self._last = self._read()
            if self._last is None:
                return None
            self._sleep(self._first_sample_s)
        now = self._read()
        if now is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        if t1 <= t0:
            return 0.0
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


class ThreadBudget(Protocol):
    """How many CPU threads a framework adapter may use now; asked before every training call."""

    last: int | None

    def threads(self, cap: int | None = None) -> int:
        """The thread count to apply now; ``cap`` is the framework's own default, which an automatic count keeps."""
        ...

    def describe(self) -> str:
        """Where the count comes from, for the log."""
        ...


@dataclass
class FixedThreads:
    """An explicit count (``--threads N`` or ``OMP_NUM_THREADS``): applied as given, the framework's cap ignored."""

    count: int
    source: str = "--threads"
    workers: LocalWorkers | None = None
    """Kept registered so that automatic workers on this machine count this one too."""
    last: int | None = None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"threads must be >= 1, got {self.count}", "give --threads auto or a positive count")

    def threads(self, cap: int | None = None) -> int:
        self.last = self.count
        return self.count

    def describe(self) -> str:
        return f"{self.count} ({self.source})"


# A CPU counts as free for another thread when other processes kept it busy less than a quarter of the time: an
# OpenMP thread that is descheduled holds up its whole team at the next barrier, so "mostly free" is not free.
_FREE_SLACK = 0.25


@dataclass
class SharedThreads:
    """``--threads auto``: ``max(1, cpus // live local workers)``, at most the framework's own default and, with a
    :class:`CpuLoad`, at most the CPUs other processes left free lately."""

    workers: LocalWorkers
    cpus: int = field(default_factory=available_cpus)
    load: CpuLoad | None = None
    last: int | None = None
    live: int = 1
    others: float | None = None
    capped: bool = False

    def threads(self, cap: int | None = None) -> int:
        self.live = self.workers.count()
        share = max(1, self.cpus // self.live)
        count = min(share, cap) if cap else share
        self.capped = count < share
        self.others = self.load.others_busy() if self.load is not None else None
        if self.others is not None:
            count = max(1, min(count, int(self.cpus - self.others + _FREE_SLACK)))
        if count != self.last:
            log.debug("threads: %d (%d CPUs, %d live local workers, framework default %s, other processes %s CPUs)",
                      count, self.cpus, self.live, cap if cap else "all",
                      "?" if self.others is None else f"{self.others:.2f}")
        self.last = count
        return count

    def describe(self) -> str:
        now = f"{self.last} now" if self.last is not None else "not applied yet"
        cap = ", at most the framework's own default" if self.capped else ""
        busy = "" if self.others is None else f", {self.others:.1f} CPUs busy with other processes"
        return (f"{now} (auto: {self.cpus} CPUs shared by {self.live} live fedctl worker(s) of this user{busy}{cap}; "
                f"recounted before every round, workers registered in {self.workers.directory})")


def as_budget(threads: int | ThreadBudget | None) -> ThreadBudget | None:
    """``threads`` as a budget: an int becomes :class:`FixedThreads`, None stays None (the framework's default)."""
    if threads is None or not isinstance(threads, int):
        return threads
    return FixedThreads(threads)


def _omp_num_threads(env: Mapping[str, str]) -> int | None:
    """The first level of ``OMP_NUM_THREADS`` (``4`` or ``4,2``) if it is a positive integer."""
    first = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def worker_threads(option: str, env: Mapping[str, str], directory: Path | None = None) -> ThreadBudget:
    """The budget of a ``fedctl join`` process, registered among the local workers.

    Parameters
    ----------
    option:
        The ``--threads`` value: ``auto`` or a positive integer.
    env:
        The environment: an explicit ``OMP_NUM_THREADS`` wins over ``auto``; ``XDG_RUNTIME_DIR`` places the registry.
    directory:
        The registry directory (default: :func:`default_runtime_dir`).

    Raises
    ------
    ConfigError
        If ``option`` is neither ``auto`` nor a positive integer.
    """
    text = option.strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise ConfigError(f"--threads {option!r} is not 'auto' or a positive integer",
                          "use --threads auto (share the CPUs among local workers) or e.g. --threads 2")
    workers = LocalWorkers(directory or default_runtime_dir(env))
    try:
        workers.register()
    except OSError as exc:
        log.warning("cannot register in the local worker directory (%s): other workers on this machine will not "
                    "count this one, and --threads auto will not see them", exc)
    if text != "auto":
        return FixedThreads(int(text), f"--threads {text}", workers)
    omp = _omp_num_threads(env)
    if omp is not None:
        return FixedThreads(omp, f"OMP_NUM_THREADS={omp}", workers)
    return SharedThreads(workers, load=CpuLoad())

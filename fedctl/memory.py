"""Process-wide memory behaviour for the long-running commands (`fedctl serve`, `join`, `simulate`).

A round moves megabyte-sized frames: every received message, its decoded arrays, the aggregate. glibc serves an
allocation above its mmap threshold (128 KiB, rising only as far as the largest freed block) with a fresh mapping
and unmaps it on free, so each round's 5 MB buffers fault in new zeroed pages again — measured here as a third of
the broker's system time at 10 workers with a 5.2 MB model (`fedctl bench round`). Raising the threshold to
32 MiB (glibc's maximum) and keeping freed memory in the heap lets the next round reuse the same pages.

glibc also gives each thread that allocates its own arena (up to 8 per core). The broker's frames are allocated by
the event loop's thread and by the worker threads that aggregate, write checkpoints and deflate, and freed in
another, so each arena keeps its own high-water mark of megabyte buffers: one arena lets every thread reuse the
same freed pages. Measured with `fedctl bench round` (10 workers, 5.2 MB model): broker peak RSS 473 → 291 MB and
CPU per round 0.18 → 0.12 s; the contention a single arena adds is small next to the big copies these threads
make without holding it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
LARGEST = 32 * 2**20
"""glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""


def reuse_large_buffers() -> bool:
    """Ask glibc's malloc to keep buffers up to 32 MiB in the heap, in one arena for all threads (call it before
    any thread starts); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (bool(mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(mallopt(M_TRIM_THRESHOLD, 4 * LARGEST))
          and bool(mallopt(M_ARENA_MAX, 1)))
    log.debug("malloc: large buffers %s", "kept in the heap" if ok else "unchanged (mallopt refused)")
    return ok

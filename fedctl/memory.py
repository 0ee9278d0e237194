"""Process-wide memory behaviour for the long-running commands (`fedctl serve`, `join`, `simulate`).

A round moves megabyte-sized frames: every received message, its decoded arrays, the aggregate. glibc serves an
allocation above its mmap threshold (128 KiB, rising only as far as the largest freed block) with a fresh mapping
and unmaps it on free, so each round's 5 MB buffers fault in new zeroed pages again — measured here as a third of
the broker's system time at 10 workers with a 5.2 MB model (`fedctl bench round`). Raising the threshold to
32 MiB (glibc's maximum) and keeping freed memory in the heap lets the next round reuse the same pages. Peak RSS is
unchanged (a round's peak is the same buffers); what is freed is kept for reuse instead of returned to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST = 32 * 2**20
"""glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""


def reuse_large_buffers() -> bool:
    """Ask glibc's malloc to keep buffers up to 32 MiB in the heap; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(mallopt(M_TRIM_THRESHOLD, 4 * LARGEST))
    log.debug("malloc: large buffers %s", "kept in the heap" if ok else "unchanged (mallopt refused)")
    return ok

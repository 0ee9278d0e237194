"""The SecAgg+ neighbourhood graph (Bell et al., CCS 2020) and the Shamir threshold.

Each worker masks its input with, and shares its secrets among, only its k neighbours, not all n workers: a Harary
graph (every worker joined to the k/2 before and after it on a ring) over a random order drawn from the OS's
randomness for every attempt. k = n − 1 is the complete graph of the original SecAgg (Bonawitz et al., CCS 2017).
The default k = min(n − 1, 2⌈log2 n⌉ + 2) grows as O(log n): 16 at n = 100, 22 at n = 1,000.
"""

from __future__ import annotations

import math
import secrets


def default_neighbours(n: int) -> int:
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))) + 2)


def threshold_for(k: int, fraction: float) -> int:
    """t = ⌊fraction · k⌋ + 1 shares (of k) reconstruct a secret; at least 2 unless k is 1."""
    if not 0 < fraction < 1:
        raise ValueError(f"the threshold fraction must be in (0, 1), got {fraction}")
    return max(min(k, 2), min(k, math.floor(fraction * k) + 1))


def neighbourhoods(n: int, k: int | None = None) -> list[frozenset[int]]:
    """``result[i]``: the neighbours of participant i (never i itself), a k-regular graph (k rounded up to even
    when the graph is not complete)."""
    if n < 1:
        raise ValueError("no participants")
    k = default_neighbours(n) if k is None else k
    if k >= n - 1:
        return [frozenset(j for j in range(n) if j != i) for i in range(n)]
    half = (k + 1) // 2
    order = list(range(n))
    secrets.SystemRandom().shuffle(order)
    out: list[set[int]] = [set() for _ in range(n)]
    for pos, node in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            out[node].add(other)
            out[other].add(node)
    return [frozenset(s) for s in out]

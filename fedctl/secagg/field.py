"""The finite field of secure aggregation: fixed point in Z_{2^32}.

A worker's update vector x (float32, already weighted by w = n_k / n_ref ≤ 1, see docs/protocol.md §7.4) is clipped
to [-c, c] per coordinate and mapped to an integer q = round((x + c) · L / 2c) in [0, L], L = 2^b − 1. With at most
m inputs, b = min(31, 32 − ⌈log2 m⌉) bits, so the sum of m values is at most m · L < 2^32 and arithmetic mod 2^32
(numpy's uint32 wrap-around, which is also how masks are added and removed) never wraps the true sum. Decoding a
sum of m' ≤ m inputs: Σx = Σq · 2c / L − m' · c, exact up to rounding: at most c / L per coordinate per input
(c = 4, m = 100: b = 25, 1.2e-7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Field:
    """Fixed-point encoding for at most ``max_inputs`` inputs clipped to ``[-clip, clip]``."""

    clip: float
    max_inputs: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"the clipping range must be a positive number, got {self.clip}")
        if not 1 <= self.max_inputs <= 2**24:
            raise ValueError(f"secure aggregation sums 1..2^24 inputs, not {self.max_inputs}")

    @property
    def bits(self) -> int:
        return min(31, 32 - math.ceil(math.log2(max(self.max_inputs, 2))))

    @property
    def levels(self) -> int:
        """L = 2^b − 1: the largest encoded value."""
        return (1 << self.bits) - 1

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """``x`` clipped and encoded as uint32, and how many coordinates the clipping changed."""
        x = np.asarray(x, np.float64)
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        q = np.rint((np.clip(x, -self.clip, self.clip) + self.clip) * (self.levels / (2 * self.clip)))
        return q.astype(np.uint32), clipped

    def decode_sum(self, total: np.ndarray, inputs: int) -> np.ndarray:
        """The float64 sum of ``inputs`` encoded vectors whose sum mod 2^32 is ``total``."""
        if not 0 < inputs <= self.max_inputs:
            raise ValueError(f"a sum of {inputs} inputs, not 1..{self.max_inputs}")
        return np.asarray(total, np.uint32).astype(np.float64) * (2 * self.clip / self.levels) - inputs * self.clip

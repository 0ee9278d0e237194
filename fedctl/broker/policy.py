"""Consistency policies. ``sync``: synchronous rounds with client fraction C, a quorum and a deadline.

A policy is a sans-IO object: the service tells it what happened (a worker is ready, an update arrived, a worker
is gone, time passed) and asks what to do (start a round with whom, admit or refuse an update, close the round).
It never sees a socket or a clock of its own, so it is tested with scripted arrivals and plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedctl.errors import ConfigError
from fedctl.wire.constants import ErrorCode


@dataclass(frozen=True)
class SyncConfig:
    """Synchronous rounds: sample m = max(⌊C·K⌋, 1) of K workers; close on all answers, or quorum at deadline."""

    fraction: float = 1.0
    min_workers: int = 1
    round_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"client fraction C must be in (0, 1], got {self.fraction}", "pass e.g. --fraction 0.1")
        if self.min_workers < 1:
            raise ConfigError(f"--min-workers must be at least 1, got {self.min_workers}")
        if not self.round_timeout_s > 0:
            raise ConfigError(f"--round-timeout must be positive, got {self.round_timeout_s}")


@dataclass(frozen=True)
class Admission:
    """Whether an update is taken: ``code`` None means admitted; ``duplicate`` means already counted."""

    code: ErrorCode | None = None
    reason: str = ""
    duplicate: bool = False

    @property
    def admitted(self) -> bool:
        return self.code is None and not self.duplicate


@dataclass
class OpenRound:
    """The round in progress: who was sampled, who answered, when it must close."""

    number: int
    selected: tuple[str, ...]
    deadline: float
    received: list[str] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)


class SyncRoundPolicy:
    """Bulk-synchronous rounds (the first consistency policy; SSP and async implement the same questions)."""

    name = "sync"

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.current: OpenRound | None = None

    def sample_size(self, connected: int) -> int:
        return max(int(math.floor(self.config.fraction * connected + 1e-9)), 1)

    def try_start(self, round_no: int, ready: Sequence[str], connected: int, now: float,
                  rng: np.random.Generator) -> OpenRound | None:
        """Open round ``round_no`` if none is open and enough workers wait; returns it, or None to keep waiting."""
        if self.current is not None or len(ready) < self.config.min_workers:
            return None
        m = min(self.sample_size(connected), len(ready))
        chosen = rng.choice(len(ready), size=m, replace=False)
        selected = tuple(sorted(ready[i] for i in chosen))
        self.current = OpenRound(round_no, selected, now + self.config.round_timeout_s)
        return self.current

    def admit(self, worker: str, round_no: int) -> Admission:
        """Decide on an update from ``worker`` for ``round_no``."""
        cur = self.current
        if cur is None or round_no != cur.number:
            return Admission(ErrorCode.STALE_UPDATE, f"round {round_no} is not open"
                             + (f" (round {cur.number} is)" if cur else " (no round is open)"))
        if worker not in cur.selected:
            return Admission(ErrorCode.NOT_SELECTED, f"worker {worker!r} was not sampled for round {round_no}")
        if worker in cur.received:
            return Admission(duplicate=True)
        return Admission()

    def record(self, worker: str) -> None:
        """Count an admitted update."""
        if self.current is not None:
            self.current.received.append(worker)

    def worker_gone(self, worker: str) -> None:
        """A sampled worker left or stopped heartbeating: stop waiting for it."""
        if self.current is not None and worker in self.current.selected and worker not in self.current.received:
            self.current.gone.add(worker)

    def should_close(self, now: float) -> bool:
        """True when every live sampled worker answered, or the deadline passed."""
        cur = self.current
        if cur is None:
            return False
        outstanding = set(cur.selected) - set(cur.received) - cur.gone
        return not outstanding or now >= cur.deadline

    def close(self) -> tuple[OpenRound, bool]:
        """End the open round; the flag says whether it reached its quorum (aggregate) or failed (retry)."""
        cur = self.current
        if cur is None:
            raise RuntimeError("no round is open")
        self.current = None
        return cur, len(cur.received) >= max(self.quorum(cur), 1)

    def quorum(self, cur: OpenRound) -> int:
        """Updates a round needs to be aggregated: min(--min-workers, sampled)."""
        return min(self.config.min_workers, len(cur.selected))

    def time_left(self, now: float) -> float | None:
        return None if self.current is None else max(self.current.deadline - now, 0.0)

"""Consistency policies. ``sync``: synchronous rounds with client fraction C, a quorum and a deadline;
``ssp:S``: stale-synchronous parallel (Ho et al. 2013) with per-worker clocks and bound S; ``async``: S = ∞.

A policy is a sans-IO object: the service tells it what happened (a worker is ready, an update arrived, a worker
is gone, time passed) and asks what to do (start a round with whom, admit or refuse an update, close the round).
It never sees a socket or a clock of its own, so it is tested with scripted arrivals and plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from fedctl.errors import ConfigError
from fedctl.strategies.base import Update
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
    staleness: int = 0
    """Model versions between the update's base and the current model (clock policies)."""

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
    handed: set[str] = field(default_factory=set)
    """Selected workers holding this round's model; one that asks again (it restarted) is handed it again."""
    failed: set[str] = field(default_factory=set)
    """Selected workers that reported they could not train (``failed``): not waited for, not handed it again."""


@dataclass(frozen=True)
class Restored:
    """What a policy keeps of the acknowledged updates found after a restart, and which stored ones to forget
    (``forget_all``: every stored update and the round file)."""

    updates: list[Update]
    forget: list[tuple[str, int]] = field(default_factory=list)
    forget_all: bool = False


class SyncRoundPolicy:
    """Bulk-synchronous rounds (the first consistency policy; SSP and async implement the same questions)."""

    name = "sync"
    driver: ClassVar[str] = "rounds"
    """The driver (:data:`fedctl.broker.drivers.DRIVERS`) that runs this policy."""

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.current: OpenRound | None = None
        self.committed: tuple[int, frozenset[str]] = (0, frozenset())
        """The last aggregated round and the workers whose updates it used: a push of theirs for it that comes
        again (its ack was lost with a connection or a broker restart) is a duplicate, not a stale update."""

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
        self.current = OpenRound(round_no, selected, now + self.config.round_timeout_s, handed=set(selected))
        return self.current

    def restore(self, done: int, opened: tuple[int, tuple[str, ...]] | None, stored: Sequence[Update],
                applied: Callable[[], set[tuple[str, int]]], now: float) -> Restored:
        """After a restart at committed round ``done``: reopen round ``done + 1`` if the broker had opened it
        (``opened``: its number and sample), with the updates it had acknowledged. Nobody holds its model: each
        selected worker that pulls is handed it again; the deadline starts over. ``applied`` is not needed here:
        a committed round's updates are those of rounds up to ``done`` — except to know who took part in round
        ``done``, whose acks a crash may have cut off."""
        if done > 0:
            self.committed = (done, frozenset(w for w, r in applied() if r == done))
        if opened is None or opened[0] != done + 1:
            return Restored([], forget_all=True)
        keep = [u for u in stored if u.round == done + 1 and u.worker in opened[1]]
        kept = {(u.worker, u.round) for u in keep}
        self.current = OpenRound(done + 1, opened[1], now + self.config.round_timeout_s, [u.worker for u in keep])
        return Restored(keep, [(u.worker, u.round) for u in stored if (u.worker, u.round) not in kept])

    def needs_model(self, worker: str) -> bool:
        """Is ``worker`` selected for the open round, without an answer, and without the model?"""
        cur = self.current
        return (cur is not None and worker in cur.selected and worker not in cur.received
                and worker not in cur.handed and worker not in cur.gone and worker not in cur.failed)

    def join(self, worker: str) -> None:
        """A worker joined or rejoined (nothing to do: rounds sample whoever waits, and one selected for the open
        round is handed its model again when it pulls)."""

    def pulled(self, worker: str) -> None:
        """A worker asks for work again: if it was sampled and has not pushed (it restarted), hand it the round's
        model again (the driver does, see :meth:`needs_model`)."""
        cur = self.current
        if cur is not None and worker in cur.selected and worker not in cur.received:
            cur.handed.discard(worker)
            cur.gone.discard(worker)

    def admit(self, worker: str, round_no: int, base_version: int | None = None,
              version: int | None = None) -> Admission:
        """Decide on an update from ``worker`` for ``round_no`` trained on ``base_version`` (current: ``version``)."""
        cur = self.current
        if round_no == self.committed[0] and worker in self.committed[1]:
            return Admission(duplicate=True)
        if cur is None or round_no != cur.number:
            return Admission(ErrorCode.STALE_UPDATE, f"round {round_no} is not open"
                             + (f" (round {cur.number} is)" if cur else " (no round is open)"))
        if worker not in cur.selected:
            return Admission(ErrorCode.NOT_SELECTED, f"worker {worker!r} was not sampled for round {round_no}")
        if worker in cur.received:
            return Admission(duplicate=True)
        if base_version is not None and version is not None and base_version != version:
            return Admission(ErrorCode.STALE_UPDATE, f"update is based on model version {base_version}, "
                             f"round {round_no} trains version {version}")
        return Admission()

    def record(self, worker: str) -> None:
        """Count an admitted update."""
        if self.current is not None:
            self.current.received.append(worker)

    def failed(self, worker: str, round_no: int) -> bool:
        """``worker`` could not train round ``round_no``: the round goes on without it. False when that report
        concerns no work of the open round (a late or stray report changes nothing)."""
        cur = self.current
        if cur is None or cur.number != round_no or worker not in cur.selected or worker in cur.received:
            return False
        cur.failed.add(worker)
        return True

    def worker_gone(self, worker: str) -> None:
        """A sampled worker left or stopped heartbeating: stop waiting for it."""
        if self.current is not None and worker in self.current.selected and worker not in self.current.received:
            self.current.gone.add(worker)

    def should_close(self, now: float) -> bool:
        """True when every live sampled worker answered, or the deadline passed."""
        cur = self.current
        if cur is None:
            return False
        outstanding = set(cur.selected) - set(cur.received) - cur.gone - cur.failed
        return not outstanding or now >= cur.deadline

    def close(self) -> tuple[OpenRound, bool]:
        """End the open round; the flag says whether it reached its quorum (aggregate) or failed (retry)."""
        cur = self.current
        if cur is None:
            raise RuntimeError("no round is open")
        self.current = None
        ok = len(cur.received) >= max(self.quorum(cur), 1)
        if ok:
            self.committed = (cur.number, frozenset(cur.received))
        return cur, ok

    def quorum(self, cur: OpenRound) -> int:
        """Updates a round needs to be aggregated: min(--min-workers, sampled)."""
        return min(self.config.min_workers, len(cur.selected))

    def time_left(self, now: float) -> float | None:
        return None if self.current is None else max(self.current.deadline - now, 0.0)


# -- stale-synchronous parallel and asynchronous ----------------------------------------------------------------


def parse_policy(text: str) -> float | None:
    """The staleness bound S of a ``--policy`` value: None for ``sync``, an int for ``ssp:S``, inf for ``async``."""
    if text == "sync":
        return None
    if text == "async":
        return math.inf
    name, _, bound = text.partition(":")
    if name == "ssp" and bound.isdigit():
        return int(bound)
    raise ConfigError(f"--policy {text!r} is not a consistency policy",
                      "use sync, ssp:S with a bound S >= 0 (e.g. ssp:2), or async")


def policy_name(text: str) -> str:
    """The name of a ``--policy`` value, checked: ``sync``, ``ssp`` (for ``ssp:S``) or ``async`` — what a strategy's
    ``policies`` lists."""
    parse_policy(text)
    return text.partition(":")[0]


@dataclass(frozen=True)
class ClockConfig:
    """SSP / async settings.

    bound:
        S: a worker at clock c may start its next update only while c − (slowest live worker's clock) ≤ S
        (math.inf: fully asynchronous).
    max_staleness:
        Hard limit: an update based on a model more than this many versions old is refused (STALE_UPDATE).
    staleness_exponent:
        a in the weight (1 + τ)^−a of an update τ versions old (0: no weighting; 1: 1/(1+τ)).
    buffer:
        Apply updates in groups of this many arrivals (1: each as it arrives; K > 1: FedBuff-style).
    server_lr:
        η_g, a factor on every update's weight (FedBuff's server learning rate): with FedAvg each arrival moves
        the model by η_g · (n_k/N) · (1+τ)^−a of the change it made.
    """

    bound: float = math.inf
    max_staleness: int = 50
    staleness_exponent: float = 0.5
    buffer: int = 1
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.bound >= 0:
            raise ConfigError(f"the SSP bound must be >= 0, got {self.bound}", "use e.g. --policy ssp:2")
        if self.max_staleness < 0:
            raise ConfigError(f"--max-staleness must be >= 0, got {self.max_staleness}")
        if self.staleness_exponent < 0:
            raise ConfigError(f"--staleness-exponent must be >= 0, got {self.staleness_exponent}",
                              "0 applies every update at full weight, 1 weighs it by 1/(1+staleness)")
        if self.buffer < 1:
            raise ConfigError(f"--buffer must be >= 1, got {self.buffer}")
        if not self.server_lr > 0:
            raise ConfigError(f"--server-lr must be positive, got {self.server_lr}")


@dataclass(frozen=True)
class Assignment:
    """A model handed to a worker: the clock tick it computes and the version it starts from."""

    tick: int
    base_version: int


class ClockPolicy:
    """Per-worker clocks for SSP (bound S) and async (S = ∞); sans-IO like :class:`SyncRoundPolicy`.

    A worker's clock counts its applied updates; it survives the worker's reconnects (keyed by worker id) and is
    saved with the broker's state. A new worker starts at the slowest live worker's clock, so joining late never
    holds the others back. A worker that leaves or expires stops counting towards the minimum, which releases
    the pulls it was holding up.
    """

    driver: ClassVar[str] = "clocks"

    def __init__(self, config: ClockConfig, clocks: dict[str, int] | None = None) -> None:
        self.config = config
        self.name = "async" if math.isinf(config.bound) else f"ssp:{int(config.bound)}"
        self.clocks: dict[str, int] = dict(clocks or {})
        self.live: set[str] = set()
        self.assigned: dict[str, Assignment] = {}

    def restore(self, done: int, opened: tuple[int, tuple[str, ...]] | None, stored: Sequence[Update],
                applied: Callable[[], set[tuple[str, int]]], now: float) -> Restored:
        """After a restart: every acknowledged update the journal (``applied()``: (worker, tick) pairs) does not
        list as applied is kept, and its worker's clock moves up to its tick."""
        if not stored:
            return Restored([])
        done_keys = applied()
        keep = [u for u in stored if (u.worker, u.round) not in done_keys]
        for u in keep:
            self.clocks[u.worker] = max(self.clocks.get(u.worker, 0), u.round)
        return Restored(keep, [(u.worker, u.round) for u in stored if (u.worker, u.round) in done_keys])

    def join(self, worker: str) -> None:
        if worker not in self.clocks:
            self.clocks[worker] = self.min_clock() or 0
        self.live.add(worker)

    def worker_gone(self, worker: str) -> None:
        self.live.discard(worker)
        self.assigned.pop(worker, None)

    def pulled(self, worker: str) -> None:
        """A pull while a model is out means the worker dropped that work (it restarted): forget it."""
        self.assigned.pop(worker, None)

    def failed(self, worker: str, round_no: int) -> bool:
        """``worker`` could not compute its update ``round_no``: it no longer counts as computing (its clock stays;
        it pulls again). False when no such work was handed to it."""
        job = self.assigned.get(worker)
        if job is None or job.tick != round_no:
            return False
        del self.assigned[worker]
        return True

    def min_clock(self) -> int | None:
        return min((self.clocks[w] for w in self.live), default=None)

    def max_clock(self) -> int | None:
        return max((self.clocks[w] for w in self.live), default=None)

    def may_start(self, worker: str) -> bool:
        """May ``worker`` be handed a model now? (clock − min live clock ≤ S)."""
        low = self.min_clock()
        return low is None or self.clocks.get(worker, low) - low <= self.config.bound

    def assign(self, worker: str, version: int) -> int:
        """Hand ``worker`` the model of ``version``; returns the clock tick its update will count as."""
        tick = self.clocks.get(worker, 0) + 1
        self.assigned[worker] = Assignment(tick, version)
        return tick

    def busy(self) -> int:
        """Live workers computing an update right now."""
        return sum(1 for w in self.assigned if w in self.live)

    def admit(self, worker: str, round_no: int, base_version: int | None = None,
              version: int | None = None) -> Admission:
        """Decide on an update for clock tick ``round_no`` computed on ``base_version`` (current: ``version``)."""
        if round_no <= self.clocks.get(worker, 0):
            return Admission(duplicate=True)
        job = self.assigned.get(worker)
        if job is None or job.tick != round_no:
            return Admission(ErrorCode.NOT_SELECTED, f"no model was handed to worker {worker!r} for its update "
                             f"{round_no}; pull first")
        if base_version is not None and base_version != job.base_version:
            return Admission(ErrorCode.STALE_UPDATE, f"update {round_no} of {worker!r} claims base version "
                             f"{base_version}, it was handed version {job.base_version}")
        staleness = 0 if version is None else version - job.base_version
        if staleness > self.config.max_staleness:
            self.assigned.pop(worker, None)
            return Admission(ErrorCode.STALE_UPDATE, f"update is {staleness} model versions old; this broker "
                             f"applies updates at most {self.config.max_staleness} old (--max-staleness)",
                             staleness=staleness)
        return Admission(staleness=staleness)

    def record(self, worker: str) -> None:
        """Count an admitted update: the worker's clock advances."""
        self.clocks[worker] = self.clocks.get(worker, 0) + 1
        self.assigned.pop(worker, None)

    def weight(self, staleness: int) -> float:
        """η_g · (1 + τ)^−a: how much an update τ versions old counts."""
        return float(self.config.server_lr * (1.0 + max(staleness, 0)) ** -self.config.staleness_exponent)


Policy = SyncRoundPolicy | ClockPolicy


def make_policy(text: str, sync: SyncConfig, clock: ClockConfig, state: dict[str, Any]) -> Policy:
    """The policy ``--policy text`` names, with the clocks saved in ``state`` (ssp/async)."""
    bound = parse_policy(text)
    if bound is None:
        return SyncRoundPolicy(sync)
    return ClockPolicy(replace(clock, bound=bound), state.get("clocks"))

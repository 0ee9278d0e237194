"""Federated evaluation, sans-IO: which workers evaluate the global model, which answers count, and their
example-weighted mean (docs/protocol.md §7.2).

After round r (sync policy) the driver asks :class:`Evaluations` for a sample of the workers whose pulls wait;
the core answers those pulls with ``evaluate`` (the model, dense or as a delta, as ``model`` goes) and admits the
``evaluation`` each sends back here: only for the open evaluation's model version, only from a worker asked, once.
The driver waits until every asked worker that is still connected answered, or the deadline, then closes it:
:meth:`OpenEvaluation.summary` is the ``fed_eval_*`` part of round r's line in metrics.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedctl.errors import ProtocolError
from fedctl.wire.constants import ErrorCode

PREFIX = "fed_eval_"
"""Prefix of the metrics.jsonl fields of a federated evaluation (beside the centralised ``test_*``)."""
ALWAYS = ("accuracy", "loss", "examples", "workers", "asked")
"""Fields every metrics line carries when federated evaluation is on (null on rounds not evaluated)."""


def sample_size(fraction: float, connected: int) -> int:
    """Workers asked to evaluate: max(⌈C·K⌉, 1) of the K connected."""
    return max(math.ceil(fraction * connected - 1e-9), 1)


def empty_summary() -> dict[str, Any]:
    """The ``fed_eval_*`` fields of a round that was not evaluated."""
    return {PREFIX + name: None for name in ALWAYS}


@dataclass
class OpenEvaluation:
    """One evaluation of model ``version`` (after round ``number``): who was asked, who answered, with what."""

    number: int
    version: int
    asked: tuple[str, ...]
    deadline: float
    answers: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)
    """Worker -> (examples, metrics) of each admitted evaluation."""
    gone: set[str] = field(default_factory=set)
    """Asked workers that will not answer (left, expired, or pulled again without answering)."""

    def outstanding(self) -> set[str]:
        return set(self.asked) - set(self.answers) - self.gone

    def summary(self) -> dict[str, Any]:
        """The example-weighted mean of every metric the workers reported (over those reporting it with at least
        one example), the examples, the workers that contributed, and how many were asked — as ``fed_eval_*``."""
        weighted: dict[str, float] = {}
        examples: dict[str, int] = {}
        for n, metrics in self.answers.values():
            for name, value in metrics.items() if n > 0 else ():
                weighted[name] = weighted.get(name, 0.0) + n * float(value)
                examples[name] = examples.get(name, 0) + n
        out = empty_summary()
        out.update({PREFIX + name: weighted[name] / examples[name] for name in sorted(weighted)})
        # Counts come last: a worker's metric called "examples" does not replace them.
        out[PREFIX + "examples"] = sum(n for n, _ in self.answers.values())
        out[PREFIX + "workers"] = sum(1 for n, _ in self.answers.values() if n > 0)
        out[PREFIX + "asked"] = len(self.asked)
        return out


class Evaluations:
    """The core's federated-evaluation state: at most one evaluation open at a time."""

    def __init__(self, fraction: float, timeout_s: float) -> None:
        self.fraction = fraction
        self.timeout_s = timeout_s
        self.current: OpenEvaluation | None = None

    def sample(self, waiting: Sequence[str], connected: int, rng: np.random.Generator) -> list[str]:
        """max(⌈C·K⌉, 1) of the ``waiting`` workers (fewer if fewer wait), chosen with the broker's seeded RNG."""
        m = min(sample_size(self.fraction, connected), len(waiting))
        if m == 0:
            return []
        return sorted(waiting[i] for i in rng.choice(len(waiting), size=m, replace=False))

    def open(self, number: int, version: int, asked: Sequence[str], now: float) -> OpenEvaluation:
        self.current = OpenEvaluation(number, version, tuple(asked), now + self.timeout_s)
        return self.current

    def admit(self, worker: str, version: int, num_examples: int, metrics: Mapping[str, float]) -> bool:
        """Take ``worker``'s evaluation of ``version``; False for a repeat of one already taken (not an error).

        Raises
        ------
        ProtocolError
            ``STALE_UPDATE`` when no evaluation of that version is open, ``NOT_SELECTED`` when the worker was
            not asked (or stopped counting: it pulled again first).
        """
        cur = self.current
        if cur is None or cur.version != version:
            raise ProtocolError(ErrorCode.STALE_UPDATE, f"no evaluation of model version {version} is open"
                                + (f" (version {cur.version} is being evaluated)" if cur else ""))
        if worker in cur.answers:
            return False
        if worker not in cur.asked or worker in cur.gone:
            raise ProtocolError(ErrorCode.NOT_SELECTED, f"worker {worker!r} was not asked to evaluate model "
                                f"version {version}" + (" (it pulled again before answering)"
                                                        if worker in cur.gone else ""))
        cur.answers[worker] = (num_examples, {k: float(v) for k, v in metrics.items()})
        return True

    def gone(self, worker: str) -> None:
        """``worker`` will not answer (it left, expired, or pulled again without answering): stop waiting."""
        cur = self.current
        if cur is not None and worker in cur.asked and worker not in cur.answers:
            cur.gone.add(worker)

    def complete(self, now: float) -> bool:
        """True when no evaluation is open, every asked worker still expected answered, or the deadline passed."""
        cur = self.current
        return cur is None or not cur.outstanding() or now >= cur.deadline

    def time_left(self, now: float) -> float | None:
        return None if self.current is None else max(self.current.deadline - now, 0.0)

    def close(self) -> OpenEvaluation | None:
        """End the open evaluation; later answers to it are refused (``STALE_UPDATE``)."""
        cur, self.current = self.current, None
        return cur

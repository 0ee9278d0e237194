"""The broker's secure aggregation (``fedctl serve --secure-aggregation``, docs/protocol.md §7.4): one attempt of
:class:`~fedctl.secagg.server.ServerSession` per round try, driven stage by stage by the round driver.

Sans-IO like the core that owns it: handlers take decoded messages and return what to send as :class:`Reply`
tuples; nothing here touches a socket, a file or the clock. The broker never holds an individual update: only the
running sum of masked inputs (uniform in Z_2^32 one by one) and, after the reveals, that sum unmasked. Each attempt
is bound to a fresh random id and every worker makes fresh keys for it, so nothing of an abandoned attempt (or of
one a crash interrupted) can be combined with the next.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedctl.errors import ProtocolError
from fedctl.secagg import Field, SecAggAbort, SecAggError, ServerSession
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message

log = logging.getLogger(__name__)
STAGES = ("keys", "shares", "inputs", "reveals")
EXTRA = ("train_loss",)
"""Values summed securely after the model's: a worker's training loss reaches the broker only inside the sum."""
PLAIN_METRICS = frozenset({"train_time_s", "clipped", "secagg_s"})
"""The only metrics an ``sa_input`` carries in the clear (none of them computed from the data's values)."""
_ANSWERS = {"keys": C.SA_PEERS, "shares": C.SA_INBOX, "inputs": C.SA_UNMASK, "reveals": C.ACK}


@dataclass(frozen=True)
class Reply:
    """A message for the core to send: to ``identity``, answering request ``re``."""

    identity: bytes
    re: int
    type: str
    fields: dict[str, Any]


@dataclass
class Outcome:
    """A finished attempt: the weighted mean of the survivors' update vectors (float64, the model's elements in
    spec order), their example count and the plaintext facts of their inputs."""

    mean: np.ndarray
    workers: list[str]
    num_examples: int
    metrics: dict[str, float]
    dropped: int
    clipped: int = 0
    attempt: int = 0
    base_version: int = 0


@dataclass
class _Attempt:
    round: int
    attempt: int
    base_version: int
    session: ServerSession
    weight_ref: int
    stage: str = "keys"
    expected: set[str] = field(default_factory=set)
    waiting: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    handed: int = 0


class SecureAggregation:
    """The secure-aggregation state of a broker: at most one attempt open.

    Parameters
    ----------
    length:
        Elements of every input vector: the model's, then :data:`EXTRA`.
    clip, neighbours, threshold:
        ``--secagg-clip`` (the fixed-point range), ``--secagg-neighbours`` (k; None: O(log n)) and
        ``--secagg-threshold`` (t as a fraction of k).
    """

    def __init__(self, length: int, clip: float, neighbours: int | None, threshold: float,
                 dp: tuple[float, float] | None = None) -> None:
        self.length, self.clip, self.neighbours, self.threshold = length, clip, neighbours, threshold
        self.dp = dp
        """Distributed DP: (noise multiplier z, L2 clip S); each of the m workers handed an attempt adds noise of
        std z·S/√m, so the sum of all m inputs carries std z·S."""
        self.current: _Attempt | None = None
        self.finished: tuple[int, int, frozenset[str]] | None = None
        """The last attempt that finished: round, attempt id and the workers whose inputs were summed (a reveal of
        theirs that arrives after the unmasking had its t shares is acknowledged, not refused)."""
        self.attempts = 0
        self.aborted = 0

    # -- the driver's side -----------------------------------------------------------------------------------------
    def open(self, round_no: int, workers: Sequence[tuple[str, int]], base_version: int) -> None:
        """A new attempt among ``workers`` (``(worker, num_examples)``, those handed the model), with a fresh id."""
        names = [w for w, _ in workers]
        session = ServerSession(round_no, secrets.randbits(62), names, self.length,
                                Field(self.clip, max(len(names), 1)), self.neighbours, self.threshold)
        self.current = _Attempt(round_no, session.attempt, base_version, session,
                                max([n for _, n in workers] + [1]), expected=set(names), handed=len(names))
        self.attempts += 1
        log.info("round %d, secure aggregation attempt %x: %d workers", round_no, session.attempt, len(names))

    def model_fields(self) -> dict[str, Any] | None:
        """The ``secagg`` map of the open attempt's ``model`` messages (docs/protocol.md §7.4)."""
        a = self.current
        if a is None:
            return None
        return {"attempt": a.attempt, "clip": self.clip, "max_inputs": max(a.handed, 1), "weight_ref": a.weight_ref}

    def dp_fields(self) -> dict[str, float] | None:
        """The ``dp`` map of the open attempt's ``model`` messages: the clip and each worker's noise std."""
        a = self.current
        if a is None or self.dp is None:
            return None
        z, clip = self.dp
        return {"clip": clip, "noise": z * clip / max(a.handed, 1) ** 0.5}

    def stage(self) -> str | None:
        return None if self.current is None else self.current.stage

    def stage_done(self, live: set[str]) -> bool:
        """Every expected worker that is still connected has answered the current stage — or, for the reveals,
        every secret already has its t shares (a worker lost after its input then costs no deadline)."""
        a = self.current
        if a is None or not (a.expected & live) - set(a.waiting):
            return True
        return a.stage == "reveals" and a.session.can_finish()

    def advance(self) -> tuple[list[Reply], Outcome | None]:
        """Close the current stage (at its deadline, or when everyone answered): the answers to send, and after the
        reveals the outcome. An attempt that cannot go on is abandoned: every waiting worker is told
        ``SECAGG_ABORTED`` and the outcome is None with :attr:`current` cleared."""
        a = self.current
        assert a is not None
        try:
            replies, outcome = self._close(a)
        except SecAggAbort as err:
            return self.abort(str(err)), None
        return replies, outcome

    def abort(self, why: str) -> list[Reply]:
        a = self.current
        if a is None:
            return []
        self.current = None
        self.aborted += 1
        log.warning("round %d: secure aggregation attempt %x abandoned at the %s stage: %s; nothing of it is "
                    "applied", a.round, a.attempt, a.stage, why)
        return [Reply(identity, re, C.ERROR, {"code": int(ErrorCode.SECAGG_ABORTED), "reason": f"secure "
                      f"aggregation attempt abandoned: {why}"[:1000], "fix": "pull again: the round is retried"})
                for identity, re in a.waiting.values()]

    def _close(self, a: _Attempt) -> tuple[list[Reply], Outcome | None]:
        s = a.session
        replies: list[Reply] = []
        outcome = None
        if a.stage == "keys":
            for worker, (me, peers, t) in s.close_keys().items():
                replies += self._answer(a, worker, {"index": me, "threshold": t,
                                                    "peers": [[v, c, k] for v, (c, k) in peers.items()]})
        elif a.stage == "shares":
            for worker, box in s.close_shares().items():
                replies += self._answer(a, worker, {"shares": [[v, sealed] for v, sealed in box.items()]})
        elif a.stage == "inputs":
            for worker, (alive, gone) in s.close_inputs().items():
                replies += self._answer(a, worker, {"survivors": alive, "dropped": gone})
        else:
            summed = s.finish()
            weight = sum(summed.weights.values())
            workers = summed.workers
            keys = sorted({k for w in workers for k in a.metrics.get(w, {})})
            metrics = {k: sum(a.metrics[w].get(k, 0.0) for w in workers) / len(workers) for k in keys}
            mean = summed.total / weight
            model_values = self.length - len(EXTRA)
            if self.dp is None:  # under DP the workers send zeros there: a loss would escape the noise
                metrics.update(zip(EXTRA, (float(v) for v in mean[model_values:])))
            outcome = Outcome(mean[:model_values], workers, sum(a.examples[w] for w in workers), metrics,
                              dropped=a.handed - len(workers), clipped=int(sum(a.metrics[w].get("clipped", 0)
                                                                               for w in workers)),
                              attempt=a.attempt, base_version=a.base_version)
            for worker in workers:
                replies += self._answer(a, worker, {"round": a.round, "seq": 0, "status": C.ACK_ACCEPTED})
            self.current = None
            self.finished = (a.round, a.attempt, frozenset(workers))
            return replies, outcome
        log.info("round %d, secure aggregation attempt %x: %s stage closed with %d of %d workers", a.round,
                 a.attempt, a.stage, len(a.waiting), len(a.expected | set(a.waiting)))
        a.expected = {w for w in a.waiting}
        a.waiting = {}
        a.stage = STAGES[STAGES.index(a.stage) + 1]
        return replies, outcome

    def _answer(self, a: _Attempt, worker: str, fields: dict[str, Any]) -> list[Reply]:
        """The answer to ``worker``'s waiting request (none when it left meanwhile: it dropped at the next stage)."""
        if worker not in a.waiting:
            return []
        identity, re = a.waiting[worker]
        if a.stage != "reveals":
            fields = {"round": a.round, "attempt": a.attempt, **fields}
        return [Reply(identity, re, _ANSWERS[a.stage], fields)]

    # -- the workers' messages -------------------------------------------------------------------------------------
    def receive(self, worker: str, identity: bytes, msg: Message) -> Reply | None:
        """Take one worker's message of the open attempt (answered when its stage closes: None), or answer at once
        a late reveal of a worker whose input the last attempt summed (``ack``); :class:`ProtocolError`
        ``SECAGG_REFUSED`` when it is not this attempt's, not this stage's, or breaks the protocol (the attempt goes
        on without it)."""
        done = self.finished
        if msg.type == C.SA_REVEAL and done is not None and (msg["round"], msg["attempt"]) == done[:2] \
                and worker in done[2]:
            return Reply(identity, msg.id, C.ACK, {"round": msg["round"], "seq": 0, "status": C.ACK_DUPLICATE})
        a = self.current
        try:
            if a is None or msg["round"] != a.round or msg["attempt"] != a.attempt:
                raise SecAggError(f"round {msg['round']} attempt {msg['attempt']} is not open"
                                  + ("" if a is None else f" (round {a.round} attempt {a.attempt} is)"))
            wanted = {C.SA_KEYS: "keys", C.SA_SHARES: "shares", C.SA_INPUT: "inputs", C.SA_REVEAL: "reveals"}
            if wanted[msg.type] != a.stage:
                raise SecAggError(f"a {msg.type} in the {a.stage} stage")
            if worker not in a.expected or worker in a.waiting:
                raise SecAggError(f"{worker} is not expected in the {a.stage} stage (dropped earlier, or sent twice)")
            self._take(a, worker, msg)
        except SecAggError as err:
            raise ProtocolError(ErrorCode.SECAGG_REFUSED, str(err),
                                "pull again: a worker out of step with the attempt waits for the next") from None
        a.waiting[worker] = (identity, msg.id)
        return None

    def _take(self, a: _Attempt, worker: str, msg: Message) -> None:
        s = a.session
        if msg.type == C.SA_KEYS:
            s.add_keys(worker, msg["c"], msg["s"])
        elif msg.type == C.SA_SHARES:
            s.add_shares(worker, {int(v): sealed for v, sealed in msg["shares"]})
        elif msg.type == C.SA_INPUT:
            if msg["base_version"] != a.base_version:
                raise SecAggError(f"an input based on version {msg['base_version']}, not {a.base_version}")
            masked = msg.tensors.get("masked")
            if masked is None or not isinstance(masked, np.ndarray):
                raise SecAggError("an sa_input carries one dense frame named 'masked'")
            s.add_input(worker, masked.reshape(-1), float(msg["weight"]))
            a.examples[worker] = int(msg["num_examples"])
            a.metrics[worker] = {k: float(v) for k, v in (msg.get("metrics") or {}).items() if k in PLAIN_METRICS}
        else:
            s.add_reveal(worker, {int(v): b for v, b in msg["seeds"]}, {int(v): b for v, b in msg["keys"]})

    def gone(self, worker: str) -> None:
        """A worker left or expired: it is not waited for (it dropped at this stage)."""
        if self.current is not None:
            self.current.expected.discard(worker)
            self.current.waiting.pop(worker, None)

"""The broker's side of one secure-aggregation attempt: it routes keys and sealed shares, sums masked inputs and,
from the survivors' reveals, removes every mask — learning the sum, never an input.

Stages (each closed by the broker's driver when every expected worker answered or its deadline passed; a worker
that has not answered by then has dropped at that stage):

1. keys: U1 = the workers that advertised two public keys; the neighbourhood graph is drawn over U1.
2. shares: U2 = the workers of U1 that sent a sealed share to each neighbour; each worker of U2 receives the shares
   its neighbours in U2 sealed to it, and masks with exactly those neighbours.
3. inputs: U3 = the workers of U2 whose masked input arrived; the inputs are summed mod 2^32 as they come.
4. reveals: each worker of U3 is told which of its neighbours are in U3 (it reveals its shares of their self-mask
   seeds) and which dropped after sharing, U2 \\ U3 (it reveals its shares of their mask keys). With t shares per
   secret, every survivor's self mask and every dropped worker's pairwise masks are removed.

:class:`~fedctl.secagg.errors.SecAggError` refuses one message; :class:`~fedctl.secagg.errors.SecAggAbort` ends the
attempt (fewer than 2 workers at a stage, or a secret with fewer than t shares), and nothing of it is applied.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedctl.secagg import primitives as P
from fedctl.secagg.client import SHARE_PLAINTEXT
from fedctl.secagg.errors import SecAggAbort, SecAggError
from fedctl.secagg.field import Field
from fedctl.secagg.graph import neighbourhoods, threshold_for

MIN_INPUTS = 2
"""A sum of one input is that input: every stage needs at least two workers."""
SEALED_SHARE_BYTES = P.NONCE_BYTES + SHARE_PLAINTEXT + 16


@dataclass
class Summed:
    """What an attempt yields: the float64 sum of the survivors' (weighted, clipped) inputs."""

    total: np.ndarray
    workers: list[str]
    weights: dict[str, float] = field(default_factory=dict)


class ServerSession:
    """One attempt of secure aggregation among ``workers`` (those handed the round's model).

    Parameters
    ----------
    round_no, attempt:
        The attempt's identity (its keys and ciphertexts are bound to it).
    workers:
        The participants; their indices are their positions in sorted order.
    length:
        Values per input vector (the model's elements).
    field:
        The fixed-point encoding (clipping range, at most ``len(workers)`` inputs).
    neighbours:
        k of the graph (None: :func:`~fedctl.secagg.graph.default_neighbours`); ``threshold``: t as a fraction
        of k (:func:`~fedctl.secagg.graph.threshold_for`).
    """

    def __init__(self, round_no: int, attempt: int, workers: Sequence[str], length: int, field_: Field,
                 neighbours: int | None = None, threshold: float = 0.5) -> None:
        self.ctx = P.context(round_no, attempt)
        self.round, self.attempt = round_no, attempt
        self.index = {w: i for i, w in enumerate(sorted(workers))}
        self.worker_at = {i: w for w, i in self.index.items()}
        self.length, self.field = length, field_
        self._k, self._fraction = neighbours, threshold
        self.stage = "keys"
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.graph: dict[int, frozenset[int]] = {}
        self.threshold = 0
        self._sealed: dict[int, dict[int, bytes]] = {}
        self.u2: set[int] = set()
        self._total = np.zeros(length, np.uint32)
        self.u3: set[int] = set()
        self.weights: dict[int, float] = {}
        self._told: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._b_shares: dict[int, dict[int, bytes]] = {}
        self._s_shares: dict[int, dict[int, bytes]] = {}
        self.revealed: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _member(self, worker: str, stage: str, of: Collection[int] | None = None) -> int:
        if self.stage != stage:
            raise SecAggError(f"a message of the {stage} stage arrived in the {self.stage} stage of attempt "
                              f"{self.attempt}")
        if worker not in self.index:
            raise SecAggError(f"{worker} is not a participant of attempt {self.attempt}")
        me = self.index[worker]
        if of is not None and me not in of:
            raise SecAggError(f"{worker} dropped out of attempt {self.attempt} before the {stage} stage")
        return me

    def _require(self, members: Collection[int], stage: str) -> None:
        if len(members) < MIN_INPUTS:
            raise SecAggAbort(f"only {len(members)} worker(s) reached the {stage} stage; secure aggregation needs "
                              f"at least {MIN_INPUTS}")

    def holder(self, owner: int, revealer: int) -> int:
        """The Shamir x-coordinate of ``revealer``'s share of ``owner``'s secrets: its place among ``owner``'s
        neighbours, from 1 (the order :meth:`ClientSession.share` dealt them in)."""
        return sorted(self.graph[owner]).index(revealer) + 1

    # -- 1. keys ---------------------------------------------------------------------------------------------------
    def add_keys(self, worker: str, c_pk: bytes, s_pk: bytes) -> None:
        me = self._member(worker, "keys")
        if me in self.keys:
            raise SecAggError(f"{worker} advertised keys twice in attempt {self.attempt}")
        if len(c_pk) != P.KEY_BYTES or len(s_pk) != P.KEY_BYTES or c_pk == s_pk:
            raise SecAggError("the public keys must be two distinct 32-byte X25519 keys")
        self.keys[me] = (bytes(c_pk), bytes(s_pk))

    def close_keys(self) -> dict[str, tuple[int, dict[int, tuple[bytes, bytes]], int]]:
        """Draw the graph over U1: ``{worker: (its index, its neighbours' public keys, t)}``."""
        self._require(self.keys, "keys")
        members = sorted(self.keys)
        drawn = neighbourhoods(len(members), self._k)
        self.graph = {members[i]: frozenset(members[j] for j in drawn[i]) for i in range(len(members))}
        k = min(len(n) for n in self.graph.values())
        self.threshold = threshold_for(k, self._fraction)
        self.stage = "shares"
        return {self.worker_at[u]: (u, {v: self.keys[v] for v in sorted(self.graph[u])}, self.threshold)
                for u in members}

    # -- 2. shares -------------------------------------------------------------------------------------------------
    def add_shares(self, worker: str, sealed: Mapping[int, bytes]) -> None:
        me = self._member(worker, "shares", self.keys)
        if me in self._sealed:
            raise SecAggError(f"{worker} sent its shares twice in attempt {self.attempt}")
        if set(sealed) != set(self.graph[me]):
            raise SecAggError(f"{worker} sent shares for {sorted(sealed)[:8]}, not for its neighbours")
        if any(len(s) != SEALED_SHARE_BYTES for s in sealed.values()):
            raise SecAggError(f"a sealed share must be {SEALED_SHARE_BYTES} bytes")
        self._sealed[me] = {int(v): bytes(s) for v, s in sealed.items()}

    def close_shares(self) -> dict[str, dict[int, bytes]]:
        """U2: ``{worker: {neighbour: the share it sealed to worker}}`` for every worker of U2."""
        self._require(self._sealed, "shares")
        self.u2 = set(self._sealed)
        self.stage = "inputs"
        return {self.worker_at[u]: {v: self._sealed[v][u] for v in sorted(self.graph[u] & self.u2)}
                for u in sorted(self.u2)}

    # -- 3. inputs -------------------------------------------------------------------------------------------------
    def add_input(self, worker: str, masked: np.ndarray, weight: float) -> None:
        me = self._member(worker, "inputs", self.u2)
        if me in self.u3:
            raise SecAggError(f"{worker} sent a second masked input in attempt {self.attempt}")
        if masked.dtype != np.uint32 or masked.shape != (self.length,):
            raise SecAggError(f"a masked input must be {self.length} uint32 values, not {masked.dtype} "
                              f"{masked.shape}")
        if not 0 < weight <= 1:
            raise SecAggError(f"an input's weight must be in (0, 1], got {weight}")
        self._total += masked
        self.u3.add(me)
        self.weights[me] = float(weight)

    def close_inputs(self) -> dict[str, tuple[list[int], list[int]]]:
        """U3: ``{worker: (its neighbours in U3, its neighbours that dropped after sharing)}`` to ask for reveals."""
        self._require(self.u3, "inputs")
        self.stage = "reveals"
        dropped = self.u2 - self.u3
        for u in self.u3:
            self._told[u] = (frozenset(self.graph[u] & self.u3), frozenset(self.graph[u] & dropped))
        return {self.worker_at[u]: (sorted(self._told[u][0]), sorted(self._told[u][1])) for u in sorted(self.u3)}

    # -- 4. reveals ------------------------------------------------------------------------------------------------
    def add_reveal(self, worker: str, seeds: Mapping[int, bytes], keys: Mapping[int, bytes]) -> None:
        me = self._member(worker, "reveals", self.u3)
        if me in self.revealed:
            raise SecAggError(f"{worker} revealed twice in attempt {self.attempt}")
        alive, gone = self._told[me]
        if set(seeds) != set(alive) or set(keys) != set(gone):
            raise SecAggError(f"{worker} revealed shares for other workers than it was asked about")
        if any(len(s) != P.SECRET_BYTES for s in seeds.values()) or any(len(s) != P.KEY_BYTES for s in keys.values()):
            raise SecAggError("a revealed share has the wrong size")
        for v, share in seeds.items():
            self._b_shares.setdefault(v, {})[self.holder(v, me)] = bytes(share)
        for v, share in keys.items():
            self._s_shares.setdefault(v, {})[self.holder(v, me)] = bytes(share)
        self.revealed.add(me)

    def can_finish(self) -> bool:
        """Every secret the unmasking needs has t shares already (the remaining reveals would add nothing)."""
        if self.stage != "reveals":
            return False
        return all(len(self._b_shares.get(u, {})) >= self.threshold for u in self.u3) and all(
            len(self._s_shares.get(v, {})) >= self.threshold for v in self.u2 - self.u3)

    def finish(self) -> Summed:
        """Remove every mask and decode: the float64 sum of U3's inputs (weighted as each worker weighted it)."""
        if self.stage != "reveals":
            raise SecAggError(f"finish in the {self.stage} stage")
        self.stage = "done"
        total = self._total.copy()
        for u in sorted(self.u3):
            b = P.combine(self._enough(self._b_shares, u, "self-mask seed"))
            total -= P.expand(P.derive(b, b"self", self.ctx), self.length)
        for v in sorted(self.u2 - self.u3):
            s = P.KeyPair(P.combine(self._enough(self._s_shares, v, "mask key")))
            if s.public != self.keys[v][1]:
                raise SecAggAbort(f"the shares of worker index {v}'s mask key do not reconstruct it")
            for w in sorted(self.graph[v] & self.u3):
                m = P.expand(s.agree(self.keys[w][1], b"mask", self.ctx), self.length)
                if w < v:  # w added +m
                    total -= m
                else:
                    total += m
        return Summed(self.field.decode_sum(total, len(self.u3)), [self.worker_at[u] for u in sorted(self.u3)],
                      {self.worker_at[u]: self.weights[u] for u in sorted(self.u3)})

    def _enough(self, shares: dict[int, dict[int, bytes]], owner: int, what: str) -> dict[int, bytes]:
        got = shares.get(owner, {})
        if len(got) < self.threshold:
            raise SecAggAbort(f"{len(got)} shares of a {what} arrived; {self.threshold} are needed")
        return dict(sorted(got.items())[:self.threshold])

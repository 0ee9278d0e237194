"""A worker's side of one secure-aggregation attempt (Bonawitz et al. §4, with SecAgg+ neighbourhoods).

Stages, each called once and in order — a session never masks twice and never reveals twice, so no masked input
and no secret of one attempt can be combined with another (a new attempt is a new session, with fresh keys):

1. :meth:`public_keys` — two fresh X25519 pairs: ``c`` to encrypt shares, ``s`` to agree pairwise masks.
2. :meth:`share` — given its index, its neighbours' public keys and the threshold t: t-of-k Shamir shares of its
   self-mask seed b and of its ``s`` private key, each neighbour's pair sealed to that neighbour.
3. :meth:`receive` — the shares its neighbours sealed to it; those neighbours are the ones it masks with.
4. :meth:`mask` — y = q + PRG(b) + Σ_v ±PRG(KA(s, s_v)) mod 2^32 (+ when this worker's index is the smaller).
5. :meth:`reveal` — for each neighbour the broker says survived, its share of that neighbour's b; for each it says
   dropped, its share of that neighbour's ``s`` key; never both for one neighbour, and nothing when fewer than t
   workers (itself included) survived.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping

import numpy as np

from fedctl.secagg import primitives as P
from fedctl.secagg.errors import SecAggError

Peers = Mapping[int, tuple[bytes, bytes]]
"""A worker's neighbours: index -> (c public key, s public key)."""
SHARE_PLAINTEXT = 8 + P.SECRET_BYTES + P.KEY_BYTES
"""from, to (uint32 each), the share of b, the share of the s private key."""


def share_aad(ctx: bytes, sender: int, recipient: int) -> bytes:
    return ctx + struct.pack(">II", sender, recipient)


class ClientSession:
    """One worker in one attempt (``round_no``, ``attempt``)."""

    def __init__(self, round_no: int, attempt: int) -> None:
        self.ctx = P.context(round_no, attempt)
        self._c, self._s = P.KeyPair(), P.KeyPair()
        self._b = os.urandom(P.SECRET_BYTES)
        self._stage = "keys"
        self.me = -1
        self.peers: dict[int, tuple[bytes, bytes]] = {}
        self.threshold = 0
        self._held: dict[int, tuple[bytes, bytes]] = {}
        self.maskers: list[int] = []
        """The neighbours whose shares arrived: the pairwise masks of :meth:`mask`."""

    def _advance(self, expected: str, then: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"secure aggregation: {then} asked at stage {self._stage!r}, not after {expected!r}")
        self._stage = then

    def public_keys(self) -> tuple[bytes, bytes]:
        self._advance("keys", "share")
        return self._c.public, self._s.public

    def share(self, me: int, peers: Peers, threshold: int) -> dict[int, bytes]:
        """Sealed shares for each neighbour (``{index: ciphertext}``)."""
        self._advance("share", "receive")
        if me in peers or not peers:
            raise SecAggError(f"the neighbour list is {'empty' if not peers else 'this worker itself'}")
        if not 1 <= threshold <= len(peers):
            raise SecAggError(f"threshold {threshold} for {len(peers)} neighbours")
        for index, (c_pk, s_pk) in peers.items():
            if len(c_pk) != P.KEY_BYTES or len(s_pk) != P.KEY_BYTES or c_pk == s_pk:
                raise SecAggError(f"neighbour {index}'s public keys are not two distinct 32-byte keys")
        self.me, self.peers, self.threshold = me, dict(peers), threshold
        order = sorted(peers)
        b_shares = P.split(self._b, threshold, len(order))
        s_shares = P.split(self._s.private, threshold, len(order))
        out = {}
        for position, v in enumerate(order):
            key = self._c.agree(peers[v][0], b"share", self.ctx)
            body = struct.pack(">II", me, v) + b_shares[position] + s_shares[position]
            out[v] = P.seal(key, body, share_aad(self.ctx, me, v))
        return out

    def receive(self, inbox: Mapping[int, bytes]) -> None:
        """Open the shares sealed to this worker; refuses one from a non-neighbour or that does not authenticate."""
        self._advance("receive", "mask")
        for v, sealed in inbox.items():
            if v not in self.peers:
                raise SecAggError(f"a share from {v}, which is not a neighbour")
            key = self._c.agree(self.peers[v][0], b"share", self.ctx)
            body = P.unseal(key, sealed, share_aad(self.ctx, v, self.me))
            if len(body) != SHARE_PLAINTEXT or struct.unpack(">II", body[:8]) != (v, self.me):
                raise SecAggError(f"the share from {v} is not addressed from {v} to {self.me}")
            self._held[v] = (body[8:8 + P.SECRET_BYTES], body[8 + P.SECRET_BYTES:])
        self.maskers = sorted(self._held)

    def mask(self, q: np.ndarray) -> np.ndarray:
        """The masked input of the encoded update ``q`` (uint32), once."""
        self._advance("mask", "reveal")
        y = np.array(q, dtype=np.uint32, copy=True)
        y += P.expand(P.derive(self._b, b"self", self.ctx), len(y))
        for v in self.maskers:
            m = P.expand(self._s.agree(self.peers[v][1], b"mask", self.ctx), len(y))
            if self.me < v:
                y += m
            else:
                y -= m
        return y

    def reveal(self, survivors: Iterable[int], dropped: Iterable[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """``({v: share of b_v} for survivors, {v: share of s_v's private key} for dropped)``, once."""
        self._advance("reveal", "done")
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecAggError(f"neighbour {min(alive & gone)} is said to have both survived and dropped")
        unknown = (alive | gone) - set(self._held)
        if unknown:
            raise SecAggError(f"asked about {min(unknown)}, which shared nothing with this worker")
        if len(alive) + 1 < self.threshold:
            raise SecAggError(f"only {len(alive) + 1} of this worker's neighbourhood survived; at least "
                              f"{self.threshold} must, or a reveal could unmask an input")
        return {v: self._held[v][0] for v in sorted(alive)}, {v: self._held[v][1] for v in sorted(gone)}

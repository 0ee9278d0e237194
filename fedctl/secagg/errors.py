"""Errors of a secure-aggregation attempt."""

from __future__ import annotations


class SecAggError(ValueError):
    """A message of the protocol is wrong (a size, a peer, a replay, a second input): refused, the attempt goes on
    without it."""


class SecAggAbort(RuntimeError):
    """The attempt cannot finish (too few workers left at some stage, a secret with fewer than t shares): nothing of
    it is applied and the round is retried with fresh keys."""

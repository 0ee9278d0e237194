"""The hand-off between an edge broker's two halves: the uplink (a worker of the parent) submits each round the
parent hands it; the edge driver runs it among the edge's own workers and answers with their merged update; the
uplink says when the parent answered the push, and the driver then acknowledges its workers' pushes.

Plain asyncio objects on the edge's one event loop: neither half sees the other's sockets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedctl.strategies.base import ClientResult

Params = dict[str, np.ndarray]


@dataclass
class EdgeOutcome:
    """What a round of the edge gave: the merged update (None: the round failed, ``reason`` says why)."""

    update: ClientResult | None
    reason: str = ""
    workers: int = 0
    """How many of the edge's workers the merged update stands for."""


@dataclass
class EdgeRound:
    """One round of the parent's, handed to this edge: the parent's round number, model and task map."""

    number: int
    weights: Params
    task: dict[str, Any]
    outcome: asyncio.Future[EdgeOutcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    answered: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Set once the parent answered the push (True: acknowledged, False: not used, or the push never went)."""


class EdgeLink:
    """The queue of parent rounds between the uplink and the driver, and the edge's readiness."""

    def __init__(self) -> None:
        self.rounds: asyncio.Queue[EdgeRound | None] = asyncio.Queue()
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        """Set by the driver with the examples of its workers once enough have joined: the uplink joins the
        parent then, with that count."""

    def submit(self, number: int, weights: Params, task: dict[str, Any]) -> EdgeRound:
        job = EdgeRound(number, weights, task)
        self.rounds.put_nowait(job)
        return job

    def close(self) -> None:
        """The parent's run is over (or the uplink stopped): the driver finishes after the round it runs."""
        self.rounds.put_nowait(None)

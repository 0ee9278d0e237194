"""The worker half of an edge broker: one worker of the parent (an ordinary ``join``, ``pull``, ``push``), whose
"training" is a round among the edge's own workers (:class:`~fedctl.edge.driver.EdgeDriver`, over an
:class:`~fedctl.edge.link.EdgeLink`).

It joins with its workers' example count, hands each model the parent sends to the driver, pushes the merged
update it gets back (the worker's own push path: dense, sparse or chunked, CURVE, reconnects and resends included)
and tells the driver how the parent answered. A round that fails at the edge is reported with ``failed``, without
the worker's give-up count: an edge with no worker for a while is not a broken task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fedctl.edge.link import EdgeLink, EdgeRound, Params
from fedctl.errors import ConfigError
from fedctl.models import ModelSpec
from fedctl.strategies.base import ClientResult, Strategy
from fedctl.wire import constants as C
from fedctl.wire.messages import Message
from fedctl.worker.client import Push, Worker, WorkerConfig

log = logging.getLogger(__name__)

BACKEND = "edge"
"""The ``backend`` an edge announces in its ``join`` (the parent's status and dashboard show it)."""


def _no_trainer(spec: ModelSpec) -> Any:
    raise AssertionError("an edge broker trains nothing itself")  # (train() is overridden)


class EdgeUplink(Worker):
    """An edge broker's connection to its parent, as one worker."""

    def __init__(self, config: WorkerConfig, link: EdgeLink, ctx: Any = None) -> None:
        super().__init__(config, _no_trainer, ctx)
        self.link = link
        self.jobs: dict[int, EdgeRound] = {}
        """Rounds handed to the driver whose push the parent has not answered yet, by parent round."""

    async def _round(self, model: Message) -> Message | None:
        if model.get("secagg") is not None:
            raise ConfigError("the parent runs secure aggregation, which an edge broker cannot take part in (it "
                              "would have to pass on its workers' masked inputs one by one)",
                              "run the parent without --secure-aggregation, or connect the workers to it directly")
        return await super()._round(model)

    async def train(self, strategy: Strategy, weights: Params, task: dict[str, Any],
                    round_no: int) -> tuple[ClientResult, Params, dict[str, float]] | None:
        job = self.jobs[round_no] = self.link.submit(round_no, weights, {k: v for k, v in task.items()
                                                                         if not k.startswith("extra")})
        try:
            outcome = await asyncio.shield(job.outcome)
        except BaseException:
            self._settle(round_no, False)  # (the uplink stopped or lost the parent: the workers are told)
            raise
        if outcome.update is None:
            self._settle(round_no, False)
            await self._report_failure(round_no, RuntimeError(outcome.reason))
            return None
        metrics = {k: float(v) for k, v in outcome.update.metrics.items()}
        metrics["edge_workers"] = float(outcome.workers)
        return outcome.update, {}, metrics

    def _settle(self, round_no: int, took: bool) -> None:
        job = self.jobs.pop(round_no, None)
        if job is not None and not job.answered.done():
            job.answered.set_result(took)

    async def _report_failure(self, round_no: int, exc: Exception) -> None:
        assert self.conn is not None
        reason = str(exc).splitlines()[0][:1000]
        log.warning("parent round %d: no update from this edge (%s)", round_no, reason)
        await self.conn.send(C.FAILED, round=round_no, reason=reason)

    async def _push(self, push: Push) -> Message:
        round_no = int(push.fields["round"])
        try:
            reply = await super()._push(push)
        except BaseException:
            if self.unacked is None:  # (kept for a resend after a reconnect otherwise)
                self._settle(round_no, False)
            raise
        if self.unacked is None:
            self._settle(round_no, reply.type == C.ACK)
        return reply

    async def committed(self, result: ClientResult, local: Params) -> None:
        self.rounds_trained += 1
        self.state.seq += 1

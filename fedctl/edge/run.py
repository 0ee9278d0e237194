"""Run an edge broker: its broker half (a :class:`~fedctl.broker.service.Broker` with the
:class:`~fedctl.edge.driver.EdgeDriver`) and its worker half (:class:`~fedctl.edge.uplink.EdgeUplink`) on one event
loop, joined by an :class:`~fedctl.edge.link.EdgeLink`; ``fedctl serve --upstream`` (:class:`fedctl.api.Server`)
builds the broker with the driver and calls :func:`run_edge`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl.broker.config import BrokerConfig
from fedctl.broker.service import Broker
from fedctl.edge.link import EdgeLink
from fedctl.edge.uplink import BACKEND, EdgeUplink
from fedctl.errors import ConfigError, unwrapped
from fedctl.strategies import get_strategy
from fedctl.worker.client import WorkerConfig

log = logging.getLogger(__name__)

EDGE_ROUNDS = 10**9
"""An edge's own round budget: none to speak of — its parent ends the run (``done``), and the edge then ends too."""


@dataclass(frozen=True)
class Upstream:
    """Where an edge broker's parent is and how to reach it (``fedctl serve --upstream``)."""

    connect: str
    edge_id: str | None = None
    """This edge's worker id at the parent (default ``edge-HOST-PORT``, stable across restarts)."""
    server_key: str | None = None
    """The parent's CURVE public key; with ``secret_key``, the link to the parent is CURVE."""
    secret_key: Path | None = None
    connect_timeout_s: float = 60.0


def check_edge(config: BrokerConfig, evaluates: bool) -> None:
    """What an edge refuses at start, each in one line: a policy other than sync, secure aggregation or DP at the
    edge, its own evaluation or target, and a strategy whose updates an edge cannot merge."""
    if config.policy != "sync":
        raise ConfigError(f"an edge broker runs its parent's rounds synchronously, not --policy {config.policy}",
                          "drop --policy (sync is the default) from the edge's command")
    if config.secure_aggregation or config.dp_config() is not None:
        raise ConfigError("an edge broker merges its workers' updates in the clear: no --secure-aggregation or "
                          "--dp-* on an edge", "drop them from the edge; docs/architecture.md says what composes")
    if evaluates or config.target_accuracy is not None or config.fed_eval_every:
        raise ConfigError("an edge broker evaluates nothing: its parent holds the model and decides when the run "
                          "ends", "drop --eval-data, --target-accuracy and --fed-eval-every from the edge (give them "
                          "to the root)")
    get_strategy(config.strategy, config.task).check_hierarchical()


def default_edge_id(endpoint: str) -> str:
    port = endpoint.rsplit(":", 1)[-1] if endpoint.startswith("tcp://") else endpoint.rsplit("/", 1)[-1]
    return f"edge-{socket.gethostname()}-{port}"[:128]


async def run_edge(broker: Broker, link: EdgeLink, upstream: Upstream, ctx: Any) -> dict[str, Any]:
    """Serve this edge's workers with ``broker`` (built with an :class:`EdgeDriver` on ``link``) and take part in the
    parent's run until the parent says it is done; returns the broker's summary with the uplink's under
    ``upstream``. The uplink joins the parent once the driver has its ``--min-workers``."""
    config = broker.config
    spec = broker.core.spec

    async def uplink() -> dict[str, Any]:
        examples = await link.ready
        worker = EdgeUplink(WorkerConfig(
            upstream.connect, upstream.edge_id or default_edge_id(broker.endpoint), BACKEND, examples,
            model=config.model, spec=spec, device=f"edge of {len(broker.registry)} workers",
            connect_timeout_s=upstream.connect_timeout_s, server_key=upstream.server_key,
            secret_key=upstream.secret_key), link, ctx)
        log.info("edge %s: joining %s with %d workers' %d examples", worker.config.worker_id, upstream.connect,
                 len(broker.registry), examples)
        summary = await worker.serve()
        link.close()  # the parent's run is done: so is the edge's, and its workers are told
        return summary

    up = asyncio.ensure_future(uplink())
    down = asyncio.ensure_future(broker.run())
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        for half in (down, up):  # (the uplink failing: the edge stops without telling its workers the run is done)
            failure = half.exception() if half.done() else None
            if failure is not None:
                raise unwrapped(failure)
        summary = await down
        return {**summary, "upstream": await up}
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

"""One OS process of `fedctl bench round`: ``count`` fedctl workers (the real :class:`~fedctl.worker.client.Worker`,
its DEALER, codec and protocol) whose "training" returns w + small fixed noise, until the broker says done.

    python -m fedctl.sim.noop_worker ENDPOINT PREFIX [COUNT]

A process per worker is the shape of every real federation; ``COUNT`` > 1 puts several workers on one event loop
(the one-process figure: broker overhead without the workers' own cost).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import zmq
import zmq.asyncio

from fedctl.memory import reuse_large_buffers
from fedctl.models import ModelSpec
from fedctl.testing.trainers import NoOpTrainer
from fedctl.worker.client import Worker, WorkerConfig

EXAMPLES = 600
NOISE = 1e-3


async def serve(endpoint: str, prefix: str, count: int, *, spec: ModelSpec | None = None, noise: float = NOISE,
                connect_timeout_s: float = 300.0, max_backoff_s: float = 2.0) -> None:
    """``count`` no-op workers on one event loop (named PREFIX-000…, or PREFIX alone) until the broker is done;
    ``spec``: a user task's model (None: the broker's built-in model)."""
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, max(1024, 4 * count + 64))  # (libzmq's default 1023 stops a crew of a thousand)
    try:
        def trainer(model: ModelSpec) -> NoOpTrainer:
            return NoOpTrainer(model, EXAMPLES, noise=noise)

        crew = [Worker(WorkerConfig(endpoint, f"{prefix}-{i:03d}" if count > 1 else prefix, "noop", EXAMPLES,
                                    spec=spec, connect_timeout_s=connect_timeout_s, max_backoff_s=max_backoff_s),
                       trainer, ctx=ctx)
                for i in range(count)]
        async with asyncio.TaskGroup() as tg:
            for worker in crew:
                tg.create_task(worker.serve())
    finally:
        ctx.destroy(linger=0)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m fedctl.sim.noop_worker ENDPOINT PREFIX [COUNT]", file=sys.stderr)
        return 2
    reuse_large_buffers()
    logging.basicConfig(level=logging.WARNING, format=f"[{argv[1]}] %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(argv[0], argv[1], int(argv[2]) if len(argv) == 3 else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

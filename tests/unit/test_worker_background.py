"""The worker's background() task group: its tasks end with the block, a failing task ends the block, and the
block's own error comes out as itself (not in an ExceptionGroup)."""

from __future__ import annotations

import asyncio

import pytest

from fedctl.worker.transport import BrokerLost, background

pytestmark = pytest.mark.timeout(10)


async def forever(started: asyncio.Event) -> None:
    started.set()
    await asyncio.Event().wait()


def test_tasks_end_with_the_block() -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        async with background() as tasks:
            task = tasks.start(forever(started), name="reader")
            await started.wait()
        assert task.cancelled()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(scenario())


def test_the_blocks_error_comes_out_as_itself_after_the_tasks_ended() -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        with pytest.raises(BrokerLost, match="gone"):
            async with background() as tasks:
                task = tasks.start(forever(started), name="heartbeat")
                await started.wait()
                raise BrokerLost("gone")
        assert task.cancelled()

    asyncio.run(scenario())


def test_a_failing_task_cancels_the_block() -> None:
    async def boom() -> None:
        raise RuntimeError("reader crashed")

    async def scenario() -> None:
        reached_the_end = False
        with pytest.raises(ExceptionGroup) as raised:  # noqa: F821 - Python 3.11
            async with background() as tasks:
                tasks.start(boom(), name="reader")
                await asyncio.sleep(5)
                reached_the_end = True
        assert not reached_the_end
        assert [type(e) for e in raised.value.exceptions] == [RuntimeError]

    asyncio.run(scenario())


def test_cancelling_the_owner_cancels_the_tasks() -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        inner: list[asyncio.Task[None]] = []

        async def owner() -> None:
            async with background() as tasks:
                inner.append(tasks.start(forever(started), name="reader"))
                await asyncio.Event().wait()

        outer = asyncio.create_task(owner())
        await started.wait()
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert inner[0].cancelled()

    asyncio.run(scenario())

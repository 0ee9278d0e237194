"""Running the asyncio broker, workers and simulations from plain Python: blocking, or in a background thread with a
handle (``endpoint``, ``wait``, ``stop``) for notebooks.

Each run gets its own event loop and its own ZeroMQ context, destroyed (linger 0) when the run ends, however it ends:
no socket outlives the run. A blocking call made where an event loop already runs in this thread (a Jupyter cell)
runs in a background thread and waits for it, since ``asyncio.run`` cannot nest.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import zmq
import zmq.asyncio

from fedctl.api.results import JoinResult, Run
from fedctl.broker.store import Checkpointer
from fedctl.errors import unwrapped

T = TypeVar("T")
Started = Callable[[str | None], None]
"""What a run calls once it is up, with the endpoint it bound (None: it binds nothing)."""
Main = Callable[[Started], Coroutine[Any, Any, T]]
"""A run: a coroutine function that calls ``started`` once it is up and returns its result."""



@asynccontextmanager
async def private_context() -> AsyncIterator[zmq.asyncio.Context]:
    """A ZeroMQ context of one run; destroyed with linger 0 at the end, which closes any socket still open."""
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


async def _unwrapping(main: Main[T], started: Started) -> T:
    try:
        return await main(started)
    except BaseException as err:
        leaf = unwrapped(err)
        if leaf is err:
            raise
        raise leaf.with_traceback(leaf.__traceback__) from None


def run_blocking(main: Main[T], name: str) -> T:
    """Run ``main`` to its end in this thread's own event loop, or, when this thread already runs a loop (Jupyter),
    in a background thread, waiting for it (an interrupt stops it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_unwrapping(main, lambda endpoint: None))
    handle: Background[T] = Background(main, name)
    try:
        return handle.wait()
    except KeyboardInterrupt:
        with suppress(TimeoutError):  # the interrupt is what the caller hears
            handle.stop()
        raise


_LIVE: weakref.WeakSet[Background[Any]] = weakref.WeakSet()


class Background(Generic[T]):
    """A run in a daemon thread with its own event loop. Construction returns once the run is up (a broker has
    bound its endpoint) and raises what kept it from starting.

    It is a context manager: leaving the ``with`` block stops the run.
    """

    def __init__(self, main: Main[T], name: str) -> None:
        self._endpoint: str | None = None
        self._main = main
        self._future: Future[T] = Future()
        self._up = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[T] | None = None
        self._stopping = False
        self._started = False
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)
        self._thread.start()
        self._up.wait()
        if not self._started and self._future.done() and not self._future.cancelled():
            self._thread.join()
            error = self._future.exception()
            if error is not None:
                raise error
        _LIVE.add(self)

    @property
    def endpoint(self) -> str | None:
        """The endpoint the run bound (``tcp://127.0.0.1:PORT`` for ``tcp://127.0.0.1:*``), if it binds one."""
        return self._endpoint

    def _on_started(self, endpoint: str | None) -> None:
        self._endpoint = endpoint
        self._started = True
        self._up.set()

    def _thread_main(self) -> None:
        try:
            result = asyncio.run(self._async_main())
        except asyncio.CancelledError:
            self._future.cancel()
            self._future.set_running_or_notify_cancel()
        except BaseException as err:  # noqa: BLE001 - handed to the caller of wait()
            self._future.set_exception(err)
        else:
            self._future.set_result(result)
        finally:
            self._up.set()

    async def _async_main(self) -> T:
        with self._lock:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()  # type: ignore[assignment]
            if self._stopping:
                raise asyncio.CancelledError()
        return await _unwrapping(self._main, self._on_started)

    def done(self) -> bool:
        """Whether the run has ended (completed, failed or stopped)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Wait until the run ends and return its result.

        Raises
        ------
        TimeoutError
            The run is still going after ``timeout`` seconds (it goes on).
        concurrent.futures.CancelledError
            The run was stopped.
        FedctlError, ...
            What ended the run.
        """
        return self._future.result(timeout)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the run (if it is still going) and wait until its thread has ended and its sockets are closed.
        A stopped broker's completed rounds stay in its state dir; the same call resumes it.

        Raises
        ------
        TimeoutError
            The thread is still running after ``timeout`` seconds (e.g. a local training step that is still going).
        """
        with self._lock:
            self._stopping = True
            loop, task = self._loop, self._task
        if loop is not None and task is not None and not task.done():
            with suppress(RuntimeError):  # the loop has closed: the run has ended by itself
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} did not stop within {timeout} s")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("stopped" if self._future.cancelled() else "done")
        where = f" on {self.endpoint}" if self.endpoint else ""
        return f"<{type(self).__name__} {self._thread.name}{where} ({state})>"


class BrokerHandle(Background[Run]):
    """A broker running in the background (:func:`fedctl.serve_background`): ``endpoint`` is where workers
    connect, ``wait()`` returns the :class:`~fedctl.api.results.Run`, ``stop()`` ends it, ``metrics`` reads the
    records so far."""

    def __init__(self, main: Main[Run], name: str, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(main, name)

    @property
    def endpoint(self) -> str:
        """Where workers connect: the bound endpoint (``tcp://127.0.0.1:PORT`` for ``tcp://127.0.0.1:*``)."""
        return self._endpoint or ""

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics records written so far."""
        return Checkpointer(self.state_dir).read_metrics()


class WorkerHandle(Background[JoinResult]):
    """A worker running in the background (:func:`fedctl.join_background`): ``wait()`` returns its
    :class:`~fedctl.api.results.JoinResult`, ``stop()`` makes it leave."""


@atexit.register
def _stop_all() -> None:
    """At interpreter exit: stop the runs still going, so their sockets close and their threads end."""
    for handle in list(_LIVE):
        if not handle.done():
            with suppress(TimeoutError):
                handle.stop(timeout=5.0)

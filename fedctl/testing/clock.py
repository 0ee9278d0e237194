"""A fake monotonic clock for tests: time moves only when the test says so."""

from __future__ import annotations


class FakeClock:
    """Callable like ``time.monotonic``; :meth:`advance` moves it forward.

    >>> clock = FakeClock(); clock.advance(2.5); clock()
    102.5
    """

    def __init__(self, start: float = 100.0) -> None:
        self.t = float(start)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.t += seconds
        return self.t

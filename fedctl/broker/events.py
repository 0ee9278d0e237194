"""The broker's recent events (joins, leaves, refusals, checkpoints, rounds) for the operator's live view.

A bounded ring: the dashboard (docs/observability.md) shows the last :data:`MAX_EVENTS`; nothing here is
persisted (metrics.jsonl and the log are the run's record). Each event has a sequence number, so a reader asks
for what came after the last one it saw. Times are the core's clock (``now``, monotonic seconds); a reader turns
them into ages against the same clock. Repeated refusals of one code from one peer within
:data:`COALESCE_S` are one event with a count, so a misbehaving peer cannot push every other event out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

MAX_EVENTS = 200
COALESCE_S = 5.0
MAX_TEXT_CHARS = 250

KINDS = ("join", "rejoin", "leave", "lost", "refused", "round", "checkpoint", "failed", "finished")
"""What an event can be: a worker joined, joined again (a reconnect), left, was lost (silent past the liveness
or unreachable), a message was refused, a round (or version) completed, a checkpoint was written, a round or a
worker's training failed, the run finished."""


@dataclass
class Event:
    seq: int
    at: float
    kind: str
    text: str
    worker: str | None = None
    code: str | None = None
    count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"seq": self.seq, "age_s": round(max(now - self.at, 0.0), 3), "kind": self.kind, "text": self.text,
                "worker": self.worker, "code": self.code, "count": self.count, **self.extra}


class EventLog:
    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=limit)
        self._seq = 0

    def add(self, now: float, kind: str, text: str, *, worker: str | None = None, code: str | None = None,
            **extra: Any) -> None:
        last = self._events[-1] if self._events else None
        if (kind == "refused" and last is not None and last.kind == "refused" and last.code == code
                and last.worker == worker and now - last.at < COALESCE_S):
            last.count += 1
            last.at = now
            self._seq += 1
            last.seq = self._seq  # (a reader that saw it sees it again, with its new count)
            return
        self._seq += 1
        self._events.append(Event(self._seq, now, kind, text[:MAX_TEXT_CHARS], worker, code, 1, extra))

    @property
    def seq(self) -> int:
        """The sequence number of the last event (0: none yet)."""
        return self._seq

    def since(self, seq: int, now: float) -> list[dict[str, Any]]:
        """The events after sequence number ``seq``, oldest first."""
        return [e.as_dict(now) for e in self._events if e.seq > seq]

    def recent(self, count: int, now: float) -> list[dict[str, Any]]:
        """The last ``count`` events, oldest first."""
        chosen = list(self._events)[-count:] if count > 0 else []
        return [e.as_dict(now) for e in chosen]

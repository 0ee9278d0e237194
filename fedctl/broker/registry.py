"""Connected workers: who they are, how to reach them, when they were last heard from, what they wait for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerRecord:
    """One joined worker as the broker sees it."""

    worker: str
    identity: bytes
    backend: str
    num_examples: int
    last_seen: float = 0.0
    pending_pull: int | None = None
    """Message id of the worker's unanswered pull (it waits for a model), or None."""
    holds_version: int | None = None
    """The model version the worker said (in its pull) it holds exactly, for a downlink delta; None: nothing."""
    link_bps: float | None = None
    """The worker's link throughput as it last measured it (bytes/s, its pull's ``link_bps``); None: unknown."""
    device: str | None = None
    """What it trains on, as its join said (``cpu``, ``cuda:0``); None: not said."""
    host: str | None = None
    """Its host name, as its join said."""
    address: str | None = None
    """The network address its connection comes from (ZeroMQ's ``Peer-Address``), when the transport knows it."""
    joined_at: float = 0.0
    updates: int = 0
    """Updates accepted from it since it joined this broker."""
    bytes_in: int = 0
    """Payload bytes received from it / sent to it since it joined."""
    bytes_out: int = 0
    staleness: int | None = None
    """Staleness of its last accepted update, in model versions."""
    handed_at: float | None = None
    """When its last model went out (its push's latency is measured from there); None after its push."""
    handed_round: int | None = None
    rtt_s: float | None = None
    """Its last heartbeat round trip as it measured it (its heartbeat's ``rtt``)."""


class WorkerRegistry:
    """Workers by id and by routing identity; liveness from the time each was last heard from."""

    def __init__(self, liveness_s: float) -> None:
        self.liveness_s = liveness_s
        self._by_id: dict[str, WorkerRecord] = {}
        self._by_identity: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, worker: str) -> bool:
        return worker in self._by_id

    def add(self, record: WorkerRecord) -> bool:
        """Register (or re-register after a reconnect) a worker; True when it was already known."""
        old = self._by_id.get(record.worker)
        if old is not None:
            self._by_identity.pop(old.identity, None)
        self._by_id[record.worker] = record
        self._by_identity[record.identity] = record.worker
        return old is not None

    def by_identity(self, identity: bytes) -> WorkerRecord | None:
        worker = self._by_identity.get(identity)
        return self._by_id.get(worker) if worker is not None else None

    def get(self, worker: str) -> WorkerRecord | None:
        return self._by_id.get(worker)

    def remove(self, worker: str) -> WorkerRecord | None:
        record = self._by_id.pop(worker, None)
        if record is not None:
            self._by_identity.pop(record.identity, None)
        return record

    def expired(self, now: float) -> list[WorkerRecord]:
        """Workers not heard from for longer than the liveness interval."""
        return [r for r in self._by_id.values() if now - r.last_seen > self.liveness_s]

    def all(self) -> list[WorkerRecord]:
        return list(self._by_id.values())

    def waiting(self) -> list[WorkerRecord]:
        """Workers with an unanswered pull, in join order."""
        return [r for r in self._by_id.values() if r.pending_pull is not None]

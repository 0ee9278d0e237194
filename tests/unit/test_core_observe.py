"""What the core tells an operator: the per-worker status entries, recent events, push latency and heartbeat
round trips (docs/protocol.md §7.5, docs/observability.md)."""

from __future__ import annotations

from typing import Any

from coresim import CoreSim, Peer
from test_core import joined, shifted

from fedctl.broker.events import COALESCE_S, MAX_EVENTS, EventLog
from fedctl.broker.registry import WorkerRecord
from fedctl.wire import constants as C
from fedctl.wire import encode, make


def test_worker_entries_follow_a_round() -> None:
    sim = CoreSim()
    seen: list[tuple[str, float]] = []
    sim.core.observer = lambda name, value: seen.append((name, value))
    a = Peer(sim, "a")
    sim.core.peer_seen(a.identity, "10.1.2.3")
    a.send(C.JOIN, worker="a", backend="torch", num_examples=100, device="cuda:0", host="h1")
    [b] = joined(sim, "b")
    entry = {w["worker"]: w for w in sim.core.status(sim.clock())["workers"]}
    assert (entry["a"]["device"], entry["a"]["address"], entry["a"]["state"]) == ("cuda:0", "10.1.2.3", "idle")
    assert entry["b"]["device"] is None and entry["b"]["address"] is None
    start = dict(sim.store.weights)
    a.pull()
    b.pull()
    assert {w["state"] for w in sim.core.status(sim.clock())["workers"]} == {"waiting"}
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    assert {w["state"] for w in sim.core.status(sim.clock())["workers"]} == {"training"}
    sim.clock.advance(2.5)
    a.push(shifted(start, 1), 1)
    sim.clock.advance(1.0)
    b.push(shifted(start, 2), 1)
    assert seen == [("push_latency_s", 2.5), ("push_latency_s", 3.5)]
    status = sim.core.status(sim.clock())
    entry = {w["worker"]: w for w in status["workers"]}
    assert entry["a"]["updates"] == 1 and entry["a"]["staleness"] == 0 and entry["a"]["state"] == "idle"
    assert entry["a"]["bytes_in"] > 400_000 and entry["a"]["bytes_out"] == 0, "the shell counts what it sends"
    a.send(C.HEARTBEAT, t=1.0, rtt=0.004)
    assert seen[-1] == ("heartbeat_rtt_s", 0.004)
    assert sim.core.status(sim.clock())["workers"][0]["rtt_s"] == 0.004


def test_events_name_joins_leaves_losses_and_refusals() -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.join()  # a join retried on the same connection: welcomed again, no event
    a.identity = b"\x01a"
    a.join()  # from a new connection: a reconnect as the broker sees it
    a.send(C.LEAVE, reason="maintenance")
    for _ in range(5):
        b.send(C.PUSH, round=9, base_version=0, seq=1, kind=C.KIND_WEIGHTS, num_examples=1)
    sim.tick(sim.core.config.liveness_s + 1)
    events = sim.core.status(sim.clock())["events"]
    kinds = [e["kind"] for e in events]
    assert kinds == ["join", "join", "rejoin", "leave", "refused", "lost"], kinds
    refused = events[4]
    assert refused["count"] == 5 and refused["worker"] == "b" and refused["code"] is not None
    assert "maintenance" in events[3]["text"] and events[5]["worker"] == "b"
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)


def test_event_log_is_bounded_and_read_after_a_cursor() -> None:
    log = EventLog()
    for i in range(MAX_EVENTS + 50):
        log.add(float(i), "join", f"w{i} joined", worker=f"w{i}")
    assert len(log.since(0, 1e9)) == MAX_EVENTS and log.since(log.seq, 1e9) == []
    cursor = log.seq
    log.add(1000.0, "refused", "x", worker="p", code="BAD_FIELD")
    log.add(1000.0 + COALESCE_S / 2, "refused", "x", worker="p", code="BAD_FIELD")
    [again] = log.since(cursor, 1001.0)
    assert again["count"] == 2, "a reader past the first refusal sees it again with its new count"
    log.add(1000.0 + COALESCE_S * 2, "refused", "x", worker="p", code="BAD_FIELD")
    assert [e["count"] for e in log.since(cursor, 2000.0)] == [2, 1]


def test_the_largest_status_reply_fits_one_header() -> None:
    sim = CoreSim()
    for i in range(C.MAX_STATUS_WORKERS + 5):
        name = f"{i:03d}" + "w" * (C.MAX_ID_CHARS - 3)
        record = WorkerRecord(name, name.encode(), "b" * C.MAX_BACKEND_CHARS, 2**40, 0.0,
                              device="d" * C.MAX_BACKEND_CHARS, address="ffff:" * 9, link_bps=2.0**50,
                              holds_version=2**40, updates=2**40, bytes_in=2**60, bytes_out=2**60, staleness=2**40,
                              rtt_s=1.234567, pending_pull=1)
        sim.core.registry.add(record)
    for i in range(C.MAX_STATUS_EVENTS + 5):
        sim.core.events.add(float(i), "refused", "x" * 400, worker="w" * C.MAX_ID_CHARS, code="BAD_FIELD_" * 3)
        sim.core.events.add(float(i) + 0.5, "join", "y" * 250, worker="v" * C.MAX_ID_CHARS)
    for code in range(40):
        sim.core.rejected[f"CODE_{code:02d}_" + "X" * 20] = 2**40
    status: dict[str, Any] = sim.core.status(1e6)
    assert len(status["workers"]) == C.MAX_STATUS_WORKERS and len(status["events"]) == C.MAX_STATUS_EVENTS
    header = encode(make(C.STATUS_REPLY, 2**40, re=2**40, status=status))[0]
    assert 0.5 * C.MAX_HEADER_BYTES < len(header) <= C.MAX_HEADER_BYTES, len(header)

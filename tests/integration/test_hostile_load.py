"""Every behaviour of the hostile client (fedctl.testing.hostile) at once, for a whole seeded run: the broker
survives, the honest workers finish, the final model is bit-identical to an undisturbed run's, and the attack is
refused by code. scripts/hostile_run.py is the full-size version (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.errors import ProtocolError
from fedctl.testing.hostile import DEFAULT_BEHAVIOURS, HostileClient, HostileConfig, HostileStats, reply_key
from fedctl.testing.hostile_payloads import hostile_tensor_cases
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make

WORKERS, ROUNDS = 3, 3
MAX_MESSAGE_BYTES = 600_000  # above the MLP's largest frame (fc1.weight, 401 kB)
IDENTITIES, HALF_OPEN = 50, 20


def config(fed: Any, state_dir: Path) -> Any:
    # A deadline far beyond the run: a round that failed for time would resample and change the model.
    return fed.broker_config(state_dir, rounds=ROUNDS, seed=11, sync=SyncConfig(1.0, WORKERS, 60.0),
                             max_message_bytes=MAX_MESSAGE_BYTES, liveness_s=10.0)


async def wait_joined(broker: Broker, names: list[str], timeout_s: float = 15.0) -> float:
    """Seconds until every name in ``names`` is a joined worker."""
    started = time.monotonic()
    while not all(n in broker.registry for n in names):
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"honest workers did not join within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def federation(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, attacked: bool) -> dict[str, Any]:
    broker = fed.start_broker(ctx, config(fed, state_dir))
    workers = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(WORKERS)]
    client = HostileClient(HostileConfig(broker.endpoint, DEFAULT_BEHAVIOURS, IDENTITIES, HALF_OPEN,
                                         MAX_MESSAGE_BYTES, burst=3, interval_s=0.01, seed=5), ctx)
    out: dict[str, Any] = {}
    attack: asyncio.Task[HostileStats] | None = None
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(broker.run())
        if attacked:
            attack = tg.create_task(client.run())
            await client.wait_ready()  # the flood joined, every half-open connection is held
            out["half_open_at_join"] = (client.stats.connections["half_open"], client.stats.dropped["half_open"])
        crew = [tg.create_task(w.serve()) for w in workers]
        out["join_s"] = await wait_joined(broker, [f"w{i}" for i in range(WORKERS)])
        await run
        client.stop()
    out.update(summary=run.result(), workers=[t.result() for t in crew], weights=broker.store.weights,
               rejected=dict(broker.rejected), stats=attack.result() if attack else None)
    return out


def check_attack(stats: HostileStats, rejected: dict[str, int]) -> None:
    for kind in ("MALFORMED", "BAD_TENSOR", "TOO_LARGE", "NON_FINITE", "BAD_FIELD", "WRONG_KIND", "NOT_SELECTED"):
        assert rejected.get(kind, 0) > 0, f"no {kind} refusal: {rejected}"
    assert set(stats.replies_to("garbage")) == {"error:MALFORMED"}
    assert set(stats.replies_to("truncated")) <= {"error:MALFORMED", "error:BAD_TENSOR"}
    tensors = stats.replies_to("hostile_tensors")
    assert tensors and all(k.startswith("error:") for k in tensors), tensors
    # Pushes for rounds the rogue was never given: never accepted (after the run: RUN_FINISHED).
    rogue = stats.replies_to("rogue_push")
    assert rogue.get("welcome") == 1 and "ack" not in rogue, rogue
    assert rogue.get("error:NOT_SELECTED", 0) + rogue.get("error:STALE_UPDATE", 0) > 0, rogue
    flood = stats.replies_to("flood")
    assert flood.get("welcome") == IDENTITIES and flood.get("heartbeat", 0) > 0, flood
    # Above ZMQ_MAXMSGSIZE libzmq drops the connection: no reply, and the monitor saw every drop.
    assert stats.sent["oversized"] > 0 and stats.dropped["oversized"] >= stats.sent["oversized"] - 1
    assert not stats.replies_to("oversized") and not any(k.endswith(":undecodable") for k in stats.replies)


@pytest.mark.timeout(90)
def test_the_broker_shrugs_off_every_hostile_behaviour(fed: Any, ctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    (tmp_path / "attacked").mkdir()
    clean = fed.run_async(federation(fed, ctx, tmp_path / "clean", attacked=False), timeout_s=40)
    hit = fed.run_async(federation(fed, ctx, tmp_path / "attacked", attacked=True), timeout_s=40)

    assert clean["summary"]["rejected"] == {}
    for run in (clean, hit):
        assert run["summary"]["rounds"] == ROUNDS and run["summary"]["version"] == ROUNDS
        assert all(w["final_round"] == ROUNDS and w["rounds_trained"] == ROUNDS for w in run["workers"])
    metrics = fed.read_metrics(tmp_path / "attacked")
    assert [m["participants"] for m in metrics] == [WORKERS] * ROUNDS

    assert list(clean["weights"]) == list(hit["weights"])
    for name, w in clean["weights"].items():
        assert w.tobytes() == hit["weights"][name].tobytes(), f"{name} differs under attack"
    assert all(np.isfinite(w).all() for w in hit["weights"].values())

    check_attack(hit["stats"], hit["rejected"])
    # Honest workers joined while every half-open connection was still held (libzmq closes them after 30 s).
    assert hit["half_open_at_join"] == (HALF_OPEN, 0)
    assert hit["join_s"] < 10.0


def test_reply_key_names_errors_by_code() -> None:
    assert reply_key(encode(make(C.ERROR, 1, code=204, reason="dup"))) == "error:DUPLICATE"
    assert reply_key(encode(make(C.ERROR, 1, code=999, reason="?"))) == "error:999"
    assert reply_key(encode(make(C.HEARTBEAT, 2, t=1.0))) == "heartbeat"
    assert reply_key([b"\xc1"]) == "undecodable"


@pytest.mark.parametrize("frames", [f for _, f in hostile_tensor_cases()], ids=[n for n, _ in hostile_tensor_cases()])
def test_every_hostile_payload_is_refused_by_the_decoder(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames, C.WORKER_TO_BROKER)

"""CURVE over real sockets: an allowed worker runs; unknown keys, wrong server keys and plaintext get nothing.

"Nothing" is checked on the broker's side too: no message reaches its transport (``counters.messages_in``), its
registry stays empty and its model does not move. The ZAP refusal of an unknown key is logged at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.errors import ConfigError, TransportError
from fedctl.models import get_model, init_params
from fedctl.security import RELOAD_EVERY_S, KeyPair, generate_key_pair, is_local_bind, load_key_pair, resolve_public_key
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
SILENCE_S = 1.5
"""How long a refused peer waits for a reply that must not come."""


@dataclass(frozen=True)
class Keys:
    broker_secret: Path
    broker: KeyPair
    allowed_dir: Path
    worker_secret: Path
    worker: KeyPair
    stranger_secret: Path
    stranger: KeyPair
    stranger_public: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """A broker key pair, one allowed worker (its public key copied to allowed/) and a stranger."""
    _, broker_secret, _ = generate_key_pair(tmp_path / "broker", "broker")
    worker_public, worker_secret, _ = generate_key_pair(tmp_path / "worker", "w0")
    stranger_public, stranger_secret, _ = generate_key_pair(tmp_path / "stranger", "stranger")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(worker_public, allowed / worker_public.name)
    return Keys(broker_secret, load_key_pair(broker_secret), allowed, worker_secret, load_key_pair(worker_secret),
                stranger_secret, load_key_pair(stranger_secret), stranger_public)


def curve_config(fed: Any, state_dir: Path, keys: Keys, **overrides: Any) -> Any:
    options: dict[str, Any] = {"rounds": 2, "sync": SyncConfig(1.0, 1, 20.0), "curve_secret_key": keys.broker_secret,
                               "allowed_keys": keys.allowed_dir}
    options.update(overrides)
    return fed.broker_config(state_dir, **options)


async def with_serving_broker(fed: Any, ctx: zmq.asyncio.Context, config: Any,
                              body: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``body(broker)`` while the broker serves (waiting for workers), then stop the broker."""
    broker = fed.start_broker(ctx, config)
    serving = asyncio.create_task(broker.run())
    try:
        return await body(broker)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


def raw_dealer(ctx: zmq.asyncio.Context, endpoint: str, server_key: bytes | None = None,
               pair: KeyPair | None = None) -> zmq.asyncio.Socket:
    """A bare DEALER: plaintext, or a CURVE client with ``pair`` expecting the server key ``server_key``."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if pair is not None and server_key is not None:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = pair.secret, pair.public, server_key
    sock.connect(endpoint)
    return sock


async def join_and_push(sock: zmq.asyncio.Socket) -> list[bytes] | None:
    """Send a raw join and a raw push of a whole model; the first reply, or None after SILENCE_S of silence.

    A DEALER whose CURVE handshake was refused may have no pipe left to queue on (libzmq tears the session down and
    reconnects), and a send then waits for one forever: a send that cannot go out within SILENCE_S is a refusal."""
    push = make(C.PUSH, 2, tensors=init_params(get_model("mlp"), 3), round=1, base_version=0, seq=0,
                kind="weights", num_examples=10)
    try:
        async with asyncio.timeout(SILENCE_S):
            await sock.send_multipart(encode(make(C.JOIN, 1, worker="raw", backend="numpy", num_examples=10)))
            await sock.send_multipart(encode(push))
    except TimeoutError:
        return None
    if await sock.poll(int(SILENCE_S * 1000), zmq.POLLIN):
        return list(await sock.recv_multipart())
    return None


def assert_untouched(broker: Any) -> None:
    assert broker.transport.counters.messages_in == 0, "a refused peer's message reached the broker"
    assert len(broker.registry) == 0 and broker.updates == []
    assert broker.store.version == 0 and broker.state["round"] == 0


def test_allowed_worker_completes_a_run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, keys: Keys) -> None:
    async def scenario() -> list[Any]:
        broker = fed.start_broker(ctx, curve_config(fed, state_dir, keys))
        assert broker.transport.public_key == keys.broker.public
        worker = fed.mlp_worker(ctx, broker.endpoint, 0, server_key=keys.broker.public.decode(),
                                secret_key=keys.worker_secret)
        return await fed.run_federation(broker, [worker])

    summary, result = fed.run_async(scenario())
    assert summary["rounds"] == 2 and summary["version"] == 2 and summary["rejected"] == {}
    assert result["rounds_trained"] == 2 and result["final_round"] == 2
    assert [m["participants"] for m in fed.read_metrics(state_dir)] == [1, 1]


@pytest.mark.parametrize("case", ["unknown-key", "wrong-server-key", "plaintext"])
def test_worker_without_the_right_keys_gets_no_welcome(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                       keys: Keys, caplog: pytest.LogCaptureFixture,
                                                       case: str) -> None:
    """A refused key fails the join at its next attempt (libzmq ended the connection), naming the cause; a wrong
    server key makes libzmq retry, so the join times out with the CURVE hint."""
    caplog.set_level(logging.WARNING, logger="fedctl.broker.transport")
    curve = {"unknown-key": {"server_key": keys.broker.public.decode(), "secret_key": keys.stranger_secret},
             "wrong-server-key": {"server_key": keys.stranger.public.decode(), "secret_key": keys.worker_secret},
             "plaintext": {}}[case]
    timeout_s = {"unknown-key": 20.0, "wrong-server-key": 1.5, "plaintext": 3.0}[case]

    async def body(broker: Any) -> tuple[str, float]:
        worker = fed.mlp_worker(ctx, broker.endpoint, 1, connect_timeout_s=timeout_s, **curve)
        started = time.monotonic()
        with pytest.raises(TransportError) as refused:
            await worker.serve()
        assert_untouched(broker)
        return str(refused.value), time.monotonic() - started

    message, elapsed = fed.run_async(with_serving_broker(fed, ctx, curve_config(fed, state_dir, keys), body))
    refusals = [r.getMessage() for r in caplog.records
                if r.name == "fedctl.broker.transport" and "refused worker key" in r.getMessage()]
    if case == "wrong-server-key":
        assert "no broker answered" in message
        assert "if the broker uses CURVE, check --server-key" in message and "--allowed-keys directory" in message
        assert refusals == []  # the handshake never got as far as the ZAP handler
        return
    if case == "plaintext":
        # libzmq either ends the connection (a mechanism mismatch) or retries it (it saw the broker hang up first),
        # so the join fails at its next attempt or at the timeout; both say what to pass.
        assert "--server-key" in message, message
        assert refusals == []
        return
    assert elapsed < 10.0, f"a refused key must fail the join at its next attempt, not at the timeout: {message}"
    assert "refused this worker's CURVE key" in message and keys.stranger.public.decode() in message
    assert "--allowed-keys" in message
    # The ZAP refusal is logged once, naming the key and the directory it is missing from.
    assert len(refusals) == 1, refusals
    assert keys.stranger.public.decode() in refusals[0] and str(keys.allowed_dir) in refusals[0]


@pytest.mark.parametrize("peer", ["plaintext", "wrong-server-key", "unknown-client-key", "allowed"])
def test_raw_peers_without_the_right_keys_reach_nothing(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                        keys: Keys, caplog: pytest.LogCaptureFixture,
                                                        peer: str) -> None:
    caplog.set_level(logging.WARNING, logger="fedctl.broker.transport")
    server_key, pair = {"plaintext": (None, None),
                        "wrong-server-key": (keys.stranger.public, keys.worker),
                        "unknown-client-key": (keys.broker.public, keys.stranger),
                        "allowed": (keys.broker.public, keys.worker)}[peer]

    async def body(broker: Any) -> list[bytes] | None:
        sock = raw_dealer(ctx, broker.endpoint, server_key, pair)
        try:
            reply = await join_and_push(sock)
        finally:
            sock.close(0)
        if peer != "allowed":
            assert_untouched(broker)
        return reply

    reply = fed.run_async(with_serving_broker(fed, ctx, curve_config(fed, state_dir, keys), body))
    if peer == "allowed":  # the control: the same frames with the right keys are answered
        assert reply is not None and decode(reply, C.BROKER_TO_WORKER).type == C.WELCOME
        return
    assert reply is None, f"a {peer} peer got an answer"
    refused = [r.getMessage() for r in caplog.records if "refused worker key" in r.getMessage()]
    if peer == "unknown-client-key":
        assert refused and keys.stranger.public.decode() in refused[0], caplog.text
    else:  # no CURVE handshake got as far as the ZAP handler
        assert refused == []


def test_allowed_keys_directory_is_reread_while_serving(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                        keys: Keys) -> None:
    """A key file copied in admits its worker's next connection; removing it refuses the next one."""
    async def attempt(broker: Any) -> bool:
        sock = raw_dealer(ctx, broker.endpoint, keys.broker.public, keys.stranger)
        try:
            reply = await join_and_push(sock)  # waits SILENCE_S when refused: past the reread interval
        finally:
            sock.close(0)
        return reply is not None and decode(reply, C.BROKER_TO_WORKER).type == C.WELCOME

    async def body(broker: Any) -> list[bool]:
        added = keys.allowed_dir / keys.stranger_public.name
        before = await attempt(broker)
        shutil.copy(keys.stranger_public, added)
        await asyncio.sleep(RELOAD_EVERY_S)
        admitted = await attempt(broker)
        added.unlink()
        await asyncio.sleep(RELOAD_EVERY_S)
        return [before, admitted, await attempt(broker)]

    assert fed.run_async(with_serving_broker(fed, ctx, curve_config(fed, state_dir, keys), body)) == [
        False, True, False]


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:*", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/fedctl.sock", True), ("inproc://fedctl", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://[::]:5555", False),
    ("tcp://10.0.0.9:5555", False), ("tcp://eth0:5555", False), ("tcp://server.example.org:5555", False),
])
def test_which_binds_need_curve(endpoint: str, local: bool) -> None:
    assert is_local_bind(endpoint) is local


def test_key_file_mistakes_are_config_errors(keys: Keys, tmp_path: Path) -> None:
    public_only = keys.allowed_dir / "w0.key"
    with pytest.raises(ConfigError, match="holds only a public key"):
        load_key_pair(public_only)
    with pytest.raises(ConfigError, match="no such key file"):
        load_key_pair(tmp_path / "missing.key_secret")
    mixed = tmp_path / "mixed.key_secret"
    text = keys.worker_secret.read_text()
    mixed.write_text(text.replace(keys.worker.public.decode(), keys.stranger.public.decode()))
    with pytest.raises(ConfigError, match="do not belong together"):
        load_key_pair(mixed)
    assert resolve_public_key(str(public_only)) == keys.worker.public
    assert resolve_public_key(keys.worker.public.decode()) == keys.worker.public
    with pytest.raises(ConfigError, match="40-character Z85"):
        resolve_public_key("x" * 39)


def test_secure_aggregation_over_curve(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, keys: Keys) -> None:
    """Secure aggregation's messages (keys, sealed shares, masked inputs, reveals) over CURVE: two workers with
    the same allowed key pair complete a secure run."""
    async def scenario() -> list[Any]:
        broker = fed.start_broker(ctx, curve_config(fed, state_dir, keys, sync=SyncConfig(1.0, 2, 20.0),
                                                    secure_aggregation=True))
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, server_key=keys.broker.public.decode(),
                                  secret_key=keys.worker_secret) for i in range(2)]
        return await fed.run_federation(broker, workers)

    summary, *results = fed.run_async(scenario())
    assert summary["rounds"] == 2 and summary["rejected"] == {}
    assert all(r["rounds_trained"] == 2 for r in results)
    assert [m["secagg"]["inputs"] for m in fed.read_metrics(state_dir)] == [2, 2]

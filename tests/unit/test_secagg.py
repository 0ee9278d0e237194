"""Secure aggregation's two state machines without a network (fedctl/secagg): the broker's sum equals the sum of
the survivors' inputs whatever stage the others dropped at, it never sees an input, and every message that breaks
the protocol is refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedctl.secagg import ClientSession, Field, SecAggAbort, SecAggError, ServerSession, neighbourhoods, threshold_for
from fedctl.secagg import primitives as P

LENGTH = 257


def inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"w{i:02d}": rng.normal(0, 0.5, LENGTH) for i in range(n)}


def run(xs: dict[str, np.ndarray], drop: dict[str, str] | None = None, k: int | None = None,
        fraction: float = 0.5, field: Field | None = None) -> tuple[ServerSession, dict[str, ClientSession], object]:
    """One attempt; ``drop[worker]`` is the stage before which that worker vanishes (keys, shares, input, reveal)."""
    drop = drop or {}
    field = field or Field(4.0, len(xs))
    server = ServerSession(7, 12345, list(xs), LENGTH, field, neighbours=k, threshold=fraction)
    clients = {w: ClientSession(7, 12345) for w in xs}
    alive = lambda stage: [w for w in xs if drop.get(w) not in stage]  # noqa: E731
    for w in alive({"keys"}):
        server.add_keys(w, *clients[w].public_keys())
    peers = server.close_keys()
    for w in alive({"keys", "shares"}):
        me, their_keys, t = peers[w]
        server.add_shares(w, clients[w].share(me, their_keys, t))
    inbox = server.close_shares()
    for w in alive({"keys", "shares", "input"}):
        clients[w].receive(inbox[w])
        q, _ = field.encode(xs[w])
        server.add_input(w, clients[w].mask(q), 1.0)
    asked = server.close_inputs()
    for w in alive({"keys", "shares", "input", "reveal"}):
        server.add_reveal(w, *clients[w].reveal(*asked[w]))
    return server, clients, server.finish()


def expected(xs: dict[str, np.ndarray], workers: list[str], field: Field) -> np.ndarray:
    step = 2 * field.clip / field.levels
    return sum(field.encode(xs[w])[0].astype(np.float64) * step - field.clip for w in workers)


def test_the_sum_of_all_inputs_and_nothing_else() -> None:
    xs = inputs(6)
    server, _, summed = run(xs)
    field = Field(4.0, 6)
    assert summed.workers == sorted(xs)
    np.testing.assert_allclose(summed.total, expected(xs, sorted(xs), field), atol=1e-9)
    np.testing.assert_allclose(summed.total, sum(xs.values()), atol=6 * field.clip / field.levels)
    assert server.threshold == 3 and all(len(n) == 5 for n in server.graph.values()), "6 workers: complete graph"


@pytest.mark.parametrize("k, fraction, drop", [
    (None, 0.5, {"w00": "keys", "w03": "shares", "w05": "input", "w08": "reveal"}),
    # k = 4, t = 2: any worker keeps at least 2 revealing neighbours when 2 workers drop (the graph is random).
    (4, 0.25, {"w05": "input", "w08": "reveal"}),
])
def test_dropouts_at_every_stage_leave_the_survivors_sum(k: int | None, fraction: float,
                                                         drop: dict[str, str]) -> None:
    xs = inputs(12, seed=1)
    for _ in range(5):  # five random graphs
        server, _, summed = run(xs, drop, k=k, fraction=fraction)
        survivors = [w for w in sorted(xs) if drop.get(w) not in ("keys", "shares", "input")]
        assert summed.workers == survivors and "w08" in survivors, "a worker that dropped after its input counts"
        np.testing.assert_allclose(summed.total, expected(xs, survivors, Field(4.0, 12)), atol=1e-9)
    if k == 4:
        assert {len(n) for n in server.graph.values()} == {4} and server.threshold == 2


def test_a_masked_input_looks_nothing_like_the_input() -> None:
    xs = inputs(3)
    field = Field(4.0, 3)
    server = ServerSession(1, 1, list(xs), LENGTH, field)
    clients = {w: ClientSession(1, 1) for w in xs}
    for w in xs:
        server.add_keys(w, *clients[w].public_keys())
    for w, (me, keys, t) in server.close_keys().items():
        server.add_shares(w, clients[w].share(me, keys, t))
    for w, box in server.close_shares().items():
        clients[w].receive(box)
    q, _ = field.encode(xs["w00"])
    y = clients["w00"].mask(q)
    assert abs(np.corrcoef(q.astype(np.float64), y.astype(np.float64))[0, 1]) < 0.25
    assert y.std() > 2**29, "masked values spread over the whole field"


def test_fewer_than_t_reveals_abort_the_attempt() -> None:
    xs = inputs(6, seed=2)
    with pytest.raises(SecAggAbort, match="shares of a self-mask seed arrived; 4 are needed"):
        run(xs, {"w01": "reveal", "w02": "reveal", "w03": "reveal"}, fraction=0.6)


def test_too_few_workers_at_a_stage_abort() -> None:
    with pytest.raises(SecAggAbort, match="only 1 worker"):
        run(inputs(3), {"w00": "input", "w01": "input"})


def test_the_sum_of_the_largest_inputs_does_not_wrap() -> None:
    field = Field(1.0, 100)
    q, clipped = field.encode(np.full(5, 3.0))
    assert clipped == 5 and int(q.max()) == field.levels and field.bits == 25
    total = np.zeros(5, np.uint32)
    for _ in range(100):
        total += q
    np.testing.assert_allclose(field.decode_sum(total, 100), 100.0)


def test_protocol_violations_are_refused() -> None:
    xs = inputs(4)
    field = Field(4.0, 4)
    server = ServerSession(3, 9, list(xs), LENGTH, field)
    clients = {w: ClientSession(3, 9) for w in xs}
    keys = {w: clients[w].public_keys() for w in xs}
    with pytest.raises(SecAggError, match="not a participant"):
        server.add_keys("stranger", *keys["w00"])
    with pytest.raises(SecAggError, match="two distinct 32-byte"):
        server.add_keys("w00", b"x" * 31, keys["w00"][1])
    for w in xs:
        server.add_keys(w, *keys[w])
    with pytest.raises(SecAggError, match="twice"):
        server.add_keys("w00", *keys["w00"])
    with pytest.raises(SecAggError, match="a message of the inputs stage arrived in the keys stage"):
        server.add_input("w00", np.zeros(LENGTH, np.uint32), 1.0)
    peers = server.close_keys()
    sealed = {w: clients[w].share(*peers[w]) for w in xs}
    with pytest.raises(SecAggError, match="not for its neighbours"):
        server.add_shares("w00", {99: next(iter(sealed["w00"].values()))})
    for w in xs:
        server.add_shares(w, sealed[w])
    inbox = server.close_shares()
    # A share sealed in another attempt (a replay) does not authenticate here.
    with pytest.raises(SecAggError, match="does not authenticate"):
        replay = dict(inbox["w01"])
        me, their, t = peers["w01"]
        stale = ClientSession(3, 9)
        stale.public_keys()
        stale._c = clients["w01"]._c  # same keys, another attempt id: the associated data differs
        stale.ctx = P.context(3, 10)
        stale.share(me, their, t)
        stale.receive(replay)
    for w in xs:
        clients[w].receive(inbox[w])
    q, _ = field.encode(xs["w00"])
    server.add_input("w00", clients["w00"].mask(q), 1.0)
    with pytest.raises(SecAggError, match="stage 'reveal', not after 'mask'"):
        clients["w00"].mask(q)  # a session never masks twice
    with pytest.raises(SecAggError, match="second masked input"):
        server.add_input("w00", np.zeros(LENGTH, np.uint32), 1.0)
    with pytest.raises(SecAggError, match="must be 257 uint32"):
        server.add_input("w01", np.zeros(LENGTH, np.float32), 1.0)
    for w in ("w01", "w02"):
        server.add_input(w, clients[w].mask(field.encode(xs[w])[0]), 1.0)
    asked = server.close_inputs()
    alive, gone = asked["w00"]
    with pytest.raises(SecAggError, match="both survived and dropped"):
        clients["w01"].reveal([0, 3], [3])
    with pytest.raises(SecAggError, match="other workers than it was asked"):
        server.add_reveal("w00", *clients["w00"].reveal(alive + gone, []))


def test_graph_and_threshold() -> None:
    graph = neighbourhoods(100)
    assert {len(n) for n in graph} == {16} and all(i not in n for i, n in enumerate(graph))
    assert all(i in graph[j] for i, n in enumerate(graph) for j in n), "symmetric"
    assert threshold_for(16, 0.5) == 9 and threshold_for(1, 0.5) == 1 and threshold_for(2, 0.5) == 2
    assert P.combine(dict(list(enumerate(P.split(b"k" * 32, 3, 5), start=1))[1:4])) == b"k" * 32

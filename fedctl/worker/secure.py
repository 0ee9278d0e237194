"""A worker's side of a secure-aggregation round (docs/protocol.md §7.4): keys, shares, training, the masked input,
the reveal — one :class:`~fedctl.secagg.client.ClientSession` per attempt, never reused.

The update leaves the worker only masked: ``x = w · u``, the strategy's update ``u`` (the change its training made
to the weights, or its gradient) weighted by ``w = min(1, n_k / weight_ref)``, clipped and encoded in the field,
plus the self mask and the pairwise masks.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fedctl.privacy import clip_l2
from fedctl.strategies import Strategy
from fedctl.strategies.kernels import change_vector
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message
from fedctl.worker.frameworks.base import Params

if TYPE_CHECKING:
    from fedctl.worker.client import Worker

log = logging.getLogger(__name__)
_noise = np.random.default_rng(secrets.randbits(128))
"""Distributed DP's noise: seeded from the OS's entropy, never from anything the broker or the run chooses."""
_OUT_OF_STEP = (ErrorCode.SECAGG_ABORTED, ErrorCode.SECAGG_REFUSED, ErrorCode.STALE_UPDATE, ErrorCode.NOT_SELECTED,
                ErrorCode.RUN_FINISHED)


class Vanished(Exception):
    """An emulated device loss (``WorkerConfig.vanish_before``): the worker stops where it stood."""


async def secure_round(worker: Worker, model: Message, strategy: Strategy, task: dict[str, Any],
                       weights: Params) -> Message | None:
    """Take part in the attempt ``model['secagg']`` names; returns the broker's last answer (``ack`` when the sum
    was applied with this worker's input, ``error`` when the attempt went on or was abandoned without it, ``done``),
    or None when this worker gave up on it (training failed, or the broker asked for what it must not reveal)."""
    from fedctl.secagg import ClientSession, Field, SecAggError  # (imported when used: its crypto costs 8 MB)

    conn = worker.conn
    assert conn is not None
    sa = model["secagg"]
    round_no, attempt = int(model["round"]), int(sa["attempt"])
    session = ClientSession(round_no, attempt)
    ids: dict[str, Any] = {"round": round_no, "attempt": attempt}

    async def ask(mtype: str, tensors: Any = None, **fields: Any) -> Message | None:
        vanish = worker.config.vanish_before
        if vanish is not None and vanish[0] == mtype and round_no >= vanish[1]:
            raise Vanished(mtype)
        reply = await conn.wait_reply(await conn.request(mtype, tensors=tensors, **ids, **fields))
        if reply.type == C.ERROR and reply["code"] in _OUT_OF_STEP:
            log.warning("round %d: secure aggregation went on without this worker: %s", round_no, reply["reason"])
            return None
        if reply.type != C.DONE:
            worker.check_error(reply)
        return reply

    try:
        c_pk, s_pk = session.public_keys()
        log.info("round %d, secure aggregation attempt %x: fresh keys %s/%s", round_no, attempt, c_pk.hex()[:8],
                 s_pk.hex()[:8])
        peers = await ask(C.SA_KEYS, c=c_pk, s=s_pk)
        if peers is None or peers.type != C.SA_PEERS:
            return peers
        crypto_started = time.perf_counter()
        sealed = session.share(peers["index"], {int(v): (c, s) for v, c, s in peers["peers"]}, peers["threshold"])
        crypto_s = time.perf_counter() - crypto_started
        log.info("round %d, secure aggregation attempt %x: shares sealed to %d neighbours (threshold %d)", round_no,
                 attempt, len(sealed), peers["threshold"])
        inbox = await ask(C.SA_SHARES, shares=[[v, b] for v, b in sealed.items()])
        if inbox is None or inbox.type != C.SA_INBOX:
            return inbox
        crypto_started = time.perf_counter()
        session.receive({int(v): b for v, b in inbox["shares"]})
        crypto_s += time.perf_counter() - crypto_started
        trained = await worker.train(strategy, weights, task, round_no)
        if trained is None:
            return None
        result, local, metrics = trained
        assert worker.spec is not None
        vector = change_vector(worker.spec, weights, result.kind, result.tensors)
        dp = model.get("dp")
        if dp is None:
            weight = min(1.0, result.num_examples / int(sa["weight_ref"]))
            vector *= weight
        else:  # distributed DP: uniform weights, the update clipped to L2 norm S, this worker's share of the noise
            weight = 1.0
            vector = clip_l2(vector, float(dp["clip"]))[0] + _noise.normal(0.0, float(dp["noise"]), vector.shape)
        # The training loss goes inside the sum too (zero under DP, whose noise does not cover it): the broker learns
        # the round's mean loss, not this worker's.
        loss = 0.0 if dp is not None else float(metrics.get("train_loss", 0.0)) * weight
        field = Field(float(sa["clip"]), int(sa["max_inputs"]))
        encoded, clipped = field.encode(np.append(vector, loss))
        if clipped:
            log.warning("round %d: %d of %d update values were clipped to ±%g (--secagg-clip on the broker)",
                        round_no, clipped, len(encoded), field.clip)
        crypto_started = time.perf_counter()
        masked = session.mask(encoded)
        crypto_s += time.perf_counter() - crypto_started
        log.info("round %d, secure aggregation attempt %x: masked input sent (%d values, masked with %d neighbours)",
                 round_no, attempt, len(masked), len(session.maskers))
        unmask = await ask(C.SA_INPUT, tensors={"masked": masked}, base_version=int(model["version"]),
                           num_examples=result.num_examples, weight=weight,
                           metrics={"train_time_s": metrics["train_time_s"], "clipped": float(clipped),
                                    "secagg_s": round(crypto_s, 6)})
        if unmask is None or unmask.type != C.SA_UNMASK:
            return unmask
        seeds, keys = session.reveal(unmask["survivors"], unmask["dropped"])
        answer = await ask(C.SA_REVEAL, seeds=[[v, b] for v, b in seeds.items()],
                           keys=[[v, b] for v, b in keys.items()])
    except SecAggError as err:
        log.warning("round %d: leaving the secure-aggregation attempt: %s", round_no, err)
        return None
    if answer is not None and answer.type == C.ACK:  # accepted, or duplicate: unmasked before this reveal came
        await worker.committed(result, local)
        log.info("round %d: masked update summed (%d workers survived with it; loss %.4f, %.2f s)", round_no,
                 len(unmask["survivors"]) + 1, metrics.get("train_loss", float("nan")), metrics["train_time_s"])
    return answer

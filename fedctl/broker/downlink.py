"""What a worker is sent as the model: dense, or only what changed since the version it holds when smaller; and,
for the workers whose links make it worth it, the same through the zlib codec (docs/protocol.md §4.4).

Pure (numpy and the wire codec): the shell runs :func:`build` in a thread, since diffing and encoding touch the
whole model, and hands the result to :meth:`fedctl.broker.core.BrokerCore.hand_out`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from fedctl.broker.core import BrokerCore, Downlink
from fedctl.broker.registry import WorkerRecord
from fedctl.wire.messages import encode_tensors
from fedctl.wire.tensors import SparseTensor, Tensor, pack_sparse


def _deflated(core: BrokerCore, tensors: Mapping[str, Tensor], frames: list[bytes]) -> list[bytes]:
    """The zlib frames of ``tensors`` (whose plain ``frames`` are given), timed: the broker's deflate cost is
    measured."""
    start = time.perf_counter()
    zframes = encode_tensors(tensors, compress=True)
    core.codec.observe(sum(map(len, frames)), sum(map(len, zframes)), time.perf_counter() - start)
    return zframes


def build(core: BrokerCore, records: Iterable[WorkerRecord]) -> dict[int | None, Downlink]:
    """For each model version one of ``records`` holds (None: nothing): the tensors to send it, their frames,
    whether they are a delta, and their zlib frames if one of its holders' links wants them. Frames are encoded
    once per distinct held version (and codec).

    Each ends with the strategy's extra tensors, if it has any (:meth:`~fedctl.strategies.base.Strategy.
    downlink_extra`, docs/protocol.md §5.6): whole, encoded once, the same for every version; ``Downlink.extra``
    counts them, so that an ``evaluate`` leaves them out. Whether a delta beats the dense model is decided without
    them."""
    store, strategy = core.store, core.strategy
    chunked = core.chunked_model() > 0
    by_version: dict[int | None, list[WorkerRecord]] = {}
    for record in records:
        by_version.setdefault(record.holds_version, []).append(record)
    extras = strategy.downlink_extra(store.weights, core.state.get("strategy_state") or {})
    with_extras = _Extras(core, extras)
    dense_raw: list[bytes] = [] if chunked else encode_tensors(store.weights)
    dense_z: list[bytes] | None = None
    out: dict[int | None, Downlink] = {}

    def dense(holders: list[WorkerRecord]) -> Downlink:
        # A model sent in chunks is never encoded whole (that would copy it): its chunks are views of the weights.
        nonlocal dense_z
        if not chunked and dense_z is None and any(core.compress_for(r, dense_raw) for r in holders):
            dense_z = _deflated(core, store.weights, dense_raw)
        return with_extras(Downlink(dict(store.weights), dense_raw, False, dense_z))

    for version, holders in by_version.items():
        base = None if version is None else store.at(version)
        delta = None if base is None else strategy.downlink(store.weights, base)
        if delta is None:
            out[version] = dense(holders)
            continue
        # Unchanged tensors are left out: the worker keeps its copy of them.
        changed: dict[str, Tensor] = {k: t for k, t in delta.items()
                                      if not (isinstance(t, SparseTensor) and t.nnz == 0)}
        if not extras:  # one frame when every change is sparse (a packed frame is a message's only tensor)
            changed = pack_sparse(changed, core.shapes)
        frames = encode_tensors(changed)
        zframes = _deflated(core, changed, frames) if any(core.compress_for(r, frames) for r in holders) else None
        size = min(sum(map(len, frames)), sum(map(len, zframes or frames)))
        # A delta goes whole: when the dense model needs chunks, it must itself stay below the chunking size.
        smaller = size <= core.config.chunk_above if chunked else size < sum(map(len, dense_raw))
        out[version] = with_extras(Downlink(changed, frames, True, zframes)) if smaller else dense(holders)
    return out


class _Extras:
    """Appends the strategy's extra tensors to a downlink: their plain frames encoded once, their zlib frames once
    if a downlink going through the codec needs them."""

    def __init__(self, core: BrokerCore, tensors: Mapping[str, Tensor]) -> None:
        self.core, self.tensors = core, dict(tensors)
        self.frames = encode_tensors(self.tensors) if self.tensors else []
        self._zframes: list[bytes] | None = None

    def __call__(self, downlink: Downlink) -> Downlink:
        if not self.tensors:
            return downlink
        tensors, frames, is_delta, zframes, _ = downlink
        if zframes is not None and self._zframes is None:
            self._zframes = _deflated(self.core, self.tensors, self.frames)
        return Downlink({**tensors, **self.tensors}, [*frames, *self.frames], is_delta,
                        None if zframes is None else [*zframes, *(self._zframes or [])], len(self.frames))

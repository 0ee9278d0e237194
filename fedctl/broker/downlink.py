"""What a worker is sent as the model: dense, or only what changed since the version it holds when smaller.

Pure (numpy and the wire codec): the shell runs :func:`build` in a thread, since diffing and encoding touch the
whole model, and hands the result to :meth:`fedctl.broker.core.BrokerCore.hand_out`.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedctl.broker.core import BrokerCore, Downlink
from fedctl.wire.messages import encode_tensors
from fedctl.wire.tensors import SparseTensor, Tensor, pack_sparse


def build(core: BrokerCore, held: Iterable[int | None]) -> dict[int | None, Downlink]:
    """For each model version some worker holds (None: nothing): the tensors to send it, their frames, and
    whether they are a delta on that version. Frames are encoded once per distinct held version."""
    store, strategy = core.store, core.strategy
    chunked = core.chunked_model() > 0
    # A model sent in chunks is never encoded whole (that would copy it): its chunks are views of the weights.
    dense: Downlink = (dict(store.weights), [] if chunked else encode_tensors(store.weights, compress=True), False)
    out: dict[int | None, Downlink] = {}
    for version in set(held):
        base = None if version is None else store.at(version)
        delta = None if base is None else strategy.downlink(store.weights, base)
        if delta is None:
            out[version] = dense
            continue
        # Unchanged tensors are left out: the worker keeps its copy of them.
        changed: dict[str, Tensor] = {k: t for k, t in delta.items()
                                      if not (isinstance(t, SparseTensor) and t.nnz == 0)}
        changed = pack_sparse(changed, core.shapes)  # one frame when every change is sparse
        frames = encode_tensors(changed, compress=True)
        size = sum(map(len, frames))
        # A delta goes whole: when the dense model needs chunks, it must itself stay below the chunking size.
        smaller = size <= core.config.chunk_above if chunked else size < sum(map(len, dense[1]))
        out[version] = (changed, frames, True) if smaller else dense
    return out

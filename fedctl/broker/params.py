"""The global model in memory: its weights, its version, and recent versions kept for downlink deltas.

Pure: numpy only (no file IO); checkpoints of it are written by :mod:`fedctl.broker.store`.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

Params = dict[str, np.ndarray]


class ParameterStore:
    """The global weights and their version; ``version`` counts aggregations since initialisation.

    It also keeps recent versions (newest first, at most ``history_bytes`` of arrays) so that the broker can send
    a worker that holds version v only what changed since v (the downlink delta). Versions are immutable: an
    aggregation installs new arrays, so the history holds references, not copies.
    """

    def __init__(self, weights: Params, version: int = 0, history_bytes: int = 0) -> None:
        self.weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        self.version = version
        self.history_bytes = history_bytes
        self._history: OrderedDict[int, Params] = OrderedDict()

    @property
    def model_bytes(self) -> int:
        return sum(a.nbytes for a in self.weights.values())

    def replace(self, weights: Params) -> int:
        """Install new global weights and bump the version; returns the new version."""
        if weights.keys() != self.weights.keys():
            raise ValueError("aggregated weights do not have the model's tensor names")
        old, old_version = self.weights, self.version
        self.weights = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in self.weights}
        self.version += 1
        keep = self.history_bytes // max(self.model_bytes, 1)
        if keep > 0:
            self._history[old_version] = old
            while len(self._history) > keep:
                self._history.popitem(last=False)
        return self.version

    def at(self, version: int) -> Params | None:
        """The weights of ``version`` when still kept (the current one always is), else None."""
        if version == self.version:
            return self.weights
        return self._history.get(version)

    @property
    def kept_versions(self) -> int:
        return len(self._history)

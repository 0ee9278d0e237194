"""The parameter store: the global model, its version, the run state, and atomic checkpoints in --state-dir.

Checkpoint files (docs/architecture.md): ``model.npz`` (float32 arrays by canonical name, no pickle) and
``state.json`` (round, version, run config). Each is written to a temp file, fsynced and renamed, then the
directory is fsynced, so a crash leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.errors import ConfigError
from fedctl.fsio import atomic_write

log = logging.getLogger(__name__)
Params = dict[str, np.ndarray]
MODEL_FILE = "model.npz"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
JOURNAL_FILE = "journal.jsonl"
STATE_ARRAY_PREFIX = "strategy_state/"
"""Arrays of the strategy's broker state are kept in model.npz under this prefix (JSON holds the rest)."""


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


class Checkpointer:
    """Saves and loads the store and run state under one directory."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir)

    def save(self, store: ParameterStore, state: dict[str, Any],
             applied: Sequence[dict[str, Any]] = ()) -> None:
        """Checkpoint: weights (and the strategy's array state) to ``model-<version>.npz``, the journal lines of
        the ``applied`` updates, then ``state.json`` naming that model file — the commit point. A crash before the
        rename leaves the previous checkpoint in force (the orphan model file and journal lines of the version
        that was not committed are ignored and cleaned up by :meth:`load`)."""
        strategy_state = dict(state.get("strategy_state") or {})
        arrays = {STATE_ARRAY_PREFIX + k: v for k, v in strategy_state.items() if isinstance(v, np.ndarray)}
        plain = {k: v for k, v in strategy_state.items() if not isinstance(v, np.ndarray)}
        model_file = f"model-{store.version}.npz"
        atomic_write(self.dir / model_file, lambda fh: np.savez(fh, **store.weights, **arrays))
        if applied:
            self._append_journal([{"version": store.version, **entry} for entry in applied])
        payload = json.dumps({**state, "strategy_state": plain, "version": store.version, "model_file": model_file},
                             indent=2, sort_keys=True).encode()
        atomic_write(self.dir / STATE_FILE, lambda fh: fh.write(payload))
        for old in self.dir.glob("model-*.npz"):
            if old.name != model_file:
                old.unlink(missing_ok=True)
        (self.dir / MODEL_FILE).unlink(missing_ok=True)  # the single-file layout of older checkpoints

    def _append_journal(self, entries: list[dict[str, Any]]) -> None:
        self._append_jsonl(JOURNAL_FILE, entries, sync=True)

    def read_journal(self) -> list[dict[str, Any]]:
        """The applied updates (one line each: version, round, worker, seq, base_version, num_examples)."""
        return self._read_jsonl(JOURNAL_FILE)

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """Every complete line of ``name``, oldest first (a torn last line from a crash is left out)."""
        path = self.dir / name
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _append_jsonl(self, name: str, records: Sequence[dict[str, Any]], sync: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / name, "a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            if sync:
                os.fsync(fh.fileno())

    def _trim_jsonl(self, name: str, version: int) -> None:
        """Drop lines of versions after the committed one (written just before a crash, then redone)."""
        records = self._read_jsonl(name)
        kept = [r for r in records if int(r.get("version", 0)) <= version]
        if len(kept) != len(records):
            payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode()
            atomic_write(self.dir / name, lambda fh: fh.write(payload))

    def exists(self) -> bool:
        return (self.dir / STATE_FILE).is_file()

    def load(self) -> tuple[ParameterStore, dict[str, Any]]:
        """Load the last checkpoint; ConfigError when it is unreadable."""
        try:
            state = json.loads((self.dir / STATE_FILE).read_text())
            if not isinstance(state, dict):
                raise TypeError("state.json does not hold a JSON object")
            model_file = str(state.get("model_file") or MODEL_FILE)
            if "/" in model_file or "\\" in model_file:
                raise ValueError(f"state.json names a model file outside the state dir: {model_file!r}")
            with np.load(self.dir / model_file, allow_pickle=False) as npz:
                weights = {k: npz[k] for k in npz.files if not k.startswith(STATE_ARRAY_PREFIX)}
                arrays = {k.removeprefix(STATE_ARRAY_PREFIX): npz[k] for k in npz.files
                          if k.startswith(STATE_ARRAY_PREFIX)}
            state["strategy_state"] = {**dict(state.get("strategy_state") or {}), **arrays}
            self._trim_jsonl(JOURNAL_FILE, int(state["version"]))
            self._trim_jsonl(METRICS_FILE, int(state["version"]))
            # A torn zip raises BadZipFile; valid JSON of the wrong shape raises KeyError or TypeError.
            return ParameterStore(weights, int(state["version"])), state
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"cannot read the checkpoint in {self.dir}: {type(exc).__name__}: {exc}",
                              "pass a fresh --state-dir or remove the damaged one") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete record of metrics.jsonl, oldest first (a torn last line from a crash is left out)."""
        return self._read_jsonl(METRICS_FILE)

    def append_metrics(self, record: dict[str, Any], sync: bool = True) -> None:
        """Append one JSON line to metrics.jsonl (flushed, and fsynced unless ``sync`` is False)."""
        self._append_jsonl(METRICS_FILE, [record], sync)

"""Checkpoints in --state-dir: the global model, the run state, the journal of applied updates and metrics lines.

Checkpoint files (docs/architecture.md): ``model-<version>.npz`` (float32 arrays by canonical name, and the
strategy's array state; no pickle) and ``state.json`` (round, version, run config, the name of that model file).
Each is written to a temp file, fsynced and renamed, then the directory is fsynced, so a crash leaves either the
old or the new checkpoint, never a torn one. ``journal.jsonl`` lines are fsynced before the commit.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.broker.params import ParameterStore
from fedctl.errors import ConfigError
from fedctl.fsio import atomic_write
from fedctl.models import first_difference

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
JOURNAL_FILE = "journal.jsonl"
STATE_ARRAY_PREFIX = "strategy_state/"
"""Arrays of the strategy's broker state are kept in the model file under this prefix (JSON holds the rest)."""


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

    def check_resumable(self, model: str, strategy: str, signature: list[list[Any]] | None = None) -> None:
        """Refuse to resume a run of another model or strategy, or of a model whose tensors (``signature``,
        ``ModelSpec.signature``) differ (cheap: reads state.json only, so the CLI can ask before it starts
        anything); a state dir without a checkpoint is a new run."""
        if not self.exists():
            return
        try:
            state = json.loads((self.dir / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the checkpoint in {self.dir}: {type(exc).__name__}: {exc}",
                              "pass a fresh --state-dir or remove the damaged one") from None
        if not isinstance(state, dict) or state.get("model") != model or state.get("strategy") != strategy:
            found = state if isinstance(state, dict) else {}
            raise ConfigError(f"{self.dir} holds a run of model {found.get('model')!r} with strategy "
                              f"{found.get('strategy')!r}",
                              "pass a fresh --state-dir, or the same --model and --strategy to resume")
        saved = state.get("spec")
        if signature is not None and isinstance(saved, dict) and isinstance(saved.get("params"), list):
            theirs = [[p.get("name"), list(p.get("shape", [])), p.get("dtype", "float32")] for p in saved["params"]
                      if isinstance(p, dict)]
            diff = first_difference(signature, theirs, "task", "checkpoint")
            if diff is not None:
                raise ConfigError(f"{self.dir} holds a run of another version of model {model!r}: {diff}",
                                  "pass a fresh --state-dir, or the task the run was started with")

    def load(self) -> tuple[ParameterStore, dict[str, Any]]:
        """Load the last checkpoint; ConfigError when it is unreadable."""
        try:
            state = json.loads((self.dir / STATE_FILE).read_text())
            if not isinstance(state, dict):
                raise TypeError("state.json does not hold a JSON object")
            model_file = str(state["model_file"])
            if "/" in model_file or "\\" in model_file:
                raise ValueError(f"state.json names a model file outside the state dir: {model_file!r}")
            if not zipfile.is_zipfile(self.dir / model_file):
                raise ValueError(f"{model_file} is not a .npz archive (damaged or cut short)")
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

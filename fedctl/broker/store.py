"""Checkpoints in --state-dir: the global model, the run state, the journal of applied updates and metrics lines.

Checkpoint files (docs/architecture.md): ``model-<version>.npz`` (float32 arrays by canonical name, and the
strategy's array state; no pickle) and ``state.json`` (round, version, run config, the name of that model file).
Each is written to a temp file, fsynced and renamed, then the directory is fsynced, so a crash leaves either the
old or the new checkpoint, never a torn one. ``journal.jsonl`` lines are fsynced before the commit. The last
``keep_models`` model files stay (``--keep-models``); ``model-best.npz`` holds the best model by a chosen metric,
its description inside it (so the pair cannot tear) and mirrored in ``best.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
BEST_MODEL_FILE = "model-best.npz"
BEST_FILE = "best.json"
BEST_META_KEY = "best/meta.json"
"""The best model's description (round, version, metric, mode, value) as UTF-8 JSON bytes inside its npz."""
_MODEL_FILE = re.compile(r"^model-(\d+)\.npz$")
_FIX = "pass a fresh --state-dir or remove the damaged one"



class ModelSnapshot(NamedTuple):
    """A model version as it was when its round was aggregated, for a checkpoint written while the next round runs."""

    weights: dict[str, np.ndarray]
    version: int

class Checkpointer:
    """Saves and loads the store and run state under one directory."""

    def __init__(self, state_dir: Path | str, keep_models: int | None = 1) -> None:
        """``keep_models``: how many of the newest model files stay (1: the current checkpoint's only; None: all)."""
        if keep_models is not None and keep_models < 1:
            raise ValueError(f"keep_models must be at least 1 or None, got {keep_models}")
        self.dir = Path(state_dir)
        self.keep_models = keep_models
        self._best: dict[str, Any] | None = None
        self._best_read = False

    def save(self, store: ParameterStore | ModelSnapshot, state: dict[str, Any],
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
        self._prune(store.version)

    def _model_files(self) -> dict[int, Path]:
        """``model-<version>.npz`` files by version (not ``model-best.npz``)."""
        found = {}
        for path in self.dir.glob("model-*.npz"):
            match = _MODEL_FILE.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def _prune(self, version: int) -> None:
        """Remove the model files of uncommitted versions (after ``version``) and those older than the newest
        ``keep_models``."""
        files = self._model_files()
        kept = sorted(v for v in files if v <= version)
        drop = [v for v in files if v > version]
        if self.keep_models is not None:
            drop += kept[:-self.keep_models]
        for v in drop:
            files[v].unlink(missing_ok=True)

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

    def read_state(self) -> dict[str, Any]:
        """``state.json`` of the last checkpoint, read only (nothing in the state dir changes); ConfigError when it
        is missing or unreadable."""
        if not self.exists():
            raise ConfigError(f"{self.dir} holds no checkpoint (no {STATE_FILE})",
                              "pass the --state-dir of a run that completed at least one round")
        try:
            state = json.loads((self.dir / STATE_FILE).read_text())
            if not isinstance(state, dict):
                raise TypeError("state.json does not hold a JSON object")
            int(state["version"])
            self._model_path(str(state["model_file"]))
            return state
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the checkpoint in {self.dir}: {type(exc).__name__}: {exc}", _FIX) from None

    def _model_path(self, model_file: str) -> Path:
        if "/" in model_file or "\\" in model_file:
            raise ValueError(f"state.json names a model file outside the state dir: {model_file!r}")
        return self.dir / model_file

    def _read_npz(self, path: Path) -> dict[str, np.ndarray]:
        """Every array of a model file (no pickle); ValueError naming the file when it is no .npz archive."""
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path.name} is not a .npz archive (damaged or cut short)")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def load(self) -> tuple[ParameterStore, dict[str, Any]]:
        """Load the last checkpoint; ConfigError when it is unreadable."""
        try:
            state = json.loads((self.dir / STATE_FILE).read_text())
            if not isinstance(state, dict):
                raise TypeError("state.json does not hold a JSON object")
            found = self._read_npz(self._model_path(str(state["model_file"])))
            weights = {k: v for k, v in found.items() if not k.startswith(STATE_ARRAY_PREFIX)}
            arrays = {k.removeprefix(STATE_ARRAY_PREFIX): v for k, v in found.items()
                      if k.startswith(STATE_ARRAY_PREFIX)}
            state["strategy_state"] = {**dict(state.get("strategy_state") or {}), **arrays}
            self._trim_jsonl(JOURNAL_FILE, int(state["version"]))
            self._trim_jsonl(METRICS_FILE, int(state["version"]))
            # A torn zip raises BadZipFile; valid JSON of the wrong shape raises KeyError or TypeError.
            return ParameterStore(weights, int(state["version"])), state
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"cannot read the checkpoint in {self.dir}: {type(exc).__name__}: {exc}", _FIX) from None

    # ------------------------------------------------------------------ kept models, read only (fedctl export)
    def kept_versions(self) -> list[int]:
        """Versions whose model file is kept, oldest first: the committed one and up to ``--keep-models`` - 1 before
        it (for the sync policy a round's number is its model's version)."""
        committed = int(self.read_state()["version"])
        return sorted(v for v in self._model_files() if v <= committed)

    def load_version(self, version: int) -> dict[str, np.ndarray]:
        """The weights of a kept model version, by canonical name (without the strategy's arrays)."""
        path = self.dir / f"model-{version}.npz"
        try:
            return {k: v for k, v in self._read_npz(path).items() if not k.startswith(STATE_ARRAY_PREFIX)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"cannot read {path}: {type(exc).__name__}: {exc}", _FIX) from None

    # ------------------------------------------------------------------ the best model
    def best(self) -> dict[str, Any] | None:
        """The best model's description (round, version, metric, mode, value, run_id), or None when none is kept.

        Read from ``model-best.npz`` itself, the one file that is replaced atomically; ``best.json`` mirrors it."""
        return self._best_file(weights=False)[1] if (self.dir / BEST_MODEL_FILE).exists() else None

    def load_best(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The best model's weights and description; ConfigError when none is kept or it is damaged."""
        if not (self.dir / BEST_MODEL_FILE).exists():
            raise ConfigError(f"{self.dir} holds no best model ({BEST_MODEL_FILE})",
                              "run the broker with an evaluation (--eval-data) or --best-metric NAME")
        return self._best_file(weights=True)

    def _best_file(self, weights: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        path = self.dir / BEST_MODEL_FILE
        try:
            if not zipfile.is_zipfile(path):
                raise ValueError(f"{path.name} is not a .npz archive (damaged or cut short)")
            with np.load(path, allow_pickle=False) as npz:  # reads only the members asked for
                meta = json.loads(npz[BEST_META_KEY].tobytes().decode())
                arrays = {k: npz[k] for k in npz.files if k != BEST_META_KEY} if weights else {}
            if not isinstance(meta, dict):
                raise TypeError(f"{BEST_META_KEY} does not hold a JSON object")
            return arrays, meta
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"cannot read {path}: {type(exc).__name__}: {exc}", _FIX) from None

    def save_best(self, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Replace the best model: ``model-best.npz`` (weights and ``meta``) atomically, then ``best.json``."""
        blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        atomic_write(self.dir / BEST_MODEL_FILE, lambda fh: np.savez(fh, **weights, **{BEST_META_KEY: blob}))
        payload = json.dumps(meta, indent=2, sort_keys=True).encode()
        atomic_write(self.dir / BEST_FILE, lambda fh: fh.write(payload))
        self._best, self._best_read = dict(meta), True

    def improves(self, metric: str, mode: str, value: float) -> bool:
        """Whether ``value`` of ``metric`` beats the kept best model (one of another metric or mode never counts:
        its value is not comparable). Reads the kept best once, then remembers what :meth:`save_best` wrote."""
        if not self._best_read:
            try:
                self._best = self.best()
            except ConfigError as err:  # a damaged best model is replaced by the next one
                log.warning("%s; the next best model replaces it", err.message)
                self._best = None
            self._best_read = True
        best = self._best
        if best is None or best.get("metric") != metric or best.get("mode") != mode:
            return True
        old = float(best.get("value", math.nan))
        return math.isnan(old) or (value > old if mode == "max" else value < old)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete record of metrics.jsonl, oldest first (a torn last line from a crash is left out)."""
        return self._read_jsonl(METRICS_FILE)

    def append_metrics(self, *records: dict[str, Any], sync: bool = True) -> None:
        """Append a JSON line per record to metrics.jsonl (flushed, and fsynced once unless ``sync`` is False)."""
        self._append_jsonl(METRICS_FILE, records, sync)

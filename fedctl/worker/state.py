"""A worker's persistent state: the model version it holds and its private strategy state (e.g. DGC residuals).

Saved atomically after every accepted update under ``fedctl join --state-dir``, so a restarted worker resumes
with the same compression residuals and momentum (nothing accumulated is lost) and, holding the model version it
last trained, is sent only what changed since. The state is tied to one run: a different run id discards it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.fsio import atomic_write

log = logging.getLogger(__name__)
Params = dict[str, np.ndarray]
STATE_FILE = "worker-state.npz"
"""One file (arrays plus a JSON index), so a crash can never pair a model with another save's version."""


@dataclass
class WorkerState:
    """What a worker carries from one round to the next."""

    run_id: str | None = None
    version: int | None = None
    """Model version whose weights ``model`` holds exactly (None: no model held)."""
    model: Params = field(default_factory=dict)
    strategy: Params = field(default_factory=dict)
    """Private arrays of the strategy's worker side (``ClientResult.state``); they never leave the worker."""
    local: Params = field(default_factory=dict)
    """The model's tensors that are not federated (FedBN's BatchNorm statistics, integer buffers), as the last
    accepted training left them; they never leave the worker."""
    seq: int = 0
    """Updates this worker had accepted in the run."""

    def for_run(self, run_id: str) -> WorkerState:
        """This state if it belongs to ``run_id``; otherwise a fresh one (a new run starts from nothing)."""
        if self.run_id == run_id:
            return self
        if self.run_id is not None:
            log.info("saved worker state belongs to run %s, not %s; starting fresh", self.run_id, run_id)
        return WorkerState(run_id=run_id)

    def save(self, directory: Path) -> None:
        arrays = {f"model/{k}": v for k, v in self.model.items()}
        arrays.update({f"strategy/{k}": v for k, v in self.strategy.items()})
        arrays.update({f"local/{k}": v for k, v in self.local.items()})
        meta = {"run_id": self.run_id, "version": self.version, "seq": self.seq,
                "model": sorted(self.model), "strategy": sorted(self.strategy), "local": sorted(self.local)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write(directory / STATE_FILE, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, directory: Path) -> WorkerState:
        """The saved state, or a fresh one when there is none or it is unreadable (logged, never fatal)."""
        path = directory / STATE_FILE
        if not path.is_file():
            return cls()
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta: dict[str, Any] = json.loads(arrays.pop("meta").tobytes())
            model = {k.removeprefix("model/"): v for k, v in arrays.items() if k.startswith("model/")}
            strategy = {k.removeprefix("strategy/"): v for k, v in arrays.items() if k.startswith("strategy/")}
            local = {k.removeprefix("local/"): v for k, v in arrays.items() if k.startswith("local/")}
            if sorted(model) != meta["model"] or sorted(strategy) != meta["strategy"] \
                    or sorted(local) != meta.get("local", []):
                raise ValueError("the arrays do not match their index (written by a different save)")
            version = meta["version"]
            return cls(str(meta["run_id"]), None if version is None else int(version), model, strategy,
                       local, int(meta["seq"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable worker state in %s (%s: %s); starting fresh", directory,
                        type(exc).__name__, exc)
            return cls()

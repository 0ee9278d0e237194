"""What the Python API returns: plain dataclasses over a run's summary, its metrics records and the files written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl.broker.store import Checkpointer


@dataclass(frozen=True)
class Run:
    """A federated run as it stands in its state dir: after :func:`fedctl.simulate`, :func:`fedctl.serve` or a
    background broker's ``wait()``.

    Attributes
    ----------
    state_dir:
        The run's state dir (checkpoints, ``metrics.jsonl``); ``fedctl.export(run.state_dir)`` exports it.
    rounds:
        Rounds completed (ssp/async: model versions made), resumed rounds included.
    version:
        The global model's version.
    metrics:
        Every record of ``metrics.jsonl``, oldest first, as dicts (``round``, ``test_accuracy``, ``train_loss``,
        ``participants``, ``bytes_in``, ...; docs/architecture.md lists the fields).
    summary:
        The broker's summary (``rounds``, ``version``, ``last``: the last round's record, ``rejected``: refusals by
        code); ``fedctl.simulate`` adds ``workers``, ``workers_that_trained`` and ``peak_rss_mb``.
    wall_s:
        Seconds the run took in this call (None for a run read back with :meth:`from_state_dir`).
    """

    state_dir: Path
    rounds: int
    version: int
    metrics: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    wall_s: float | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The last round's metrics record ({} before the first round)."""
        last = self.summary.get("last")
        return dict(last) if last else (dict(self.metrics[-1]) if self.metrics else {})

    @property
    def test_accuracy(self) -> float | None:
        """The last evaluated test accuracy (the broker evaluates after the last round), or None without one."""
        value = self.last.get("test_accuracy")
        return None if value is None else float(value)

    @property
    def best(self) -> dict[str, Any] | None:
        """The best model's description (round, version, metric, mode, value), or None when the run keeps none."""
        return Checkpointer(self.state_dir).best()

    @classmethod
    def from_summary(cls, state_dir: str | os.PathLike[str], summary: dict[str, Any],
                     wall_s: float | None = None) -> Run:
        """The run a broker's summary describes, with the metrics records read from its state dir."""
        metrics = Checkpointer(Path(state_dir)).read_metrics()
        return cls(Path(state_dir), int(summary.get("rounds", 0)), int(summary.get("version", 0)), metrics,
                   dict(summary), wall_s)

    @classmethod
    def from_state_dir(cls, state_dir: str | os.PathLike[str]) -> Run:
        """A run read back from its state dir (completed or not); ConfigError when it holds no checkpoint."""
        checkpointer = Checkpointer(Path(state_dir))
        state, metrics = checkpointer.read_state(), checkpointer.read_metrics()
        rounds, version = int(state.get("round", 0)), int(state["version"])
        summary = {"rounds": rounds, "version": version, "last": metrics[-1] if metrics else {}}
        return cls(Path(state_dir), rounds, version, metrics, summary)


@dataclass(frozen=True)
class JoinResult:
    """What one worker did in a run (:func:`fedctl.join`)."""

    worker_id: str
    rounds_trained: int
    """Rounds this worker trained in and the broker acknowledged."""
    final_round: int
    """The round the run finished at."""
    version: int
    """The global model's final version."""
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Exported:
    """A model file written by :func:`fedctl.export`. It is path-like: ``torch.load(exported)`` opens it."""

    path: Path
    format: str
    model: str
    round: int | None
    version: int | None
    tensors: int
    parameters: int
    dtypes: list[str]
    loads_with: str
    """How the file is loaded, with FILE for its path, e.g. ``module.load_state_dict(torch.load(FILE))``."""
    best: dict[str, Any] | None
    """The best model's description when the best model was exported, else None."""

    def __fspath__(self) -> str:
        return os.fspath(self.path)


@dataclass(frozen=True)
class Partition:
    """A directory written by :func:`fedctl.partition`. It is path-like: ``fedctl.simulate(data=partition)``."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    """``manifest.json``: each shard's name, file, size, label histogram and SHA-256, and the test split's."""

    @property
    def shards(self) -> list[str]:
        """The clients' shard names (``shard0``, ``shard1``, ...), the names ``fedctl.join(data=...)`` takes."""
        return [entry["name"] for entry in self.manifest["shards"]]

    def __fspath__(self) -> str:
        return os.fspath(self.path)

"""The parameter store and checkpoints: round trips, atomic writes, damaged state directories."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedctl.broker.params import ParameterStore
from fedctl.broker.store import METRICS_FILE, STATE_FILE, Checkpointer, atomic_write
from fedctl.errors import ConfigError
from fedctl.models import get_model, init_params


def weights() -> dict[str, np.ndarray]:
    return init_params(get_model("mlp"), 3)


def test_store_replace_bumps_the_version_and_keeps_float32() -> None:
    store = ParameterStore({"w": np.ones(3, np.float64)})
    assert store.version == 0 and store.weights["w"].dtype == np.float32
    assert store.replace({"w": np.zeros(3)}) == 1
    assert store.version == 1 and store.weights["w"].dtype == np.float32 and store.weights["w"].sum() == 0
    with pytest.raises(ValueError):
        store.replace({"other": np.zeros(3)})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    w = weights()
    store = ParameterStore(w, version=4)
    state = {"run_id": "abc", "round": 4, "model": "mlp", "strategy": "fedavg", "strategy_state": {"m": 1.5}}
    cp = Checkpointer(tmp_path / "run")
    assert not cp.exists()
    cp.save(store, state)
    assert cp.exists()
    loaded, got = Checkpointer(tmp_path / "run").load()
    assert loaded.version == 4
    assert got == {**state, "version": 4, "model_file": "model-4.npz"}
    assert list(loaded.weights) == list(w)
    for k in w:
        assert loaded.weights[k].dtype == np.float32 and loaded.weights[k].tobytes() == w[k].tobytes()


def test_saving_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    store = ParameterStore({"w": np.zeros(2, np.float32)})
    cp.save(store, {"round": 0})
    store.replace({"w": np.ones(2)})
    cp.save(store, {"round": 1})
    loaded, state = cp.load()
    assert state["round"] == 1 and loaded.version == 1 and loaded.weights["w"].tolist() == [1.0, 1.0]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    for round_no in range(3):
        cp.save(ParameterStore(weights(), round_no), {"round": round_no})
    cp.append_metrics({"round": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model-2.npz", STATE_FILE, METRICS_FILE])


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write(target, lambda fh: fh.write(b"old"))

    def boom(fh: object) -> None:
        fh.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_append_metrics_writes_one_json_line_each(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path / "new")
    cp.append_metrics({"round": 1, "x": 0.5})
    cp.append_metrics({"round": 2, "x": None})
    lines = (tmp_path / "new" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"round": 1, "x": 0.5}, {"round": 2, "x": None}]


SAVED_MODEL = "model-2.npz"


def _saved(tmp_path: Path) -> Checkpointer:
    cp = Checkpointer(tmp_path)
    cp.save(ParameterStore({"w": np.arange(4, dtype=np.float32)}, 2), {"round": 2, "run_id": "r"})
    return cp


@pytest.mark.parametrize("damage", [
    lambda d: (d / STATE_FILE).write_text("{not json"),
    lambda d: (d / STATE_FILE).write_text(""),
    lambda d: (d / STATE_FILE).write_bytes(b"\xff\xfe\x00garbage"),
    lambda d: (d / STATE_FILE).write_text("[1, 2, 3]"),
    lambda d: (d / STATE_FILE).write_text('{"round": 2}'),
    lambda d: (d / STATE_FILE).write_text('{"round": 2, "version": "two"}'),
    lambda d: (d / SAVED_MODEL).write_bytes(b"not a zip file at all"),
    lambda d: (d / SAVED_MODEL).write_bytes((d / SAVED_MODEL).read_bytes()[:60]),
    lambda d: (d / SAVED_MODEL).unlink(),
], ids=["bad-json", "empty", "binary", "json-list", "no-version", "version-not-int", "model-garbage",
        "model-truncated", "model-missing"])
def test_a_damaged_checkpoint_gives_config_error_with_a_fix(tmp_path: Path, damage: Callable[[Path], Any]) -> None:
    cp = _saved(tmp_path)
    damage(tmp_path)
    with pytest.raises(ConfigError) as e:
        cp.load()
    assert str(tmp_path) in e.value.message
    assert e.value.fix and "--state-dir" in e.value.fix


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    assert ckpt.read_metrics() == []
    ckpt.append_metrics({"round": 1, "test_accuracy": 0.5})
    ckpt.append_metrics({"round": 2, "test_accuracy": 0.6})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "test_acc')  # a crash mid-append
    assert [r["round"] for r in ckpt.read_metrics()] == [1, 2]


def test_a_crash_between_the_model_and_the_state_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    store = ParameterStore({"w": np.zeros(2, np.float32)})
    store.replace({"w": np.ones(2)})
    cp.save(store, {"round": 1}, applied=[{"round": 1, "worker": "a", "seq": 0}])
    # Version 2 is half written: its model file and journal line exist, state.json still names version 1.
    store.replace({"w": np.full(2, 2.0)})
    atomic_write(tmp_path / "model-2.npz", lambda fh: np.savez(fh, **store.weights))
    cp._append_journal([{"round": 2, "worker": "a", "seq": 1, "version": 2}])
    loaded, state = Checkpointer(tmp_path).load()
    assert loaded.version == 1 and loaded.weights["w"].tolist() == [1.0, 1.0] and state["round"] == 1
    assert [(e["round"], e["worker"], e["version"]) for e in cp.read_journal()] == [(1, "a", 1)]


def test_the_journal_lists_each_applied_update_once(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    store = ParameterStore({"w": np.zeros(2, np.float32)})
    for r in (1, 2):
        store.replace({"w": np.full(2, float(r))})
        cp.save(store, {"round": r}, applied=[{"round": r, "worker": w, "seq": r - 1} for w in ("a", "b")])
    entries = Checkpointer(tmp_path).read_journal()
    assert [(e["version"], e["worker"]) for e in entries] == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]


# ---------------------------------------------------------------------------------------------- kept and best models
def _rounds(cp: Checkpointer, n: int) -> ParameterStore:
    store = ParameterStore({"w": np.zeros(2, np.float32)})
    for r in range(1, n + 1):
        store.replace({"w": np.full(2, float(r))})
        cp.save(store, {"round": r})
    return store


def _model_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*.npz"))


@pytest.mark.parametrize("keep, files", [(1, ["model-5.npz"]), (2, ["model-4.npz", "model-5.npz"]),
                                         (None, [f"model-{v}.npz" for v in range(1, 6)])])
def test_keep_models_keeps_the_newest_checkpoints(tmp_path: Path, keep: int | None, files: list[str]) -> None:
    cp = Checkpointer(tmp_path, keep_models=keep)
    _rounds(cp, 5)
    assert _model_files(tmp_path) == files
    assert cp.kept_versions() == [int(f[6:-4]) for f in files]
    assert cp.load_version(5)["w"].tolist() == [5.0, 5.0]
    if keep is None:
        assert cp.load_version(2)["w"].tolist() == [2.0, 2.0]


def test_pruning_leaves_the_best_model_and_drops_uncommitted_versions(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path, keep_models=None)
    store = _rounds(cp, 2)
    cp.save_best(store.weights, {"round": 2, "version": 2, "metric": "test_accuracy", "mode": "max", "value": 0.5})
    # Version 4 was written just before a crash; the resumed run commits version 3.
    atomic_write(tmp_path / "model-4.npz", lambda fh: np.savez(fh, w=np.zeros(2)))
    store.replace({"w": np.full(2, 3.0)})
    cp.save(store, {"round": 3})
    assert _model_files(tmp_path) == ["model-1.npz", "model-2.npz", "model-3.npz", "model-best.npz"]
    assert cp.kept_versions() == [1, 2, 3]


def test_kept_versions_ignore_a_model_file_beyond_the_commit(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    _rounds(cp, 1)
    atomic_write(tmp_path / "model-2.npz", lambda fh: np.savez(fh, w=np.zeros(2)))  # not committed
    assert cp.kept_versions() == [1]


def test_keep_models_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Checkpointer(tmp_path, keep_models=0)


BEST = {"round": 3, "version": 3, "metric": "test_accuracy", "mode": "max", "value": 0.75, "run_id": "r"}


def test_best_model_round_trip_and_mirror(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    assert cp.best() is None
    w = weights()
    cp.save_best(w, BEST)
    assert cp.best() == BEST
    assert json.loads((tmp_path / "best.json").read_text()) == BEST
    got, meta = Checkpointer(tmp_path).load_best()
    assert meta == BEST and list(got) == list(w)
    assert all(got[k].tobytes() == w[k].tobytes() for k in w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "model-best.npz"]


def test_improves_compares_with_the_kept_best(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path)
    assert cp.improves("test_accuracy", "max", 0.1)  # nothing kept yet
    cp.save_best({"w": np.zeros(1, np.float32)}, BEST)
    again = Checkpointer(tmp_path)  # a restarted broker reads the kept best once
    assert again.improves("test_accuracy", "max", 0.76)
    assert not again.improves("test_accuracy", "max", 0.75)  # a tie keeps the earlier round
    assert not again.improves("test_accuracy", "max", 0.5)
    assert again.improves("test_loss", "min", 9.0)  # another metric's value is not comparable: replaced
    again.save_best({"w": np.zeros(1, np.float32)}, {**BEST, "metric": "test_loss", "mode": "min", "value": 0.3})
    assert again.improves("test_loss", "min", 0.2) and not again.improves("test_loss", "min", 0.4)


def test_a_damaged_best_model_is_replaced_and_refused_for_export(tmp_path: Path) -> None:
    (tmp_path / "model-best.npz").write_bytes(b"cut short")
    cp = Checkpointer(tmp_path)
    assert cp.improves("test_accuracy", "max", 0.0)
    with pytest.raises(ConfigError) as e:
        cp.load_best()
    assert "model-best.npz is not a .npz archive" in e.value.message


def test_read_state_names_a_missing_checkpoint_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        Checkpointer(tmp_path / "none").read_state()
    assert "holds no checkpoint" in e.value.message and "--state-dir" in (e.value.fix or "")
    cp = _saved(tmp_path)
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"round": 3, "version": 3}\n')  # after the commit: load() would trim it, read_state() must not
    assert cp.read_state()["version"] == 2
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1

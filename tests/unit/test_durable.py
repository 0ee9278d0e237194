"""The pending store: acknowledged updates and the open round survive a crash, exactly as they came."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedctl.broker.durable import PendingStore
from fedctl.strategies.base import Update
from fedctl.wire import constants as C
from fedctl.wire import encode, make
from fedctl.wire.tensors import SparseTensor


def as_received(update: Update) -> tuple[Update, list[bytes], None]:
    """A batch entry: the update and the push frames a worker would have sent for it."""
    frames = encode(make(C.PUSH, 1, tensors=update.tensors, round=update.round, base_version=update.base_version,
                         seq=update.seq, kind=update.kind, num_examples=update.num_examples,
                         metrics=dict(update.metrics)))
    return update, frames, None


def test_updates_round_trip_with_their_identity_sparse_and_fp16_kept(tmp_path: Path) -> None:
    store = PendingStore(tmp_path)
    sparse = SparseTensor((4, 5), np.array([1, 7, 19], np.uint32), np.array([0.5, -1, 2], np.float16))
    update = Update("shard3@host/with:odd chars", 600, {"a": np.ones((2, 3), np.float32), "b": sparse},
                    "gradient", 41, {"train_loss": 0.25}, round=42, seq=9)
    store.save_updates([as_received(update)])
    store.save_round(42, ("shard3@host/with:odd chars", "w2"))
    [got] = PendingStore(tmp_path).load_updates()
    assert (got.round, got.seq) == (42, 9)
    assert (got.worker, got.num_examples, got.kind, got.base_version) == (update.worker, 600, "gradient", 41)
    assert dict(got.metrics) == {"train_loss": 0.25}
    assert np.array_equal(got.tensors["a"], update.tensors["a"])
    b = got.tensors["b"]
    assert isinstance(b, SparseTensor) and b.shape == (4, 5) and b.values.dtype == np.float16
    assert b.indices.tolist() == [1, 7, 19] and b.values.tolist() == [0.5, -1.0, 2.0]
    assert store.load_round() == (42, ("shard3@host/with:odd chars", "w2"))


def test_clear_removes_committed_rounds_and_torn_files_are_skipped(tmp_path: Path) -> None:
    store = PendingStore(tmp_path)
    for r in (3, 4):
        store.save_updates([as_received(Update("w", 1, {"a": np.zeros(2, np.float32)}, "weights", r - 1, round=r,
                                               seq=r))])
    store.save_round(4, ("w",))
    (store.dir / "batch-torn-00000001.push").write_bytes(b"torn")
    store.clear(through_round=3)
    assert [u.round for u in store.load_updates()] == [4]
    assert store.load_round() == (4, ("w",))
    store.clear()
    assert store.load_updates() == [] and store.load_round() is None


def test_a_group_of_updates_is_written_with_one_sync_and_reads_back(tmp_path: Path) -> None:
    store = PendingStore(tmp_path)
    batch = [as_received(Update(f"w{i}", 10 + i, {"a": np.full(3, i, np.float32)}, "weights", 4, round=5, seq=i))
             for i in range(3)]
    store.save_updates(batch)
    got = sorted(PendingStore(tmp_path).load_updates(), key=lambda u: u.worker)
    assert [(u.worker, u.num_examples, u.round, u.seq, float(u.tensors["a"][0])) for u in got] == [
        ("w0", 10, 5, 0, 0.0), ("w1", 11, 5, 1, 1.0), ("w2", 12, 5, 2, 2.0)]
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".")], "no temp files left"


def test_a_packed_push_stored_as_received_is_unpacked_on_restore(tmp_path: Path) -> None:
    from fedctl.wire import constants as C
    from fedctl.wire import encode, make, pack_sparse

    shapes = {"a": (2, 3), "b": (4, 5)}
    tensors = {"a": SparseTensor((2, 3), np.array([4], np.int64), np.array([1.5], np.float16)),
               "b": SparseTensor((4, 5), np.array([0, 19], np.int64), np.array([-2, 3], np.float16))}
    frames = encode(make(C.PUSH, 7, tensors=pack_sparse(tensors, shapes), round=3, base_version=2, seq=1,
                         kind="gradient", num_examples=600))
    assert len(frames) == 2, "one header and one packed tensor frame"
    update = Update("w1", 600, tensors, "gradient", 2, {}, round=3, seq=1)
    PendingStore(tmp_path, shapes).save_updates([(update, frames, None)])
    [got] = PendingStore(tmp_path, shapes).load_updates()
    assert sorted(got.tensors) == ["a", "b"]
    b = got.tensors["b"]
    assert isinstance(b, SparseTensor) and b.indices.tolist() == [0, 19] and b.values.tolist() == [-2.0, 3.0]


def test_remove_many_deletes_a_group_file_once_all_its_updates_are_committed(tmp_path: Path) -> None:
    store = PendingStore(tmp_path)
    ups = [Update(f"w{i}", 10, {"a": np.ones(2, np.float32)}, "gradient", 0, {}, round=1, seq=0) for i in range(3)]
    store.save_updates([as_received(u) for u in ups])
    [group] = list((tmp_path / "pending").glob("batch-*.push"))
    store.remove_many([("w0", 1), ("w2", 1)])
    assert group.exists(), "w1's update is still pending"
    assert [u.worker for u in PendingStore(tmp_path).load_updates()] == ["w0", "w1", "w2"]
    store.remove_many([("w1", 1)])
    assert not group.exists()
    assert PendingStore(tmp_path).load_updates() == []

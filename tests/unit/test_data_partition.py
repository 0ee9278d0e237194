"""Partitioners (IID, label shards, Dirichlet label skew, quantity skew) as pure functions, and write_partition's
output directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedctl.data.datasets import load_dataset
from fedctl.data.partition import by_label_shards, dirichlet_label_skew, iid, quantity_skew, write_partition
from fedctl.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


def test_iid_mnist_sizes_disjoint_cover() -> None:
    parts = iid(60_000, 100, np.random.default_rng(0))
    assert len(parts) == 100 and {len(p) for p in parts} == {600}
    _assert_disjoint_cover(parts, 60_000)


def test_iid_uneven_split_differs_by_one() -> None:
    parts = iid(1003, 10, np.random.default_rng(0))
    assert {len(p) for p in parts} == {100, 101}
    _assert_disjoint_cover(parts, 1003)


def test_iid_is_shuffled_and_seeded() -> None:
    a = iid(1000, 4, np.random.default_rng(7))
    b = iid(1000, 4, np.random.default_rng(7))
    c = iid(1000, 4, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], np.arange(250))  # not a contiguous slice


def test_label_shards_mcmahan_setting() -> None:
    labels = np.repeat(np.arange(10, dtype=np.uint8), 6000)  # sorted, balanced MNIST-like labels
    parts = by_label_shards(labels, 100, 2, np.random.default_rng(0))
    assert {len(p) for p in parts} == {600}
    _assert_disjoint_cover(parts, 60_000)
    classes = [len(np.unique(labels[p])) for p in parts]
    assert max(classes) <= 2
    assert sum(c == 2 for c in classes) >= 75  # both shards from one digit happens ~10% of the time


def test_label_shards_on_real_labels() -> None:
    _, y = load_dataset("mnist-sample", "train")
    parts = by_label_shards(y, 20, 2, np.random.default_rng(3))
    _assert_disjoint_cover(parts, len(y))
    classes = [len(np.unique(y[p])) for p in parts]
    assert max(classes) <= 4  # each of the 2 shards may straddle one label boundary
    assert np.median(classes) <= 3
    iid_classes = [len(np.unique(y[p])) for p in iid(len(y), 20, np.random.default_rng(3))]
    assert min(iid_classes) == 10  # contrast: IID clients see every digit


def test_label_shards_uneven_and_seeded() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1001)
    a = by_label_shards(labels, 7, 3, np.random.default_rng(1))
    b = by_label_shards(labels, 7, 3, np.random.default_rng(1))
    _assert_disjoint_cover(a, 1001)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(("n", "clients", "spc", "needle"), [
    (100, 0, 1, "--clients"), (100, 10, 0, "--shards-per-client"), (10, 6, 2, "non-empty"),
])
def test_bad_counts(n: int, clients: int, spc: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        by_label_shards(np.zeros(n, np.uint8), clients, spc, np.random.default_rng(0))


def test_write_partition_iid(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    manifest = write_partition("mnist-sample", tmp_path, 10, "iid", None, 0,
                               on_progress=lambda d, t: calls.append((d, t)))
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["dataset"] == "mnist-sample" and manifest["scheme"] == "iid"
    assert manifest["clients"] == 10 and manifest["seed"] == 0
    assert manifest["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert manifest["fedctl_version"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard{k}.npz" for k in range(10)]
    assert all(s["num_examples"] == 1000 and sum(s["label_histogram"]) == 1000 for s in manifest["shards"])
    assert manifest["test"]["num_examples"] == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", "test.npz", *(f"shard{k}.npz" for k in range(10))])
    assert calls[-1] == (11, 11) and len(calls) == 11
    with np.load(tmp_path / "shard3.npz", allow_pickle=False) as npz:
        assert npz["x"].dtype == np.uint8 and npz["x"].shape == (1000, 28, 28)
        assert npz["y"].dtype == np.uint8
        assert np.bincount(npz["y"], minlength=10).tolist() == manifest["shards"][3]["label_histogram"]


def test_write_partition_is_reproducible(tmp_path: Path) -> None:
    a = write_partition("mnist-sample", tmp_path / "a", 10, "shards", 2, 1)
    b = write_partition("mnist-sample", tmp_path / "b", 10, "shards", 2, 1)
    c = write_partition("mnist-sample", tmp_path / "c", 10, "shards", 2, 2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    # 20 shards of 500 and every digit has > 500 examples: a shard spans at most 2 digits, a client 4.
    assert all(sum(1 for n in s["label_histogram"] if n) <= 4 for s in a["shards"])


def test_rewrite_with_fewer_clients_removes_stale_shards(tmp_path: Path) -> None:
    write_partition("mnist-sample", tmp_path, 8, "iid", None, 0)
    (tmp_path / "notes.txt").write_text("mine")
    write_partition("mnist-sample", tmp_path, 4, "iid", None, 0)
    assert sorted(p.name for p in tmp_path.glob("shard*.npz")) == [f"shard{k}.npz" for k in range(4)]
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("scheme", "spc", "needle"), [
    ("iid", 2, "shards per client"), ("shards", None, "--shards-per-client"), ("dirichlet", None, "--dirichlet"),
    ("quantity", None, "--quantity-skew"), ("bogus", None, "iid, shards, dirichlet, quantity"),
])
def test_write_partition_bad_scheme(tmp_path: Path, scheme: str, spc: int | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        write_partition("mnist-sample", tmp_path / "out", 4, scheme, spc, 0)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_full_mnist_in_label_shards(tmp_path: Path) -> None:
    """The paper's pathological split of full MNIST (its speed is a benchmark's business, not a test's)."""
    source = Path("/work/shared/data/mnist")
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("full MNIST not available locally")
    manifest = write_partition("mnist", tmp_path, 100, "shards", 2, 0, source_dir=source)
    assert {s["num_examples"] for s in manifest["shards"]} == {600}
    assert sum(sum(1 for n in s["label_histogram"] if n) <= 2 for s in manifest["shards"]) >= 75


def _label_distance(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the whole dataset's."""
    classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum()
                          for p in parts]))


BALANCED = np.repeat(np.arange(10), 1000)  # 10 classes x 1000 examples


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5, 1.0, 100.0])
@pytest.mark.parametrize("clients", [10, 100])
def test_dirichlet_covers_every_example_once_and_no_client_is_empty(alpha: float, clients: int) -> None:
    parts = dirichlet_label_skew(BALANCED, clients, alpha, np.random.default_rng(0))
    assert len(parts) == clients and min(len(p) for p in parts) >= 1
    _assert_disjoint_cover(parts, len(BALANCED))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_dirichlet_skew_shrinks_as_alpha_grows() -> None:
    iid_distance = _label_distance(BALANCED, iid(len(BALANCED), 10, np.random.default_rng(0)))
    distance = {alpha: np.mean([_label_distance(BALANCED, dirichlet_label_skew(BALANCED, 10, alpha,
                                                                              np.random.default_rng(seed)))
                                for seed in range(5)])
                for alpha in (0.1, 1.0, 1000.0)}
    assert distance[0.1] > 0.6  # most clients see a few classes
    assert distance[0.1] > distance[1.0] > distance[1000.0]
    assert iid_distance < 0.05 and distance[1000.0] < 0.05  # large alpha: as IID as an IID split
    sizes = [len(p) for p in dirichlet_label_skew(BALANCED, 10, 1000.0, np.random.default_rng(0))]
    assert 900 < min(sizes) and max(sizes) < 1100


def test_dirichlet_tiny_alpha_many_clients_fills_empty_ones(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.repeat(np.arange(3), 10)  # 30 examples, 3 classes, 25 clients: most draw nothing
    parts = dirichlet_label_skew(labels, 25, 0.01, np.random.default_rng(2))
    assert min(len(p) for p in parts) == 1
    _assert_disjoint_cover(parts, 30)
    assert "clients drew no example" in caplog.text


def test_dirichlet_seeded_and_on_unsorted_labels() -> None:
    labels = np.random.default_rng(5).integers(0, 7, 2001)
    a = dirichlet_label_skew(labels, 13, 0.3, np.random.default_rng(9))
    b = dirichlet_label_skew(labels, 13, 0.3, np.random.default_rng(9))
    c = dirichlet_label_skew(labels, 13, 0.3, np.random.default_rng(10))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    _assert_disjoint_cover(a, 2001)


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: dirichlet_label_skew(BALANCED, 10, 0.0, np.random.default_rng(0)), "--dirichlet must be a positive"),
    (lambda: dirichlet_label_skew(BALANCED, 10, float("nan"), np.random.default_rng(0)), "--dirichlet"),
    (lambda: quantity_skew(100, 10, -1.0, np.random.default_rng(0)), "--quantity-skew must be a positive"),
    (lambda: dirichlet_label_skew(np.zeros(5, np.int64), 6, 1.0, np.random.default_rng(0)), "non-empty"),
    (lambda: quantity_skew(5, 6, 1.0, np.random.default_rng(0)), "non-empty"),
])
def test_skew_refusals(call: Callable[[], object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        call()


@pytest.mark.parametrize("beta", [0.01, 0.5, 1000.0])
def test_quantity_skew_covers_and_no_client_is_empty(beta: float) -> None:
    parts = quantity_skew(10_000, 100, beta, np.random.default_rng(0))
    assert len(parts) == 100 and min(len(p) for p in parts) >= 1
    _assert_disjoint_cover(parts, 10_000)


def test_quantity_skew_sizes_skewed_labels_iid() -> None:
    skewed = [len(p) for p in quantity_skew(len(BALANCED), 10, 0.5, np.random.default_rng(0))]
    even = [len(p) for p in quantity_skew(len(BALANCED), 10, 1000.0, np.random.default_rng(0))]
    assert np.std(skewed) / np.mean(skewed) > 0.5 and max(skewed) > 10 * min(skewed)
    assert np.std(even) / np.mean(even) < 0.05
    parts = quantity_skew(len(BALANCED), 10, 0.5, np.random.default_rng(0))
    large = [p for p in parts if len(p) >= 1000]
    assert large and _label_distance(BALANCED, large) < 0.06  # labels follow the dataset's


def test_write_partition_dirichlet_records_alpha(tmp_path: Path) -> None:
    manifest = write_partition("mnist-sample", tmp_path, 10, "dirichlet", seed=0, alpha=0.1)
    assert manifest["scheme"] == "dirichlet" and manifest["alpha"] == 0.1 and "beta" not in manifest
    assert manifest["format"] == "fedctl-partition/1"
    assert sum(s["num_examples"] for s in manifest["shards"]) == 10_000
    assert all(s["num_examples"] >= 1 for s in manifest["shards"])
    histograms = np.array([s["label_histogram"] for s in manifest["shards"]])
    assert np.median((histograms > 0).sum(axis=1)) < 8  # most clients lack some digits
    with pytest.raises(ConfigError, match="the iid scheme takes no Dirichlet alpha"):
        write_partition("mnist-sample", tmp_path / "x", 10, "iid", alpha=0.5)
    with pytest.raises(ConfigError, match="the quantity scheme takes no shards per client"):
        write_partition("mnist-sample", tmp_path / "x", 10, "quantity", 2, beta=0.5)

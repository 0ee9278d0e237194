"""A data holder's own dataset: each format written as a real file in tmp, loaded, refused when unusable; the
held-out split; ``--data PATH`` resolution in ``load_data``; a local dataset partitioned and its shards read back."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest

from fedctl.api.inputs import LOCAL_HOLDOUT, load_data
from fedctl.data.local import LocalData, load_local, split_holdout
from fedctl.data.partition import write_local_partition, write_partition
from fedctl.data.shards import load_shard, read_manifest
from fedctl.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def blobs(n: int = 120, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return rng.normal(size=(n, 4)) + y[:, None], y


# ---- .npz


def test_npz_features_as_they_are(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.uint8).reshape(6, 2, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 4], dtype=np.int32))
    data = load_local(tmp_path / "d.npz")
    assert data.x.dtype == np.float32 and data.x.shape == (6, 2, 2)
    np.testing.assert_array_equal(data.x, x)  # not scaled: the user's task normalises
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 1, 2, 0, 1, 4]
    assert data.classes == ("0", "1", "2", "3", "4")  # integer labels kept as they are
    assert data.source == str(tmp_path / "d.npz") and data.skipped == 0 and data.num_examples == 6


def test_npz_one_feature_per_example(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.array([0.5, 1.5, 2.5]), y=np.array([1, 0, 1]))
    assert load_local(tmp_path / "d.npz").x.shape == (3, 1)


@pytest.mark.parametrize(("arrays", "needle"), [
    ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 1.0])}, "labels must be integers"),
    ({"x": np.zeros((3, 2))}, "holds the arrays x, not x and y"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "label -1 is negative"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "one label per row of x"),
    ({"x": np.array(["a", "b"]), "y": np.array([0, 1])}, "not a numeric array"),
    ({"x": np.zeros((0, 2)), "y": np.zeros(0, np.int64)}, "holds no examples"),
    ({"x": np.array([[0.0, 1.0], [np.inf, 2.0]]), "y": np.array([0, 1])},
     r"1 feature values are NaN or infinite \(the first in example 1\)"),
    ({"x": np.zeros((2, 1)), "y": np.array([0, 20_000])}, "more than the 10000"),
])
def test_npz_refused(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=needle):
        load_local(tmp_path / "d.npz")


def test_npz_pickle_and_garbage_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="only unpickling could load"):
        load_local(tmp_path / "p.npz")
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a .npz archive"):
        load_local(tmp_path / "g.npz")


# ---- CSV / TSV


def test_csv_string_labels_sorted(tmp_path: Path) -> None:
    rows = [[1.5, 2, "dog"], [0.5, -1, "cat"], [3, 4e2, "bird"], [0, 0, "cat"]]
    data = load_local(write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows))
    assert data.classes == ("bird", "cat", "dog")
    assert data.y.tolist() == [2, 1, 0, 1]
    np.testing.assert_array_equal(data.x, np.array([[1.5, 2], [0.5, -1], [3, 400], [0, 0]], np.float32))


def test_classes_give_every_holder_the_same_ids(tmp_path: Path) -> None:
    """A holder without 'bird' numbers cat/dog 0/1 by itself — but 1/2 like the others with the run's --classes."""
    rows = [[0.5, "dog"], [1.5, "cat"], [2.5, "dog"]]
    path = write_csv(tmp_path / "d.csv", ["a", "species"], rows)
    alone = load_local(path, label_column="species")
    assert alone.classes == ("cat", "dog") and alone.y.tolist() == [1, 0, 1]
    agreed = load_local(path, label_column="species", classes=["bird", "cat", "dog"])
    assert agreed.classes == ("bird", "cat", "dog") and agreed.y.tolist() == [2, 1, 2]
    folder = tmp_path / "images"
    for name in ("zebra", "ant"):
        (folder / name).mkdir(parents=True)
    from PIL import Image
    Image.new("L", (4, 4), 9).save(folder / "zebra" / "z.png")
    Image.new("L", (4, 4), 9).save(folder / "ant" / "a.png")
    data = load_local(folder, classes=["zebra", "yak", "ant"])  # not sorted: the run's own order
    assert data.y.tolist() == [2, 0] and data.classes == ("zebra", "yak", "ant")
    with pytest.raises(DataError, match="label 'cat' is not in the class list"):
        load_local(path, label_column="species", classes=["dog", "bird"])
    with pytest.raises(DataError, match="names 'dog' twice"):
        load_local(path, label_column="species", classes=["dog", "cat", "dog"])
    shard = load_data(str(path), None, holdout=0.0, label_column="species", classes=("bird", "cat", "dog"))
    assert shard.y.tolist() == [2, 1, 2]


def test_csv_integer_labels_kept_and_label_column_anywhere(tmp_path: Path) -> None:
    rows = [[0, 1.0, 9], [2, 2.0, 8], [2, 3.0, 7]]
    data = load_local(write_csv(tmp_path / "d.csv", ["target", "f1", "f2"], rows), label_column="target")
    assert data.y.tolist() == [0, 2, 2] and data.classes == ("0", "1", "2")  # class 1 absent here, kept as id 1
    assert data.x[:, 0].tolist() == [1.0, 2.0, 3.0] and data.x[:, 1].tolist() == [9, 8, 7]


def test_csv_negative_labels_mapped_and_tsv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.tsv", ["x", "label"], [[1, -1], [2, 1], [3, -1]], delimiter="\t")
    data = load_local(path)
    assert data.classes == ("-1", "1") and data.y.tolist() == [0, 1, 0]


@pytest.mark.parametrize(("header", "rows", "needle"), [
    (["a", "b", "y"], [[1, 2, 0]], r"has no label column 'label' \(its columns: a, b, y\)"),
    (["a", "city", "name", "label"], [[1, "Paris", "x", 0]],
     r"feature columns are not numeric: city \('Paris' in row 1\); name \('x' in row 1\)"),
    (["a", "label"], [[1, 0], ["", 1]], r"a \(empty cell in row 2\)"),
    (["a", "label"], [[1, 0], [2, ""]], "label column 'label' has 1 empty cells"),
    (["a", "label"], [[1, 0.5], [2, 1]], r"not class ids \(e.g. 0.5\)"),
    (["a", "label"], [], "holds no examples"),
    (["label"], [[1]], "no feature columns"),
    (["a", "label"], [[1, 0], [2, 1, 3]], "row 2 has 3 fields, the header has 2"),
    (["a", "label"], [[1, 0], ["nan", 1]], "NaN or infinite"),
])
def test_csv_refused(tmp_path: Path, header: list[str], rows: list[list[object]], needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        load_local(write_csv(tmp_path / "d.csv", header, rows))


def test_csv_empty_file(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_local(tmp_path / "d.csv")


def test_csv_missing_label_column_says_the_option(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_local(write_csv(tmp_path / "d.csv", ["a", "target"], [[1, 0]]))
    assert "rename the label column to 'label', or name it with --label-column NAME" in str(
        info.value)
    with pytest.raises(DataError, match="pass --label-column one of its columns"):
        load_local(tmp_path / "d.csv", label_column="y")


# ---- Parquet


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"f": np.array([0.5, 1.5, 2.5], np.float64), "n": np.array([1, 2, 3], np.int16),
                      "flag": [True, False, True], "label": ["b", "a", "b"]})
    pq.write_table(table, tmp_path / "d.parquet")
    data = load_local(tmp_path / "d.parquet")
    assert data.classes == ("a", "b") and data.y.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(data.x, np.array([[0.5, 1, 1], [1.5, 2, 0], [2.5, 3, 1]], np.float32))
    pq.write_table(pa.table({"f": [1.0, 2.0], "label": [3, 1]}), tmp_path / "ints.pq")
    assert load_local(tmp_path / "ints.pq").classes == ("0", "1", "2", "3")


@pytest.mark.parametrize(("columns", "needle"), [
    ({"f": [1.0, 2.0], "city": ["x", "y"], "label": [0, 1]}, r"not numeric: city \(string\)"),
    ({"f": [1.0, None], "label": [0, 1]}, r"f \(1 missing values\)"),
    ({"f": [1.0, 2.0], "target": [0, 1]}, r"no label column 'label' \(its columns: f, target\)"),
    ({"f": [1.0, 2.0], "label": [0.25, 1.0]}, "not class ids"),
])
def test_parquet_refused(tmp_path: Path, columns: dict[str, list[object]], needle: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=needle):
        load_local(tmp_path / "d.parquet")


def test_not_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 but no")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_local(tmp_path / "d.parquet")


# ---- image folders


def save_image(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    pytest.importorskip("PIL")
    root = tmp_path / "digits"
    for k in range(3):
        save_image(root / "zero" / f"{k}.png", np.full((8, 6), 10 * k, np.uint8))
        save_image(root / "one" / "nested" / f"{k}.PNG", np.full((8, 6), 255, np.uint8))
    (root / "one" / "README.txt").write_text("not an image: ignored")
    (root / "two").mkdir()  # an empty class keeps its id
    return root


def test_image_folder_grayscale(gray_folder: Path) -> None:
    data = load_local(gray_folder)
    assert data.classes == ("one", "two", "zero")
    assert data.x.shape == (6, 1, 8, 6) and data.x.dtype == np.float32
    assert data.y.tolist() == [0, 0, 0, 2, 2, 2]
    assert data.x[:3].min() == 1.0 and data.x[3:, 0, 0, 0].tolist() == pytest.approx([0, 10 / 255, 20 / 255])
    assert data.skipped == 0


def test_image_folder_colour_and_jpeg(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    root = tmp_path / "pets"
    save_image(root / "cat" / "a.jpg", np.full((5, 7, 3), (200, 0, 0), np.uint8))
    save_image(root / "dog" / "b.png", np.full((5, 7), 128, np.uint8))
    save_image(root / "dog" / "c.png", np.zeros((5, 7, 4), np.uint8))  # RGBA: alpha dropped
    data = load_local(root)
    assert data.x.shape == (3, 3, 5, 7) and data.y.tolist() == [0, 1, 1]
    assert abs(float(data.x[0, 0].mean()) - 200 / 255) < 0.02 and float(data.x[0, 1:].max()) < 0.05  # JPEG is lossy
    np.testing.assert_allclose(data.x[1], 128 / 255)  # gray repeated into every channel


def test_unreadable_images_skipped_with_a_warning(gray_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (gray_folder / "zero" / "broken.png").write_bytes(b"\x89PNG but cut short")
    (gray_folder / "one" / "text.jpg").write_text("a text file named like an image")
    with caplog.at_level(logging.WARNING, logger="fedctl.data.images"):
        data = load_local(gray_folder)
    assert data.num_examples == 6 and data.skipped == 2
    assert "skipped 2 of 8 image files" in caplog.text


def test_image_folder_refused(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    (tmp_path / "flat").mkdir()
    save_image(tmp_path / "flat" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_local(tmp_path / "flat")
    (tmp_path / "none" / "cat").mkdir(parents=True)
    (tmp_path / "none" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no .png, .jpg or .jpeg files in its class sub-folders \(cat\)"):
        load_local(tmp_path / "none")
    for k in range(2):
        (tmp_path / "bad" / "cat").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "cat" / f"{k}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 2 image files under .* could be read"):
        load_local(tmp_path / "bad")


def test_image_sizes_must_agree_unless_resized(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    save_image(tmp_path / "d" / "a" / "1.png", np.zeros((4, 6), np.uint8))
    save_image(tmp_path / "d" / "b" / "2.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match=r"images differ in size \(6x4 as .*1.png, 5x5 as .*2.png; 2 sizes in all\)"):
        load_local(tmp_path / "d")
    assert load_local(tmp_path / "d", image_size=(3, 2)).x.shape == (2, 1, 3, 2)


# ---- format detection


def test_unknown_format_missing_path_and_partition_dir(tmp_path: Path) -> None:
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="unknown dataset format '.xlsx'"):
        load_local(tmp_path / "d.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        load_local(tmp_path / "nowhere.csv")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="is a partition directory"):
        load_local(tmp_path / "part")


# ---- the held-out split


def test_split_holdout_stratified_seeded_disjoint() -> None:
    x, y = blobs(1000, 4)
    y[:100] = 0  # unequal classes: 325, 225, 225, 225
    data = LocalData(x.astype(np.float32), y.astype(np.int64), ("a", "b", "c", "d"), "mem")
    train, held = split_holdout(data, 0.2, seed=3)
    assert held.num_examples == 200 and train.num_examples == 800
    assert np.bincount(held.y).tolist() == [65, 45, 45, 45]
    rows = np.concatenate([train.x, held.x])
    assert len(np.unique(rows, axis=0)) == 1000  # every example once
    again, _ = split_holdout(data, 0.2, seed=3)
    other, _ = split_holdout(data, 0.2, seed=4)
    np.testing.assert_array_equal(train.x, again.x)
    assert not np.array_equal(train.x, other.x)


def test_split_holdout_edges() -> None:
    data = LocalData(np.zeros((5, 1), np.float32), np.array([0, 0, 1, 1, 1]), ("a", "b"), "mem")
    train, held = split_holdout(data, 0.0, 0)
    assert train.num_examples == 5 and held.num_examples == 0 and held.x.shape == (0, 1)
    assert split_holdout(data, 0.01, 0)[1].num_examples == 1  # asked for a holdout: at least one example
    assert split_holdout(data, 0.8, 0)[0].num_examples == 1
    with pytest.raises(ConfigError, match="--holdout 0.95 of 5 examples would leave no training example"):
        split_holdout(data, 0.95, 0)
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        split_holdout(data, 1.0, 0)


# ---- --data PATH in load_data


def test_load_data_local_csv_with_default_holdout(tmp_path: Path) -> None:
    x, y = blobs(200, 4)
    path = write_csv(tmp_path / "mine.csv", ["f0", "f1", "f2", "f3", "label"], [[*r, c] for r, c in zip(x, y)])
    shard = load_data(str(path), None, holdout=None)
    assert shard.name == "mine.csv" and shard.classes == ("0", "1", "2", "3")
    assert shard.num_holdout == round(LOCAL_HOLDOUT * 200) and shard.num_examples == 180
    assert shard.holdout_x is not None and shard.holdout_x.shape == (20, 4) and shard.x.shape == (180, 4)
    assert np.bincount(shard.holdout_y if shard.holdout_y is not None else []).tolist() == [5, 5, 5, 5]
    assert load_data(str(path), None, holdout=0).num_holdout == 0
    assert load_data(str(path), None).num_holdout == 0  # serve --eval-data: everything is evaluated


def test_load_data_shard_keeps_its_examples_and_shard_path(tmp_path: Path) -> None:
    write_partition("mnist-sample", tmp_path, 4, "iid", None, 0)
    shard = load_data("shard1", tmp_path, holdout=None)
    assert shard.num_examples == 2500 and shard.holdout_x is None
    by_path = load_data(str(tmp_path / "shard1.npz"), None, holdout=None)  # a shard file is read as that shard
    assert by_path.name == "shard1" and by_path.num_holdout == 0
    np.testing.assert_array_equal(by_path.x, shard.x)
    assert load_data("shard1", tmp_path, holdout=0.1).num_holdout == 250


@pytest.mark.parametrize(("name", "needle"), [
    ("{tmp}/nowhere/shard0.npz", "--data-dir {tmp}/nowhere --data shard0"),
    ("{tmp}/nowhere.csv", "pass the path of an existing dataset"),
    ("shard0", "no --data-dir was given"),
])
def test_load_data_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_data(name.format(tmp=tmp_path), None)
    assert needle.format(tmp=tmp_path) in str(info.value)


# ---- partitioning a local dataset


def test_local_partition_round_trip(tmp_path: Path) -> None:
    x, y = blobs(300, 3)
    np.savez(tmp_path / "d.npz", x=x.reshape(300, 2, 2), y=y)
    data = load_local(tmp_path / "d.npz")
    manifest = write_local_partition(data, tmp_path / "out", 4, "dirichlet", alpha=0.5, seed=1, test_fraction=0.1)
    assert read_manifest(tmp_path / "out") == manifest
    assert manifest["format"] == "fedctl-partition/2" and manifest["normalization"] is None
    assert manifest["classes"] == ["0", "1", "2"] and manifest["feature_shape"] == [2, 2]
    assert manifest["alpha"] == 0.5 and manifest["test"]["label_histogram"] == [10, 10, 10]
    shards = [load_shard(tmp_path / "out", k) for k in range(4)]
    test = load_shard(tmp_path / "out", "test")
    assert all(s.num_examples > 0 and s.classes == ("0", "1", "2") for s in shards)
    assert [s["label_histogram"] for s in manifest["shards"]] == [np.bincount(s.y, minlength=3).tolist()
                                                                  for s in shards]
    rows = np.concatenate([s.x for s in [*shards, test]]).reshape(300, 4)
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(data.x.reshape(300, 4), axis=0))  # as they are
    assert load_data("shard2", tmp_path / "out", holdout=None).num_holdout == 0


def test_local_partition_without_test_split(tmp_path: Path) -> None:
    data = LocalData(np.ones((10, 3), np.float32), np.arange(10) % 2, ("no", "yes"), "mem.csv")
    manifest = write_local_partition(data, tmp_path, 2, "iid", test_fraction=0.0)
    assert manifest["test"]["num_examples"] == 0
    with pytest.raises(DataError, match="holds no examples"):
        load_data("test", tmp_path)

"""Locating, verifying and downloading datasets, against real files and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fedctl.data.datasets import BUNDLED_ROOT, DATASETS, FILE_NAMES, load_dataset, locate_dataset
from fedctl.data.download import download, fetch_dataset
from fedctl.data.idx import encode_idx, write_idx
from fedctl.errors import ChecksumError, ConfigError, DataError, DatasetNotFound

pytestmark = pytest.mark.timeout(60)
SAMPLE_DIR = BUNDLED_ROOT / "mnist-sample"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's real cache and $FEDCTL_DATA_DIR out of the search path."""
    monkeypatch.delenv("FEDCTL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


class _Server:
    def __init__(self, root: Path, fail_first: int = 0, status: int = 503) -> None:
        self.requests: Counter[str] = Counter()
        self.fail_first, self.status = fail_first, status
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] += 1
                if server.requests[self.path] <= server.fail_first:
                    self.send_error(server.status)
                    return
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers: list[_Server] = []

    def start(root: Path, **kwargs: int) -> _Server:
        servers.append(_Server(root, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, str]:
    """A served directory holding one gzipped IDX file; returns (dir, sha256 of its uncompressed content)."""
    root = tmp_path / "www"
    root.mkdir()
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(root / "tiny-idx3-ubyte.gz", array)
    return root, hashlib.sha256(encode_idx(array)).hexdigest()


def test_download_verifies_and_renames(serve, tiny, tmp_path: Path) -> None:
    root, digest = tiny
    server = serve(root)
    dest = tmp_path / "dl" / "tiny-idx3-ubyte.gz"
    assert download(server.url + "tiny-idx3-ubyte.gz", dest, digest, progress=False) == dest
    assert dest.read_bytes() == (root / "tiny-idx3-ubyte.gz").read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_raw_file_hashed_as_is(serve, tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "raw").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    server = serve(root)
    digest = hashlib.sha256((root / "raw").read_bytes()).hexdigest()
    dest = download(server.url + "raw", tmp_path / "raw", digest, progress=False)
    assert dest.read_bytes() == (root / "raw").read_bytes()


def test_checksum_mismatch_rejected_and_nothing_left(serve, tiny, tmp_path: Path) -> None:
    root, digest = tiny
    server = serve(root)
    out = tmp_path / "dl"
    out.mkdir()
    (out / "keep.gz").write_bytes(b"previous good copy")
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download(server.url + "tiny-idx3-ubyte.gz", out / "keep.gz", wrong, progress=False)
    assert digest in str(info.value) and wrong in str(info.value) and info.value.fix
    assert (out / "keep.gz").read_bytes() == b"previous good copy"  # the old file is untouched
    assert [p.name for p in out.iterdir()] == ["keep.gz"]  # no temp file left behind
    assert server.requests["/tiny-idx3-ubyte.gz"] == 1  # a mismatch is not retried


def test_404_is_a_clear_data_error(serve, tiny, tmp_path: Path) -> None:
    server = serve(tiny[0])
    url = server.url + "missing.gz"
    with pytest.raises(DataError, match="404") as info:
        download(url, tmp_path / "missing.gz", progress=False, backoff_s=0)
    assert url in str(info.value) and info.value.fix
    assert not list(tmp_path.glob("*missing*")) and not list(tmp_path.glob(".*part"))
    assert server.requests["/missing.gz"] == 1  # a 404 is not retried


def test_transient_errors_retried(serve, tiny, tmp_path: Path) -> None:
    root, digest = tiny
    server = serve(root, fail_first=2)
    dest = download(server.url + "tiny-idx3-ubyte.gz", tmp_path / "t.gz", digest, progress=False, backoff_s=0)
    assert dest.exists() and server.requests["/tiny-idx3-ubyte.gz"] == 3


def test_retries_exhausted(serve, tiny, tmp_path: Path) -> None:
    server = serve(tiny[0], fail_first=99)
    with pytest.raises(DataError, match="after 3 attempts"):
        download(server.url + "tiny-idx3-ubyte.gz", tmp_path / "dl" / "t.gz", retries=2, progress=False,
                 backoff_s=0)
    assert not list((tmp_path / "dl").iterdir())
    assert server.requests["/tiny-idx3-ubyte.gz"] == 3


def test_only_http_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheme"):
        download(f"file://{SAMPLE_DIR}/t10k-labels-idx1-ubyte.gz", tmp_path / "x", progress=False)


def test_fetch_dataset_from_local_mirror(serve, tmp_path: Path) -> None:
    server = serve(SAMPLE_DIR)
    dest = fetch_dataset("mnist-sample", tmp_path / "mirror", base_url=server.url, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in FILE_NAMES)
    x, y = load_dataset("mnist-sample", "test", source_dir=dest)
    x0, y0 = load_dataset("mnist-sample", "test")
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    # Second fetch: everything present and valid, nothing requested again.
    fetch_dataset("mnist-sample", dest, base_url=server.url, progress=False)
    assert set(server.requests.values()) == {1}


def test_fetch_dataset_rejects_wrong_files(serve, tmp_path: Path) -> None:
    server = serve(SAMPLE_DIR)  # serves the sample's files under MNIST's names: digests differ
    dest = tmp_path / "mnist"
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):
        fetch_dataset("mnist", dest, base_url=server.url, progress=False)
    assert not list(dest.iterdir())


def test_locate_downloads_into_cache(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(SAMPLE_DIR)
    spec = dataclasses.replace(DATASETS["mnist-sample"], base_url=server.url, bundled=False)
    monkeypatch.setitem(DATASETS, "mnist-sample", spec)
    with pytest.raises(DataError, match="--download"):
        locate_dataset("mnist-sample")
    found = locate_dataset("mnist-sample", download=True)
    assert found == tmp_path / "xdg-cache" / "fedctl" / "mnist-sample"
    assert locate_dataset("mnist-sample") == found


def test_load_bundled_sample() -> None:
    x, y = load_dataset("mnist-sample", "train")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and y.dtype == np.uint8
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first training labels
    x, y = load_dataset("mnist-sample", "test")
    assert x.shape == (2_000, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]


def test_raw_files_count_as_dataset(tmp_path: Path) -> None:
    for name in FILE_NAMES:
        (tmp_path / name).write_bytes(gzip.decompress((SAMPLE_DIR / f"{name}.gz").read_bytes()))
    assert locate_dataset("mnist-sample", source_dir=tmp_path) == tmp_path
    x, _ = load_dataset("mnist-sample", "test", source_dir=tmp_path)
    assert x.shape == (2_000, 28, 28)


def test_corrupt_file_fails_checksum(tmp_path: Path) -> None:
    shutil.copytree(SAMPLE_DIR, tmp_path, dirs_exist_ok=True)
    from fedctl.data.idx import read_idx

    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    labels[0] = (labels[0] + 1) % 10  # a valid IDX file, one label off
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ChecksumError) as info:
        load_dataset("mnist-sample", "test", source_dir=tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert DATASETS["mnist-sample"].sha256["t10k-labels-idx1-ubyte"] in message
    assert "--download" in message or "--source-dir" in message


def test_not_found_names_places_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCTL_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError) as info:
        locate_dataset("mnist")
    message = str(info.value)
    assert str(tmp_path / "data" / "mnist") in message
    assert str(tmp_path / "xdg-cache" / "fedctl" / "mnist") in message
    # The data layer names no option of its own (join and serve have neither --source-dir nor --download): it says
    # where the files go and the command that downloads them; commands with --source-dir replace the fix.
    assert f"put its four IDX files (.gz or raw) in {tmp_path / 'data' / 'mnist'}" in message
    assert "`fedctl partition --dataset mnist --download" in message
    assert "--source-dir" not in message
    assert isinstance(info.value, DatasetNotFound) and info.value.dataset == "mnist" and info.value.downloadable


def test_env_dir_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(SAMPLE_DIR, tmp_path / "data" / "mnist-sample")
    monkeypatch.setenv("FEDCTL_DATA_DIR", str(tmp_path / "data"))
    assert locate_dataset("mnist-sample") == tmp_path / "data" / "mnist-sample"


def test_explicit_source_dir_is_authoritative(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        locate_dataset("mnist-sample", source_dir=tmp_path)  # the bundled copy is not used instead


def test_unknown_names() -> None:
    with pytest.raises(ConfigError, match="mnist-sample"):
        load_dataset("cifar")
    with pytest.raises(ConfigError, match="train, test"):
        load_dataset("mnist-sample", "validation")


def _uncompressed_sha256(path: Path) -> str:
    with gzip.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize(("name", "directory"), [("mnist", Path("/work/shared/data/mnist")),
                                                 ("fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))])
def test_registry_digests_match_local_copies(name: str, directory: Path) -> None:
    if not all((directory / f"{n}.gz").is_file() for n in FILE_NAMES):
        pytest.skip(f"no local copy of {name} in {directory}")
    for stem in FILE_NAMES:
        assert _uncompressed_sha256(directory / f"{stem}.gz") == DATASETS[name].sha256[stem], stem


def test_sample_digests_match_bundled_files() -> None:
    for stem in FILE_NAMES:
        assert _uncompressed_sha256(SAMPLE_DIR / f"{stem}.gz") == DATASETS["mnist-sample"].sha256[stem]

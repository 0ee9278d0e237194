"""Downloading dataset files over HTTP(S): temp file, SHA-256 check, atomic rename, retries, optional progress.

The digest checked is always that of the *uncompressed* content: when the downloaded bytes are gzip (by magic
bytes) they are inflated before hashing, otherwise they are hashed as they are. This is the convention of the
dataset registry, so a ``.gz`` mirror and a raw mirror verify against the same table.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fedctl.data.datasets import FILE_NAMES, find_file, get_dataset, read_verified
from fedctl.data.idx import atomic_output, sha256_uncompressed
from fedctl.errors import ChecksumError, ConfigError, DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
DEFAULT_MAX_BYTES = 512 << 20
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    """A transient failure worth another attempt (connection trouble, timeouts, 5xx)."""


def download(url: str, dest: str | os.PathLike[str], sha256: str | None = None, *, progress: bool = True,
             retries: int = 2, timeout_s: float = 30.0, backoff_s: float = 1.0,
             max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its SHA-256.

    The body goes to a temp file beside ``dest``; it is renamed to ``dest`` only once complete and verified,
    so ``dest`` is never left half-written and a rejected download leaves nothing behind.

    Parameters
    ----------
    url:
        An ``http://`` or ``https://`` URL.
    dest:
        Destination file; its directory is created if needed.
    sha256:
        Expected SHA-256 of the **uncompressed** content (gzip bodies are inflated before hashing), or None.
    progress:
        Show a rich progress bar on stderr.
    retries:
        Extra attempts after a transient failure (network error, timeout, HTTP 5xx/429).
    timeout_s:
        Socket timeout for connecting and for each read.
    backoff_s:
        Sleep before retry ``k`` is ``backoff_s * k``.
    max_bytes:
        Refuse bodies larger than this.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    ConfigError
        The URL is not http(s).
    DataError
        HTTP error (e.g. 404), network failure after all retries, or body too large.
    ChecksumError
        The content does not match ``sha256`` (nothing is written).
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ConfigError(f"refusing to download {url!r}: scheme {scheme!r} is not http or https",
                          fix="use an http:// or https:// URL")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            with atomic_output(dest) as f:
                _fetch_into(url, f, timeout_s, max_bytes, progress)
                f.flush()
                _verify(url, f.name, sha256)
            log.info("downloaded %s -> %s", url, dest)
            return dest
        except _Retryable as err:
            if attempt == retries:
                raise DataError(f"could not download {url}: {err} (after {retries + 1} attempts)",
                                fix="check the network connection or use --source-dir DIR with files "
                                    "obtained another way") from err
            log.warning("download of %s failed (%s); retrying (%d/%d)", url, err, attempt + 1, retries)
            time.sleep(backoff_s * (attempt + 1))
    raise AssertionError("unreachable")  # the loop either returns or raises


def _verify(url: str, tmp_path: str, sha256: str | None) -> None:
    if sha256 is None:
        return
    actual = sha256_uncompressed(tmp_path)
    if actual != sha256.lower():
        raise ChecksumError(f"download of {url} rejected: SHA-256 of the uncompressed content is {actual}, "
                            f"expected {sha256}",
                            fix="the mirror serves a different or corrupt file; try again later or another "
                                "base URL")


def _fetch_into(url: str, out: BinaryIO, timeout_s: float, max_bytes: int, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "fedctl"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            if total is not None and total > max_bytes:
                raise DataError(f"{url} is {total} bytes, more than the limit of {max_bytes}",
                                fix="check the URL")
            with _progress_bar(url, total, progress) as advance:
                _copy(response, out, url, max_bytes, advance)
    except urllib.error.HTTPError as err:
        if err.code in _RETRYABLE_HTTP:
            raise _Retryable(f"HTTP {err.code} {err.reason}") from err
        raise DataError(f"could not download {url}: HTTP {err.code} {err.reason}",
                        fix="check the URL or --base-url; the mirror may have moved") from err
    except urllib.error.URLError as err:
        raise _Retryable(str(err.reason)) from err
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
        raise _Retryable(f"network error: {err!r}") from err


def _copy(response: BinaryIO, out: BinaryIO, url: str, max_bytes: int, advance: Callable[[int], None]) -> None:
    received = 0
    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
        received += len(chunk)
        if received > max_bytes:
            raise DataError(f"{url} sent more than the limit of {max_bytes} bytes", fix="check the URL")
        out.write(chunk)
        advance(len(chunk))


@contextlib.contextmanager
def _progress_bar(url: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(url.rsplit("/", 1)[-1], total=total)
        yield lambda n: bar.advance(task, n)


def fetch_dataset(name: str, dest_dir: str | os.PathLike[str], base_url: str | None = None, *,
                  progress: bool = True, **download_kwargs: float) -> Path:
    """Download a registered dataset's four ``.gz`` IDX files into ``dest_dir``.

    Files already present and matching their digest are kept; present but corrupt ones are replaced.

    Parameters
    ----------
    name:
        Registered dataset name.
    dest_dir:
        Target directory (created if needed).
    base_url:
        Overrides the registry's base URL (a mirror, or a local server in tests).
    progress:
        Show progress bars.
    **download_kwargs:
        Passed on to :func:`download` (``retries``, ``timeout_s``, ``backoff_s``).

    Returns
    -------
    pathlib.Path
        ``dest_dir``.
    """
    spec = get_dataset(name)
    base = base_url or spec.base_url
    if base is None:
        raise DataError(f"dataset {name!r} has no download URL", fix="pass --source-dir DIR or a base URL")
    base = base if base.endswith("/") else base + "/"
    dest = Path(dest_dir)
    for stem in FILE_NAMES:
        if _already_good(dest, stem, spec.sha256[stem]):
            continue
        download(base + f"{stem}.gz", dest / f"{stem}.gz", spec.sha256[stem], progress=progress,
                 **download_kwargs)  # type: ignore[arg-type]
    return dest


def _already_good(directory: Path, stem: str, sha256: str) -> bool:
    path = find_file(directory, stem)
    if path is None:
        return False
    try:
        read_verified(path, sha256)
    except DataError:
        log.warning("%s is corrupt; downloading it again", path)
        return False
    return True

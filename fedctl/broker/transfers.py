"""Spool files of chunked pushes (docs/protocol.md §7.1), the file side of the core's transfer effects.

An incoming update too large for one message is never held whole: the core says where each chunk's slices go
(:class:`~fedctl.broker.effects.WriteChunk`) in a file of the model's flat float32 layout, and aggregation reads it
back one tensor at a time (:class:`SpoolTensors`).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from fedctl.wire import chunks


class SpoolTensors(Mapping[str, np.ndarray]):
    """A dense float32 update kept in a file of the model's flat layout; each tensor is read when asked for."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple[int, ...]], owned: bool = False) -> None:
        self.path = Path(path)
        self.shapes = dict(shapes)
        self.offsets, self.total = chunks.flat_offsets(self.shapes)
        if owned:  # not kept by the pending store: delete the file with the last reference
            weakref.finalize(self, _unlink, self.path)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        return np.fromfile(self.path, dtype=chunks.CHUNK_DTYPE, count=math.prod(shape),
                           offset=self.offsets[name] * chunks.CHUNK_DTYPE.itemsize).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class SpoolFiles:
    """The open spool files of one broker, by name, in ``directory``."""

    def __init__(self, directory: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.dir = Path(directory)
        self.shapes = dict(shapes)
        self._fds: dict[str, int] = {}

    def open(self, name: str, nbytes: int) -> None:
        """A file of ``nbytes`` (sparse on disk until written)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, nbytes)
        self._fds[name] = fd

    def write(self, name: str, pieces: list[tuple[int, np.ndarray]]) -> None:
        fd = self._fds[name]
        for at, values in pieces:
            os.pwrite(fd, values.tobytes(), at)

    def close(self, name: str, delete: bool) -> None:
        """All chunks are written (the durable writer syncs the file before the push is acknowledged), or the
        transfer is abandoned (``delete``)."""
        fd = self._fds.pop(name, -1)
        if fd >= 0:
            os.close(fd)
        if delete:
            _unlink(self.dir / name)

    def reader(self, name: str, owned: bool) -> SpoolTensors:
        return SpoolTensors(self.dir / name, self.shapes, owned)

    def abort_all(self) -> None:
        for name in list(self._fds):
            self.close(name, delete=True)

    def remove_stale(self) -> None:
        """Delete spool files a broker left when it stopped mid-transfer (only where no pending store keeps any)."""
        for stale in self.dir.glob("spool-*.f4") if self.dir.is_dir() else []:
            stale.unlink(missing_ok=True)

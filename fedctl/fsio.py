"""Crash-safe file writes shared by the broker's checkpoints and the worker's state, and the up-front check that an
output directory is writable."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from fedctl.errors import ConfigError


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` via ``write(fileobj)`` to a temp file in the same directory, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_writable_dir(path: Path, option: str) -> None:
    """Refuse, before any work starts, an output directory this process could not create or write in.

    Probes by creating (and at once removing) a temporary directory in ``path`` or, when ``path`` does not exist
    yet, in its nearest existing ancestor, so nothing stays behind: the command creates ``path`` only when it has
    something to write there. Catches what permission bits alone miss (read-only mounts, a file where a
    directory should be).

    Raises
    ------
    ConfigError
        ``option PATH`` names the cause (a file in the way, permission denied, read-only file system) and the fix.
    """
    fix = f"pass {option} a directory you can write to"
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"{option} {path} is not a directory", fix)
        raise ConfigError(f"{option} {path} cannot be created: {existing} is not a directory", fix)
    try:
        Path(tempfile.mkdtemp(prefix=".fedctl-probe-", dir=existing)).rmdir()
    except OSError as err:
        where = "" if existing == path else f" (in {existing})"
        raise ConfigError(f"{option} {path} is not writable{where}: {err.strerror or err}", fix) from None


def check_readable_dir(path: Path, option: str) -> None:
    """Refuse a directory that exists but cannot be listed: a glob in it would see nothing and say it is empty."""
    try:
        os.listdir(path)
    except FileNotFoundError:
        return  # the caller says what a missing directory means
    except OSError as err:
        raise ConfigError(f"{option} {path} cannot be read: {err.strerror or err}",
                          f"make it readable by this user (chmod u+rx {path}), or pass another {option}") from None


@contextmanager
def removed_if_empty_on_error(path: Path) -> Iterator[None]:
    """Run the block; if it raises, remove ``path`` and the parents it creates, provided they did not exist
    before and hold no file — a command that fails at start (port in use, Ctrl-C before the first round) leaves
    no empty run directory behind. Directories holding any file are kept, whatever happened."""
    created = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        if created:  # the outermost directory the block created, with every empty directory under it
            _remove_empty_tree(created[-1])
        raise


def _remove_empty_tree(top: Path) -> None:
    if not top.is_dir() or top.is_symlink():
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -len(Path(entry[0]).parts)):
        with suppress(OSError):
            os.rmdir(dirpath)  # only ever succeeds on an empty directory

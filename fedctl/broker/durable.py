"""What the broker must not lose between checkpoints: the open round and the updates it has acknowledged.

An update is written here (atomically, fsynced) *before* its ``ack`` is sent, and the round's selection before
any model is handed out, so after a crash — ``kill -9`` at any moment — the restarted broker reopens the same
round with the same updates and nothing acknowledged is lost. When a round is committed (the checkpoint's
``state.json`` rename), its pending files are deleted; any left over from already-committed rounds are ignored
and removed at start. The journal (``journal.jsonl``) lists every applied update once; see
:meth:`fedctl.broker.store.Checkpointer.save`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack

from fedctl.broker.transfers import SpoolTensors
from fedctl.errors import ProtocolError
from fedctl.fsio import atomic_write
from fedctl.strategies.base import Update
from fedctl.wire import MSGPACK_ERRORS, decode, unpack_sparse
from fedctl.wire import constants as C

log = logging.getLogger(__name__)
PENDING_DIR = "pending"
ROUND_FILE = "round.json"


def _array_header(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")  # msgpack array 32


Entry = tuple[str, list[Any], str | None]
"""A stored push: worker, its frames as received, and for a chunked push the spool file holding its tensors."""


def _write_entries(fh: Any, entries: list[Entry]) -> None:
    """Write ``entries`` ([worker, frames] or [worker, frames, spool]) as the msgpack array that ``msgpack.packb``
    would give, but frame by frame: packing megabytes of frames into one buffer holds the GIL for tens of
    milliseconds (the event loop's heartbeats wait), while ``write`` releases it."""
    fh.write(_array_header(len(entries)))
    for worker, frames, spool in entries:
        fh.write(_array_header(2 if spool is None else 3) + msgpack.packb(worker, use_bin_type=True)
                 + _array_header(len(frames)))
        for frame in frames:
            fh.write(b"\xc6" + len(frame).to_bytes(4, "big"))  # msgpack bin 32, then the bytes themselves
            fh.write(frame)
        if spool is not None:
            fh.write(msgpack.packb(spool, use_bin_type=True))


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingStore:
    """Files under ``<state_dir>/pending``: the open round (sync) and each acknowledged, not yet applied update."""

    def __init__(self, state_dir: Path, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.shapes = dict(shapes or {})
        """The model's tensor shapes in order: to unpack packed sparse pushes (docs/protocol.md §4) and to read the
        spool files of chunked ones (§7.1)."""
        self.dir = Path(state_dir) / PENDING_DIR
        self._lock = threading.Lock()
        self._index: dict[str, set[tuple[str, int]]] = {}
        """Group file → the (worker, round) updates in it not yet committed or cleared."""
        self._spools: dict[tuple[str, int], Path] = {}
        """(worker, round) of a stored chunked push → its spool file, deleted with the push."""
        self._batches = 0
        self._token = secrets.token_hex(6)  # a restarted broker never reuses a name of the previous one

    # -- the open round --------------------------------------------------------------------------------------
    def save_round(self, round_no: int, selected: tuple[str, ...]) -> None:
        payload = json.dumps({"round": round_no, "selected": list(selected)}).encode()
        atomic_write(self.dir / ROUND_FILE, lambda fh: fh.write(payload))

    def load_round(self) -> tuple[int, tuple[str, ...]] | None:
        path = self.dir / ROUND_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return int(data["round"]), tuple(str(w) for w in data["selected"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring an unreadable %s (%s)", path, exc)
            return None

    # -- updates ---------------------------------------------------------------------------------------------
    def save_updates(self, batch: list[tuple[Update, list[bytes], Path | None]]) -> None:
        """Group commit of ``(update, push frames as received, spool file of a chunked push)``: the whole group in
        one file (``batch-<n>.push``: a msgpack array of [worker, frames] or [worker, header frame, spool name]),
        written to a temp file, fsynced and renamed, the directory fsynced — one write and one sync for the group
        instead of one per update. A file is deleted once every update in it is committed or cleared."""
        self.dir.mkdir(parents=True, exist_ok=True)
        entries: list[Entry] = []
        keys = set()
        spools = {}
        for update, frames, spool in batch:
            if spool is not None:  # a chunked push: its header, and its tensors' file
                _sync_file(spool)
                spools[(update.worker, update.round)] = spool
            entries.append((update.worker, list(frames), None if spool is None else spool.name))
            keys.add((update.worker, update.round))
        with self._lock:
            self._spools.update(spools)
            self._batches += 1
            name = f"batch-{self._token}-{self._batches:08d}.push"
            self._index[name] = keys
        atomic_write(self.dir / name, lambda fh: _write_entries(fh, entries))

    def _entries(self, path: Path) -> list[Entry]:
        raw = msgpack.unpackb(path.read_bytes(), raw=False)
        return [(entry[0], entry[1], entry[2] if len(entry) == 3 else None) for entry in raw]

    def load_updates(self) -> list[Update]:
        """Every readable pending update; unreadable files are logged and skipped."""
        out = []
        for path in sorted(self.dir.glob("batch-*.push")):
            keys = set()
            try:
                for worker, frames, spool in self._entries(path):
                    msg = decode(frames, C.WORKER_TO_BROKER)
                    if msg.type != C.PUSH or not isinstance(worker, str):
                        raise ValueError("not a push")
                    tensors: Mapping[str, Any]
                    if spool is not None:
                        spool_path = self.dir / Path(str(spool)).name
                        if not spool_path.is_file() or not self.shapes:
                            raise ValueError(f"chunked push without its spool file {spool}")
                        tensors = SpoolTensors(spool_path, self.shapes)
                        with self._lock:
                            self._spools[(worker, int(msg["round"]))] = spool_path
                    else:
                        tensors = unpack_sparse(msg.tensors, self.shapes) if self.shapes else dict(msg.tensors)
                    out.append(Update.from_push(worker, msg, tensors))
                    keys.add((worker, int(msg["round"])))
            except (OSError, ValueError, TypeError, ProtocolError, *MSGPACK_ERRORS) as exc:
                log.warning("ignoring an unreadable pending update file %s (%s)", path.name, exc)
            with self._lock:
                self._index[path.name] = keys
        return out

    def _forget(self, done: Callable[[str, int], bool]) -> None:
        """Drop the indexed updates for which ``done(worker, round)``; delete files left with none."""
        with self._lock:
            empty = []
            for name, keys in self._index.items():
                keys.difference_update({k for k in keys if done(*k)})
                if not keys:
                    empty.append(name)
            for name in empty:
                del self._index[name]
            spools = [self._spools.pop(k) for k in [k for k in self._spools if done(*k)]]
        for name in empty:
            (self.dir / name).unlink(missing_ok=True)
        for spool in spools:
            spool.unlink(missing_ok=True)

    def drop_orphan_spools(self) -> None:
        """Delete spool files no stored push refers to (chunked pushes cut off by a crash)."""
        with self._lock:
            kept = {p.name for p in self._spools.values()}
        for path in self.dir.glob("spool-*.f4") if self.dir.is_dir() else []:
            if path.name not in kept:
                path.unlink(missing_ok=True)

    def remove_many(self, keys: Iterable[tuple[str, int]]) -> None:
        """Forget the committed updates ``keys`` ((worker, round) pairs) in one pass over the index; files left
        with none are deleted."""
        gone = set(keys)
        self._forget(lambda w, r: (w, r) in gone)

    def forget_through(self, through_round: int) -> None:
        """Delete the updates of rounds ≤ ``through_round`` (committed), not the round file."""
        if self.dir.is_dir():
            self._forget(lambda w, r: r <= through_round)

    def clear(self, through_round: int | None = None) -> None:
        """Forget the round file and the updates of rounds ≤ ``through_round`` (all when None)."""
        if not self.dir.is_dir():
            return
        if through_round is None:
            for path in [*self.dir.glob("batch-*.push"), *self.dir.glob("spool-*.f4")]:
                path.unlink(missing_ok=True)
            with self._lock:
                self._index.clear()
                self._spools.clear()
        else:
            self._forget(lambda w, r: r <= through_round)
        opened = self.load_round()
        if opened is not None and (through_round is None or opened[0] <= through_round):
            (self.dir / ROUND_FILE).unlink(missing_ok=True)

"""What the broker core asks its shell to do: effects are plain data, carried out in order by the IO shell.

The core (:mod:`fedctl.broker.core`) never touches a socket, a file or the event loop; each of its calls returns a
list of these. The asyncio shell (:mod:`fedctl.broker.service`) performs them; the unit tests' in-memory harness
performs them in a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedctl.strategies.base import Update


@dataclass(frozen=True)
class Send:
    """Send ``frames`` (an encoded message of type ``type``) to the peer with routing ``identity``.

    ``worker`` is set for a model handed to a worker: when the peer is gone the shell tells the core
    (:meth:`~fedctl.broker.core.BrokerCore.unreachable`), which forgets the worker and any transfer to it.
    """

    identity: bytes
    frames: list[bytes]
    type: str
    worker: str | None = None


@dataclass(frozen=True)
class Persist:
    """Make an accepted update durable (``<state_dir>/pending``), then carry out ``then`` (its ``ack``).

    ``frames`` are the push as received (header and tensor frames; for a chunked push its header alone, the
    tensors being in ``spool``). Without durable updates the core sends the ack directly and emits no Persist.
    """

    update: Update
    frames: list[bytes]
    then: tuple[Send, ...] = ()
    spool: str | None = None


@dataclass(frozen=True)
class OpenTransfer:
    """Create the spool file ``name`` of ``nbytes`` (zeros) for a chunked push about to arrive."""

    name: str
    nbytes: int


@dataclass(frozen=True)
class WriteChunk:
    """Write each float32 array of ``pieces`` at its byte offset in spool file ``name``."""

    name: str
    pieces: list[tuple[int, np.ndarray]] = field(default_factory=list)


@dataclass(frozen=True)
class CloseTransfer:
    """The chunked push in spool file ``name`` is complete (keep the file) or abandoned (``delete`` it)."""

    name: str
    delete: bool


@dataclass(frozen=True)
class StartModelTransfer:
    """Send the current model to ``identity`` as the chunks of transfer ``xfer``, paced by its credits."""

    identity: bytes
    worker: str
    xfer: int


@dataclass(frozen=True)
class Wake:
    """Something the drivers wait for changed (a worker joined, pulled, pushed or left)."""


@dataclass(frozen=True)
class Credited:
    """A credit arrived for model transfer ``xfer`` to ``identity``: its sender may go on."""

    identity: bytes
    xfer: int


Effect = Send | Persist | OpenTransfer | WriteChunk | CloseTransfer | StartModelTransfer | Wake | Credited

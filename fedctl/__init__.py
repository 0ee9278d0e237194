"""fedctl: privacy-preserving federated learning over ZeroMQ (broker, workers, wire protocol, strategies).

``import fedctl`` is light: the Python API (docs/python-api.md) — ``fedctl.simulate``, ``fedctl.serve``,
``fedctl.serve_background``, ``fedctl.join``, ``fedctl.export``, ``fedctl.partition`` and their result types —
is imported on first use, and no deep-learning framework is imported before a run needs one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedctl.errors import (
    BackendUnavailable,
    ConfigError,
    DataError,
    FedctlError,
    ModelMismatch,
    ProtocolError,
    RemoteError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "BrokerHandle", "ConfigError", "DataError", "Exported", "FedctlError", "JoinResult",
           "ModelMismatch", "Participant", "Partition", "ProtocolError", "RemoteError", "Run", "Server", "Simulation",
           "TransportError", "WorkerHandle", "__version__", "export", "export_model", "join", "join_background",
           "partition", "serve", "serve_background", "simulate"]

_API = frozenset(__all__) - set(globals())
"""The names :mod:`fedctl.api` defines, imported on first use."""

if TYPE_CHECKING:
    from fedctl.api import (
        BrokerHandle,
        Exported,
        JoinResult,
        Participant,
        Partition,
        Run,
        Server,
        Simulation,
        WorkerHandle,
        export,
        export_model,
        join,
        join_background,
        partition,
        serve,
        serve_background,
        simulate,
    )


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (PEP 562), so ``import fedctl`` stays light."""
    if name in _API:
        value = getattr(importlib.import_module("fedctl.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

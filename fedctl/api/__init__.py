"""The Python API: what the ``fedctl`` commands do, as functions that return plain objects and raise fedctl's
exceptions (docs/python-api.md). The commands in :mod:`fedctl.cli` parse options and call these."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedctl.api.background import Background, BrokerHandle, WorkerHandle
    from fedctl.api.files import export, export_model, partition
    from fedctl.api.joining import Participant, join, join_background
    from fedctl.api.results import Exported, JoinResult, Partition, Run
    from fedctl.api.serving import Server, serve, serve_background
    from fedctl.api.simulation import Simulation, simulate

_HOME = {
    "Background": "background", "BrokerHandle": "background", "WorkerHandle": "background",
    "export": "files", "export_model": "files", "partition": "files",
    "Participant": "joining", "join": "joining", "join_background": "joining",
    "Exported": "results", "JoinResult": "results", "Partition": "results", "Run": "results",
    "Server": "serving", "serve": "serving", "serve_background": "serving",
    "Simulation": "simulation", "simulate": "simulation",
}
"""Where each name lives: imported on first use, so that ``fedctl serve`` does not load the simulator (and
``import fedctl.api`` stays cheap)."""


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'fedctl.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedctl.api.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Background",
    "BrokerHandle",
    "Exported",
    "JoinResult",
    "Participant",
    "Partition",
    "Run",
    "Server",
    "Simulation",
    "WorkerHandle",
    "export",
    "export_model",
    "join",
    "join_background",
    "partition",
    "serve",
    "serve_background",
    "simulate",
]

"""The Python API: what the ``fedctl`` commands do, as functions that return plain objects and raise fedctl's
exceptions (docs/python-api.md). The commands in :mod:`fedctl.cli` parse options and call these."""

from fedctl.api.background import Background, BrokerHandle, WorkerHandle
from fedctl.api.files import export, export_model, partition
from fedctl.api.joining import Participant, join, join_background
from fedctl.api.results import Exported, JoinResult, Partition, Run
from fedctl.api.serving import Server, serve, serve_background
from fedctl.api.simulation import Simulation, simulate

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

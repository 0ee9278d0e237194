"""A worker's own Prometheus metrics (``fedctl join --metrics-bind``, docs/observability.md): read from the live
:class:`~fedctl.worker.client.Worker` at scrape time, on its event loop. Nothing here reveals data: counts, times,
bytes and the norm of the worker's private compression residual, never a sample or a label."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fedctl.worker.client import Worker

PREFIX = "fedctl_worker_"


class WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Any]:
        w = self.worker
        conn = w.conn
        yield CounterMetricFamily(PREFIX + "rounds_trained", "Rounds whose update the broker acknowledged.",
                                  value=float(w.rounds_trained))
        yield GaugeMetricFamily(PREFIX + "connected", "1 while joined to the broker, else 0.",
                                value=1.0 if conn is not None and not conn.lost else 0.0)
        if w.state.model and w.state.version is not None:
            yield GaugeMetricFamily(PREFIX + "model_version", "Version of the global model this worker holds.",
                                    value=float(w.state.version))
        last = w.last_training
        if last is not None:
            yield GaugeMetricFamily(PREFIX + "last_round", "Round of the last local training.",
                                    value=float(last["round"]))
            yield GaugeMetricFamily(PREFIX + "train_seconds", "Wall time of the last local training.",
                                    value=float(last["seconds"]))
            if last["seconds"] > 0:
                yield GaugeMetricFamily(PREFIX + "samples_per_second",
                                        "Examples trained per second in the last local training (all epochs).",
                                        value=float(last["examples"]) / float(last["seconds"]))
        sent = w.bytes_out + (conn.bytes_out if conn is not None else 0)
        received = w.bytes_in + (conn.bytes_in if conn is not None else 0)
        yield CounterMetricFamily(PREFIX + "sent_bytes", "Bytes sent to the broker.", value=float(sent))
        yield CounterMetricFamily(PREFIX + "received_bytes", "Bytes received from the broker.",
                                  value=float(received))
        arrays = [np.asarray(v, dtype=np.float64) for v in w.state.strategy.values()]
        if arrays:  # DGC: the accumulated residual (and momentum) not yet sent
            norm = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in arrays))
            yield GaugeMetricFamily(PREFIX + "residual_norm", "L2 norm of the strategy's private state (DGC: the "
                                    "gradient residual not yet sent, with its momentum).", value=norm)


def worker_registry(worker: Worker) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(WorkerCollector(worker))
    return registry

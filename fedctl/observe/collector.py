"""The broker's Prometheus metrics (docs/observability.md), with the official ``prometheus_client`` library.

Most figures are read from the live broker when ``/metrics`` is scraped (a custom collector: nothing is counted
twice, and the broker's hot paths pay nothing between scrapes); the per-round distributions are histograms fed once
per round from the metrics record the driver writes to ``metrics.jsonl`` (:meth:`BrokerMetrics.observe_round`),
so a scrape and the file agree. Names follow Prometheus's conventions: base units in the name (``_seconds``,
``_bytes``), ``_total`` for counters, labels of low cardinality only (message type, error code).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fedctl.broker.service import Broker

ROUND_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PUSH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RTT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55)
PREFIX = "fedctl_"
STALE_HEARTBEATS = 3


def _gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
    """A gauge, left out while its value is unknown (no evaluation yet): absent rather than a made-up 0."""
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        yield GaugeMetricFamily(PREFIX + name, doc, value=float(value))


def _by_label(family: CounterMetricFamily, counts: Mapping[str, int]) -> CounterMetricFamily:
    for label, value in sorted(counts.items()):
        family.add_metric([label], float(value))
    return family


class BrokerCollector(Collector):
    """Reads a running :class:`~fedctl.broker.service.Broker` at scrape time (on the broker's event loop, where
    the aiohttp handler runs: no lock needed, the state is never half-updated between two awaits)."""

    def __init__(self, broker: Broker, last_round: dict[str, Any], per_worker: bool = False) -> None:
        self.broker = broker
        self.per_worker = per_worker
        """Also the ``fedctl_peer_*`` series, one per joined worker (``--metrics-per-worker``)."""
        self.last = last_round
        """The last round's metrics record (empty before the first)."""
        self.start_round = int(broker.core.state.get("round", 0))
        """The committed round the broker started from (a resumed run's), reported until a round is recorded."""

    def collect(self) -> Iterator[Any]:
        broker, core, last = self.broker, self.broker.core, self.last
        yield from _gauge("round", "Last completed round (sync) or model version (ssp/async), once its metrics "
                          "line is written.", last.get("round", self.start_round))
        yield from _gauge("model_version", "Version of the global model.", core.store.version)
        yield from _gauge("rounds_planned", "Rounds (or versions) the run was started for.", broker.config.rounds)
        yield from _gauge("test_accuracy", "Central evaluation of the global model: accuracy, last round evaluated.",
                          self._latest("test_accuracy"))
        yield from _gauge("test_loss", "Central evaluation of the global model: loss, last round evaluated.",
                          self._latest("test_loss"))
        yield from _gauge("fed_eval_accuracy", "Federated evaluation on the workers' held-out data: accuracy.",
                          self._latest("fed_eval_accuracy"))
        yield from _gauge("fed_eval_loss", "Federated evaluation on the workers' held-out data: loss.",
                          self._latest("fed_eval_loss"))
        yield from _gauge("train_loss", "Mean training loss the last round's updates reported.",
                          last.get("train_loss"))
        yield from _gauge("workers_connected", "Workers joined and alive.", len(core.registry))
        yield from _gauge("workers_waiting", "Joined workers with a pull waiting for work.",
                          len(core.registry.waiting()))
        now, quiet = broker.now(), STALE_HEARTBEATS * broker.config.heartbeat_interval_s
        yield from _gauge("workers_stale", f"Joined workers silent for more than {STALE_HEARTBEATS} heartbeat "
                          "intervals (--liveness drops them).",
                          sum(1 for r in core.registry.all() if now - r.last_seen > quiet))
        current = getattr(core.policy, "current", None)
        yield from _gauge("round_sampled_workers", "Workers sampled for the open round (sync; 0 between rounds).",
                          0 if current is None else len(current.selected))
        yield from _gauge("round_received_updates", "Updates received so far in the open round (sync).",
                          0 if current is None else len(current.received))
        clocks = getattr(core.policy, "clocks", None)
        if clocks:  # ssp/async: how far apart the workers' clocks are
            yield from _gauge("clock_spread", "Max minus min worker clock (ssp/async).",
                              max(clocks.values()) - min(clocks.values()))
        transfers = core.transfer_progress()
        yield from _gauge("inbound_transfers", "Chunked pushes being received.", transfers["inbound"])
        yield from _gauge("inbound_transfer_received_bytes", "Bytes received so far of the chunked pushes being "
                          "received.", transfers["inbound_bytes"])
        yield from _gauge("inbound_transfer_size_bytes", "Bytes in all of the chunked pushes being received.",
                          transfers["inbound_total_bytes"])
        yield from _gauge("outbound_transfers", "Chunked models being sent.", transfers["outbound"])
        counters = broker.transport.counters
        yield CounterMetricFamily(PREFIX + "received_bytes", "Payload bytes received (all messages).",
                                  value=float(counters.bytes_in))
        yield CounterMetricFamily(PREFIX + "sent_bytes", "Payload bytes sent (all messages).",
                                  value=float(counters.bytes_out))
        yield CounterMetricFamily(PREFIX + "received_messages", "Messages received.",
                                  value=float(counters.messages_in))
        yield _by_label(CounterMetricFamily(PREFIX + "received_message_bytes",
                                            "Payload bytes of decoded messages received, by message type.",
                                            labels=["type"]), core.bytes_in_by_type)
        yield _by_label(CounterMetricFamily(PREFIX + "sent_message_bytes",
                                            "Payload bytes sent, by message type.", labels=["type"]),
                        broker.bytes_out_by_type)
        yield _by_label(CounterMetricFamily(PREFIX + "refused_messages", "Messages refused, by error code name.",
                                            labels=["code"]), core.rejected)
        yield CounterMetricFamily(PREFIX + "applied_updates", "Updates applied to the model by this process.",
                                  value=float(core.applied_total))
        if core.dp is not None:
            yield from _gauge("dp_epsilon", "Differential privacy: ε spent so far (at the run's δ).",
                              core.dp.epsilon())
        if self.per_worker:
            yield from self._per_worker()

    def _per_worker(self) -> Iterator[Any]:
        """One series per joined worker, labelled ``worker`` (cardinality grows with the federation: only when
        asked for)."""
        core, now = self.broker.core, self.broker.now()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "updates": CounterMetricFamily(PREFIX + "peer_updates", "Updates accepted from this worker since its join.",
                                           labels=["worker"]),
            "bytes_in": CounterMetricFamily(PREFIX + "peer_received_bytes", "Payload bytes received from this worker "
                                            "since its join.", labels=["worker"]),
            "bytes_out": CounterMetricFamily(PREFIX + "peer_sent_bytes", "Payload bytes sent to this worker since its "
                                             "join.", labels=["worker"]),
            "silent": GaugeMetricFamily(PREFIX + "peer_silent_seconds", "Seconds since this worker's last message.",
                                        labels=["worker"]),
            "staleness": GaugeMetricFamily(PREFIX + "peer_update_staleness", "Staleness of this worker's last accepted "
                                           "update, in model versions.", labels=["worker"]),
            "rtt": GaugeMetricFamily(PREFIX + "peer_heartbeat_rtt_seconds", "This worker's last heartbeat round "
                                     "trip, as it measured it.", labels=["worker"]),
        }
        for r in core.registry.all():
            label = [r.worker]
            families["updates"].add_metric(label, float(r.updates))
            families["bytes_in"].add_metric(label, float(r.bytes_in))
            families["bytes_out"].add_metric(label, float(r.bytes_out))
            families["silent"].add_metric(label, max(now - r.last_seen, 0.0))
            if r.staleness is not None:
                families["staleness"].add_metric(label, float(r.staleness))
            if r.rtt_s is not None:
                families["rtt"].add_metric(label, r.rtt_s)
        yield from families.values()

    def _latest(self, key: str) -> float | None:
        value = self.last.get(key)
        if value is None:
            value = self.last.get("_latest", {}).get(key)
        return None if value is None else float(value)


class BrokerMetrics:
    """The registry ``/metrics`` serves: the live collector and the per-round histograms."""

    def __init__(self, broker: Broker, per_worker: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.last: dict[str, Any] = {}
        self.registry.register(BrokerCollector(broker, self.last, per_worker))
        self.round_seconds = Histogram(PREFIX + "round_duration_seconds", "Wall time of each round (or version).",
                                       buckets=ROUND_SECONDS_BUCKETS, registry=self.registry)
        self.staleness = Histogram(PREFIX + "update_staleness", "Staleness of each applied update, in model "
                                   "versions (ssp/async; 0 under sync).", buckets=STALENESS_BUCKETS,
                                   registry=self.registry)
        self.push_latency = Histogram(PREFIX + "push_latency_seconds", "From a model handed to a worker to its "
                                      "update accepted: training plus upload.", buckets=PUSH_SECONDS_BUCKETS,
                                      registry=self.registry)
        self.heartbeat_rtt = Histogram(PREFIX + "heartbeat_rtt_seconds", "Heartbeat round trips as the workers "
                                       "measured them (each heartbeat carries the previous one's).",
                                       buckets=RTT_SECONDS_BUCKETS, registry=self.registry)
        self._observers = {"push_latency_s": self.push_latency.observe, "heartbeat_rtt_s": self.heartbeat_rtt.observe}
        broker.core.observer = self.observe

    def observe(self, name: str, value: float) -> None:
        """One measurement from the broker's core (:attr:`~fedctl.broker.core.BrokerCore.observer`)."""
        observe = self._observers.get(name)
        if observe is not None:
            observe(value)

    def observe_round(self, record: Mapping[str, Any]) -> None:
        """One round's (or version's) metrics record, as written to metrics.jsonl."""
        latest = dict(self.last.get("_latest", {}))
        for key in ("test_accuracy", "test_loss", "fed_eval_accuracy", "fed_eval_loss"):
            if record.get(key) is not None:  # an evaluation skipped this round keeps the last one
                latest[key] = record[key]
        self.last.clear()
        self.last.update(record)
        self.last["_latest"] = latest
        if record.get("duration_s") is not None:
            self.round_seconds.observe(float(record["duration_s"]))
        for tau in record.get("staleness") or [0] * int(record.get("participants") or 0):
            self.staleness.observe(float(tau))

"""Prometheus metrics of one node.

Owns the node's `CollectorRegistry` (never the process-global one, so tests can build many nodes in
one process) and the metric objects every service updates. Does not serve them: `node.py` mounts
`/metrics` on the peer port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class StatSample:
    """One value read from a service's own counters at scrape time (see `Metrics.observe`)."""

    name: str
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    # "counter" (only grows) or "gauge".
    kind: str = "counter"


class _StatsCollector(Collector):
    """Turns a service's counters (plain dataclass fields it keeps itself) into metrics when
    `/metrics` is read, so the service needs no Prometheus objects on its hot path."""

    def __init__(self, read: Callable[[], Iterable[StatSample]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for sample in self._read():
            family = families.get(sample.name)
            if family is None:
                kind = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                family = families[sample.name] = kind(
                    sample.name, sample.help, labels=sorted(sample.labels)
                )
            family.add_metric([sample.labels[key] for key in sorted(sample.labels)], sample.value)
        yield from families.values()


class Metrics:
    """The metric objects of one node; services get this in their constructor."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "d7y_proxy_requests", "Mirror requests by route and status", ["route", "status"],
            registry=r,
        )
        self.origin_bytes = Counter(
            "d7y_origin_bytes", "Bytes downloaded from origin registries", registry=r
        )
        self.cache_bytes = Counter(
            "d7y_cache_served_bytes", "Bytes served to clients from the local piece store",
            registry=r,
        )
        self.served_bytes = Counter(
            "d7y_served_bytes", "Bytes served to clients in all", registry=r
        )
        self.active_tasks = Gauge("d7y_active_tasks", "Downloads in progress", registry=r)
        self.store_bytes = Gauge("d7y_store_bytes", "Bytes held by the piece store", registry=r)
        self.store_tasks = Gauge("d7y_store_tasks", "Tasks held by the piece store", registry=r)
        self.gc_evictions = Counter(
            "d7y_gc_evictions", "Tasks evicted by garbage collection", ["reason"], registry=r
        )
        self.gc_evicted_bytes = Counter(
            "d7y_gc_evicted_bytes", "Bytes freed by garbage collection", registry=r
        )
        self.digest_mismatches = Counter(
            "d7y_digest_mismatches", "Tasks whose content did not match its digest", registry=r
        )
        self.piece_digest_failures = Counter(
            "d7y_piece_digest_failures", "Pieces dropped because their xxh3 did not match",
            registry=r,
        )
        self.task_failures = Counter(
            "d7y_task_failures", "Downloads that failed", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "d7y_upstream_errors", "Origin requests that failed", ["kind"], registry=r
        )

    def observe(self, read: Callable[[], Iterable[StatSample]]) -> None:
        """Export what `read()` returns at every scrape (gossip, peer and cluster counters).
        Samples of one name must all carry the same label keys."""
        self.registry.register(_StatsCollector(read))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

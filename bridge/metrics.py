"""The daemon's Prometheus metrics: one registry per daemon, served at ``/metrics``.

Counters and histograms are counted where things happen (the web guard, the bus, the router, the
runner: one short call each); the gauges that describe Redis (stream length, lag and pending per
group, dead letters, live instances, lease holders) are set from a status snapshot
(``bridge.status.gauge``) just before a scrape is rendered. Every family has its labels declared
once here, so a daemon with many sinks shows one family with one series per sink (never a family per
sink).

Names (all prefixed ``wechat_bridge_``; counters end in ``_total`` in the exposition):

==========================================  ===================  ======================================
family                                      labels               what
==========================================  ===================  ======================================
``received_total``                          adapter              requests an inbound route received
``refused_total``                           event, source, rsn   refused (``bridge.refusals``: why, where)
``published_total``                         adapter              envelopes stored on the inbound stream
``deduplicated_total``                      adapter              envelopes dropped as already seen
``routed_total``                            sink                 deliveries the router wrote
``delivered_total``                         sink                 deliveries sent
``retried_total``                           sink                 sends that failed and will be retried
``dead_lettered_total``                     adapter              dead letters written (sink or router)
``duplicate_skipped_total``                 sink                 deliveries found already sent
``send_seconds``                            sink                 histogram: one sink.send call
``end_to_end_seconds``                      sink                 histogram: received → sent
``rate_limit_wait_seconds_total``           sink                 time spent waiting on rate limits
``task_crashes_total``                      task                 supervised tasks that crashed
``stream_length``                           stream               XLEN (inbound, out:<sink>, dead)
``stream_lag``                              stream, group        entries not yet read by the group
``stream_pending``                          stream, group        entries read and not acknowledged
``dead_letters``                            —                    entries in the dead-letter stream
``instances_live``                          —                    instances with a live heartbeat
``lease_held``                              lease                1 while this instance holds it
``lease_has_holder``                        lease                1 while any instance holds it
``redis_up``                                —                    1 when Redis answered the scrape
==========================================  ===================  ======================================
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bridge import refusals

if TYPE_CHECKING:
    from bridge.envelope import Delivery

#: seconds: from a fast local sink to a slow platform API with retries behind it
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Refusals(Collector):
    """``refused_total`` from :mod:`bridge.refusals` (counted per process, by whoever refuses)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "wechat_bridge_refused", "Requests and connections refused", labels=["event", "source", "reason"]
        )
        for (event, source, reason), n in sorted(refusals.counts().items()):
            fam.add_metric([event, source, reason], n)
        yield fam


class Metrics:
    """The families of one daemon (its own registry, so two daemons in one process never mix)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(f"wechat_bridge_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"wechat_bridge_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: Sequence[str]) -> Histogram:
            return Histogram(f"wechat_bridge_{name}", doc, labels, buckets=LATENCY_BUCKETS, registry=r)

        self.received = counter("received", "Requests an inbound route received", ["adapter"])
        r.register(_Refusals())
        self.published = counter("published", "Envelopes stored on the inbound stream", ["adapter"])
        self.deduplicated = counter("deduplicated", "Envelopes dropped as already seen", ["adapter"])
        self.routed = counter("routed", "Deliveries the router wrote to a sink's stream", ["sink"])
        self.delivered = counter("delivered", "Deliveries a sink sent", ["sink"])
        self.retried = counter("retried", "Sends that failed and will be retried", ["sink"])
        self.dead_lettered = counter("dead_lettered", "Dead letters written", ["adapter"])
        self.duplicate_skipped = counter("duplicate_skipped", "Deliveries found already sent", ["sink"])
        self.send_seconds = histogram("send_seconds", "Duration of one sink send call", ["sink"])
        self.end_to_end_seconds = histogram(
            "end_to_end_seconds", "From the inbound receiving a message to its delivery sent", ["sink"]
        )
        self.rate_limit_wait = counter(
            "rate_limit_wait_seconds", "Seconds deliveries waited on rate limits", ["sink"]
        )
        self.task_crashes = counter("task_crashes", "Supervised tasks that crashed", ["task"])
        self.stream_length = gauge("stream_length", "Entries in a stream", ["stream"])
        self.stream_lag = gauge("stream_lag", "Entries not yet read by a consumer group", ["stream", "group"])
        self.stream_pending = gauge(
            "stream_pending", "Entries a consumer group read and did not acknowledge", ["stream", "group"]
        )
        self.dead_letters = gauge("dead_letters", "Entries in the dead-letter stream")
        self.instances_live = gauge("instances_live", "Instances with a live heartbeat")
        self.lease_held = gauge("lease_held", "1 while this instance holds the lease", ["lease"])
        self.lease_has_holder = gauge("lease_has_holder", "1 while any instance holds the lease", ["lease"])
        self.redis_up = gauge("redis_up", "1 when Redis answered the last scrape")

    # -- counting hooks: one call where a thing happens ----------------------------------------------

    def count_routed(self, deliveries: Iterable[Delivery]) -> None:
        by_sink: dict[str, int] = {}
        for d in deliveries:
            by_sink[d.sink] = by_sink.get(d.sink, 0) + 1
        for sink, n in by_sink.items():
            self.routed.labels(sink).inc(n)

    def count_sent(self, sink: str, d: Delivery, started: float, seconds: float) -> None:
        """One delivery sent: ``seconds`` the send took, ``started`` its wall-clock start."""
        self.delivered.labels(sink).inc()
        self.send_seconds.labels(sink).observe(seconds)
        received = d.envelope.received_at or d.envelope.created_at
        if received > 0:
            self.end_to_end_seconds.labels(sink).observe(max(0.0, started + seconds - received))

    @staticmethod
    def now() -> float:
        return time.time()

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)


#: where counts go when nobody reads them (a runner or router built without a daemon, in tests)
DISCARD = Metrics()

"""Prometheus metrics, and the /healthz and /livez endpoints, as kube-proxy serves them.

Metric names are kube-proxy's (pkg/proxy/metrics) wherever the meaning matches, so
existing dashboards and alerts keep working: ``kubeproxy_sync_proxy_rules_duration_seconds``
(and its ``full``/``partial`` variants), ``kubeproxy_network_programming_duration_seconds``,
the last (queued) timestamps, the service/endpoint change counters and gauges, and
``kubeproxy_sync_proxy_rules_no_local_endpoints_total``. kpr's own metrics are prefixed
``kpr_``: the active datapath, map fill ratios, BPF packet and drop counters, faults.

Values that already live elsewhere (tracker counters, BPF counters) are read at scrape
time by a custom collector rather than copied on every event.

Health follows kube-proxy's ProxyHealthServer: the proxy is unhealthy when a change
has been queued for longer than ``2 x syncPeriod`` without a sync completing.
``/healthz`` additionally fails while the Node is being deleted (deletionTimestamp, or
the cluster autoscaler's ToBeDeletedByClusterAutoscaler taint), so external load
balancers drain the node; ``/livez`` ignores the Node, so the kubelet does not
restart a healthy proxy on a draining node.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.datapaths.base import SyncResult
from controller.tracker import ChangeTracker

log = logging.getLogger(__name__)

SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
"""kube-proxy: ExponentialBuckets(1ms, 2, 15)."""
PROGRAMMING_BUCKETS = tuple(
    [0.25, 0.5] + list(range(1, 60)) + list(range(60, 120, 5)) + list(range(120, 330, 30)))
"""kube-proxy: 0.25 s and 0.5 s, then 1 s steps to 59 s, 5 s steps to 115 s, 30 s
steps to 5 min."""


class ProxyHealth:
    """kube-proxy's ProxyHealthServer state (one family), with an injectable clock."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self.last_updated = 0.0
        self.oldest_queued: float | None = None
        self.node_eligible = True

    def queued(self) -> None:
        """A change was queued for the proxier."""
        with self._lock:
            if self.oldest_queued is None:
                self.oldest_queued = self.clock()

    def updated(self) -> None:
        """A sync completed: everything queued so far is programmed."""
        with self._lock:
            self.oldest_queued = None
            self.last_updated = self.clock()

    def set_node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self.node_eligible = eligible

    def healthy(self) -> tuple[bool, float]:
        """(healthy, lastUpdated): unhealthy only when a queued change is late."""
        with self._lock:
            if self.oldest_queued is not None and \
                    self.clock() - self.oldest_queued >= self.timeout:
                return False, self.last_updated
            return True, self.last_updated


class Metrics:
    """The registry, plus the observer methods the sync loop and the source call."""

    def __init__(self, tracker: ChangeTracker, datapath: Any,
                 health: ProxyHealth | None = None) -> None:
        self.tracker = tracker
        self.datapath = datapath
        self.health = health
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS, registry=r)
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs", buckets=SYNC_BUCKETS,
            registry=r)
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", buckets=SYNC_BUCKETS,
            registry=r)
        self.programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds", buckets=PROGRAMMING_BUCKETS,
            registry=r)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced", registry=r)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", registry=r)
        self.healthz = Counter("kubeproxy_healthz", "Cumulative proxy healthz HTTP status",
                               ["code"], registry=r)
        self.livez = Counter("kubeproxy_livez", "Cumulative proxy livez HTTP status",
                             ["code"], registry=r)
        self.sync_failures = Counter("kpr_sync_failures", "Datapath syncs that failed "
                                     "(the next sync is a full one)", ["datapath"], registry=r)
        self.sync_ops = Counter("kpr_sync_kernel_ops", "Kernel operations done by syncs",
                                ["datapath"], registry=r)
        self.source_errors = Counter("kpr_source_errors", "Errors talking to the source "
                                     "(retried with backoff)", ["resource", "reason"],
                                     registry=r)
        self.relists = Counter("kpr_source_relists", "Relists of a resource",
                               ["resource", "reason"], registry=r)
        self.invalid = Counter("kpr_invalid_objects", "Objects rejected by validation "
                               "(their last valid version stays programmed)", ["kind"],
                               registry=r)
        self.hc_errors = Counter("kpr_healthcheck_listen_errors", "healthCheckNodePorts kpr "
                                 "could not listen on (retried at the next full sync)",
                                 registry=r)
        r.register(_ScrapeCollector(self))

    # ----- SyncObserver -----------------------------------------------------------------

    def synced(self, full: bool, duration: float, result: SyncResult | None,
               trigger_times: tuple[float, ...]) -> None:
        now = time.time()
        self.sync_duration.observe(duration)
        (self.full_sync_duration if full else self.partial_sync_duration).observe(duration)
        self.last_sync.set(now)
        if result is not None:
            self.sync_ops.labels(self.datapath.name).inc(result.ops)
        for t in trigger_times:
            self.programming.observe(max(0.0, now - t))
        if self.health:
            self.health.updated()

    def failed(self, error: Exception) -> None:
        self.sync_failures.labels(self.datapath.name).inc()

    def queued(self) -> None:
        """A change was queued (call on every change a source reports)."""
        self.last_queued.set(time.time())
        if self.health:
            self.health.queued()

    # ----- SourceObserver ---------------------------------------------------------------

    def source_error(self, resource: str, reason: str) -> None:
        self.source_errors.labels(resource, reason).inc()

    def relist(self, resource: str, reason: str) -> None:
        self.relists.labels(resource, reason).inc()

    def invalid_object(self, kind: str) -> None:
        self.invalid.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapeCollector(Collector):
    """Values read at scrape time."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Any:
        t = self.m.tracker
        c = t.counters
        svc_pending, ep_pending = t.pending()
        yield GaugeMetricFamily("kubeproxy_sync_proxy_rules_service_changes_pending",
                                "Pending proxy rules Service changes", value=svc_pending)
        yield CounterMetricFamily("kubeproxy_sync_proxy_rules_service_changes",
                                  "Cumulative proxy rules Service changes",
                                  value=c.service_changes_total)
        yield GaugeMetricFamily("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                "Pending proxy rules Endpoint changes", value=ep_pending)
        yield CounterMetricFamily("kubeproxy_sync_proxy_rules_endpoint_changes",
                                  "Cumulative proxy rules Endpoint changes",
                                  value=c.endpoint_changes_total)
        g = GaugeMetricFamily("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                              "Number of services with a Local traffic policy and no "
                              "endpoints", labels=["traffic_policy"])
        g.add_metric(["internal"], c.no_local_internal)
        g.add_metric(["external"], c.no_local_external)
        yield g
        dp = self.m.datapath
        info = GaugeMetricFamily("kpr_datapath_info", "The active datapath",
                                 labels=["datapath"])
        info.add_metric([dp.name], 1)
        yield info
        services, slices = t.counts()
        yield GaugeMetricFamily("kpr_services", "Services known to kpr", value=services)
        yield GaugeMetricFamily("kpr_endpoint_slices", "EndpointSlices known to kpr",
                                value=slices)
        fill = getattr(dp, "map_fill", None)
        if fill is not None:
            try:
                g = GaugeMetricFamily("kpr_bpf_map_fill_ratio",
                                      "Entries / capacity of each BPF map kpr writes",
                                      labels=["map"])
                for name, ratio in sorted(fill().items()):
                    g.add_metric([name], ratio)
                yield g
                stats = dp.stats()
                drops = CounterMetricFamily("kpr_bpf_drops", "Packets the BPF programs "
                                            "dropped, by reason", labels=["reason"])
                pkts = CounterMetricFamily("kpr_bpf_events", "BPF datapath counters "
                                           "(packets seen, NAT done, flows)", labels=["event"])
                for name, value in stats.items():
                    if name.startswith("drop_"):
                        drops.add_metric([name[5:]], value)
                    else:
                        pkts.add_metric([name], value)
                yield drops
                yield pkts
            except Exception as e:  # noqa: BLE001 - a scrape must not fail on this
                log.warning("reading BPF maps for metrics failed: %s", e)
        unprog = getattr(dp, "unprogrammed", None)
        if unprog is not None:
            g = GaugeMetricFamily("kpr_frontends_unprogrammed", "Frontends the datapath "
                                  "does not program, by reason", labels=["reason"])
            counts: dict[str, int] = {}
            for reason in list(unprog.values()):
                counts[reason] = counts.get(reason, 0) + 1
            for reason, n in sorted(counts.items()):
                g.add_metric([reason], n)
            yield g


# ----- HTTP servers -----------------------------------------------------------------------

def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _health_body(health: ProxyHealth, with_node: bool) -> tuple[int, bytes]:
    ok, last = health.healthy()
    now = health.clock()
    eligible = health.node_eligible
    if with_node:
        ok = ok and eligible
    if ok:
        # kube-proxy reports "now" as lastUpdated when healthy (compatibility with
        # releases where it was the time of the last sync loop run).
        last = now
    body: dict[str, Any] = {"lastUpdated": _iso(last), "currentTime": _iso(now)}
    if with_node:
        body["nodeEligible"] = eligible
    return (200 if ok else 503), json.dumps(body).encode()


class HttpServer:
    """A small threaded HTTP server on one address, running in a daemon thread."""

    def __init__(self, addr: tuple[str, int], routes: dict[str, Callable[[], tuple[
            int, str, bytes]]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    code, ctype, body = 404, "text/plain", b"not found\n"
                else:
                    code, ctype, body = route()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        family_v6 = ":" in addr[0]
        cls = _V6Server if family_v6 else ThreadingHTTPServer
        self.httpd = cls(addr, Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.2}, daemon=True,
                                       name=f"kpr-http-{addr[1]}")
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _V6Server(ThreadingHTTPServer):
    import socket as _socket

    address_family = _socket.AF_INET6


def metrics_server(addr: tuple[str, int], metrics: Metrics) -> HttpServer:
    return HttpServer(addr, {
        "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        "/healthz": lambda: (200, "text/plain", b"ok"),
    })


def health_server(addr: tuple[str, int], health: ProxyHealth, metrics: Metrics) -> HttpServer:
    def healthz() -> tuple[int, str, bytes]:
        code, body = _health_body(health, with_node=True)
        metrics.healthz.labels(str(code)).inc()
        return code, "application/json", body

    def livez() -> tuple[int, str, bytes]:
        code, body = _health_body(health, with_node=False)
        metrics.livez.labels(str(code)).inc()
        return code, "application/json", body

    return HttpServer(addr, {"/healthz": healthz, "/livez": livez})

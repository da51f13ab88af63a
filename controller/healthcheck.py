"""healthCheckNodePort servers, as kube-proxy's service health server.

A LoadBalancer Service with externalTrafficPolicy Local gets a
``spec.healthCheckNodePort``; the cloud load balancer probes it on every node and
sends traffic only to nodes that answer 200, i.e. that have a local endpoint. For
each such port kpr listens and answers any path with kube-proxy's response:

    200 (local endpoints > 0 and the proxy healthy) or 503
    Content-Type: application/json
    X-Load-Balancing-Endpoint-Weight: <local endpoints>
    {"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 2,
     "serviceProxyHealthy": true}

Servers are opened and closed as Services come and go; the sync loop feeds the
servers the diff of each sync (the whole State on full syncs), so the work is
proportional to what changed.

Each port listens on both families with one socket (``::`` with IPV6_V6ONLY off),
so load balancers probing a node's IPv4 or IPv6 address both get an answer; a node
without IPv6 falls back to IPv4 only.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from controller.model import Diff, Frontend, FrontendKind, ServiceEntry, State

log = logging.getLogger(__name__)


class _DualStackServer(ThreadingHTTPServer):
    """An HTTP server on an IPv6 socket that also accepts IPv4 (as ::ffff:a.b.c.d)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _server(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    if host != "::":
        return ThreadingHTTPServer((host, port), handler)
    try:
        return _DualStackServer((host, port), handler)
    except OSError as e:
        if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        return ThreadingHTTPServer(("0.0.0.0", port), handler)  # IPv6 disabled


class _Port:
    """One listening port and the Service it reports on."""

    def __init__(self, host: str, port: int, owner: HealthCheckServers) -> None:
        self.service = ("", "")
        self.local = 0
        me = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                healthy = owner.proxy_healthy()
                count = me.local
                body = json.dumps({"service": {"namespace": me.service[0],
                                               "name": me.service[1]},
                                   "localEndpoints": count,
                                   "serviceProxyHealthy": healthy}).encode()
                self.send_response(200 if count > 0 and healthy else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Load-Balancing-Endpoint-Weight", str(count))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = _server(host, port, Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True, name=f"kpr-hc-{port}").start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HealthCheckServers:
    """The set of healthCheckNodePort listeners, kept in step with the State."""

    def __init__(self, host: str = "::",
                 proxy_healthy: Callable[[], bool] = lambda: True,
                 on_error: Callable[[int, OSError], None] | None = None) -> None:
        self.host = host
        self.proxy_healthy = proxy_healthy
        self.on_error = on_error or (lambda port, e: None)
        self._lock = threading.Lock()
        self._by_frontend: dict[Frontend, tuple[int, tuple[str, str], int]] = {}
        self._ports: dict[int, _Port] = {}

    @staticmethod
    def _want(e: ServiceEntry) -> tuple[int, tuple[str, str], int] | None:
        if not e.health_check_node_port or e.kind not in (FrontendKind.LOAD_BALANCER,
                                                          FrontendKind.NODE_PORT):
            return None
        ns, _, rest = e.name.partition("/")
        return e.health_check_node_port, (ns, rest.split(":", 1)[0]), len(e.backends)

    def update(self, diff: Diff | None, state: State) -> None:
        """Apply one sync's changes (diff None: a full sync of ``state``)."""
        with self._lock:
            if diff is None:
                self._by_frontend = {}
                entries: list[ServiceEntry] = list(state.values())
                removed: tuple[Frontend, ...] = ()
            else:
                entries, removed = list(diff.upserted), diff.removed
            touched: set[int] = set()
            for f in removed:
                old = self._by_frontend.pop(f, None)
                if old:
                    touched.add(old[0])
            for e in entries:
                old = self._by_frontend.pop(e.frontend, None)
                if old:
                    touched.add(old[0])
                want = self._want(e)
                if want:
                    self._by_frontend[e.frontend] = want
                    touched.add(want[0])
            if diff is None:
                touched |= set(self._ports)
            self._reconcile(touched)

    def _reconcile(self, ports: set[int]) -> None:
        current: dict[int, tuple[tuple[str, str], int]] = {}
        for port, svc, count in self._by_frontend.values():
            if port in ports:
                # a Service's LB and NodePort frontends agree; take the larger count
                prev = current.get(port)
                current[port] = (svc, max(count, prev[1] if prev else 0))
        for port in ports:
            want = current.get(port)
            srv = self._ports.get(port)
            if want is None:
                if srv is not None:
                    srv.close()
                    del self._ports[port]
                    log.info("healthCheckNodePort %d closed", port)
                continue
            if srv is None:
                try:
                    srv = _Port(self.host, port, self)
                except OSError as e:
                    log.error("cannot listen on healthCheckNodePort %d for %s/%s: %s", port,
                              want[0][0], want[0][1], e)
                    self.on_error(port, e)
                    continue
                self._ports[port] = srv
                log.info("healthCheckNodePort %d open for %s/%s", port, *want[0])
            srv.service, srv.local = want

    def ports(self) -> dict[int, int]:
        """Open port -> local endpoint count."""
        with self._lock:
            return {p: s.local for p, s in self._ports.items()}

    def close(self) -> None:
        with self._lock:
            for srv in self._ports.values():
                srv.close()
            self._ports.clear()

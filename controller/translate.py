"""Kubernetes objects -> model entries, with the proxy's node-local semantics.

One Service plus its EndpointSlices become one :class:`ServiceEntry` per (cluster IP,
service port). Semantics follow kube-proxy (pkg/proxy/topology.go,
CategorizeEndpoints) for what is implemented so far:

* ExternalName and headless Services are not proxied; neither is a Service that
  carries the ``service.kubernetes.io/service-proxy-name`` label, unless kpr was
  given that proxy name (then only those are proxied).
* An endpoint is used for new flows when it is ready. When a Service has no ready
  endpoint at all, its serving-and-terminating endpoints are used instead, so that
  a rolling restart of the last pod does not blackhole its clients.
* An endpoint port is matched to a service port by name and protocol; each family of
  cluster IP takes endpoints from the slices of the same address family.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controller.model import Backend, BackendFlag, Frontend, ServiceEntry
from controller.objects import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    Endpoint,
    EndpointSlice,
    Service,
)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The node kpr runs on, as far as translation needs it."""

    name: str = ""
    """Node name (``--hostname-override``); marks endpoints local."""
    proxy_name: str = ""
    """The value of service.kubernetes.io/service-proxy-name that kpr serves; "" serves
    only Services without that label, as kube-proxy does."""


def should_proxy(svc: Service, node: NodeInfo) -> bool:
    """Whether this Service is kpr's to program at all."""
    if svc.type == "ExternalName" or svc.headless:
        return False
    if HEADLESS_LABEL in svc.labels:
        return False
    return svc.labels.get(SERVICE_PROXY_NAME_LABEL, "") == node.proxy_name


def _usable(endpoints: list[tuple[Endpoint, Backend]]) -> list[Backend]:
    ready = [b for e, b in endpoints if e.conditions.ready]
    if ready:
        return ready
    return [b for e, b in endpoints if e.conditions.serving and e.conditions.terminating]


def translate_service(svc: Service, slices: Iterable[EndpointSlice],
                      node: NodeInfo) -> tuple[ServiceEntry, ...]:
    """All entries of one Service, in canonical order."""
    if not should_proxy(svc, node):
        return ()
    slices = [s for s in slices if s.address_type in ("IPv4", "IPv6")]
    entries: list[ServiceEntry] = []
    for sp in svc.ports:
        name = f"{svc.key}:{sp.name}" if sp.name else str(svc.key)
        for ip in svc.cluster_ips:
            family = "IPv4" if ip.version == 4 else "IPv6"
            candidates: list[tuple[Endpoint, Backend]] = []
            for sl in slices:
                if sl.address_type != family:
                    continue
                port = next((p.port for p in sl.ports
                             if p.name == sp.name and p.protocol == sp.protocol), None)
                if port is None:
                    continue
                for ep in sl.endpoints:
                    flags = BackendFlag.NONE
                    if node.name and ep.node_name == node.name:
                        flags |= BackendFlag.LOCAL
                    if ep.conditions.terminating:
                        flags |= BackendFlag.TERMINATING
                    candidates.append((ep, Backend(ep.addresses[0], port, flags)))
            entries.append(ServiceEntry.make(Frontend(ip, sp.port, sp.protocol),
                                             _usable(candidates), name))
    return tuple(sorted(entries, key=lambda e: e.frontend))

"""Typed, validated views of the Kubernetes objects kpr consumes.

Sources hand over plain dicts exactly as the API server (or ``kubectl get -o json``)
prints them. :func:`parse_service` and :func:`parse_slice` turn one dict into a frozen
dataclass or raise :class:`ObjectError`, whose message names the object and the field
path (``Service default/web: spec.ports[1].port: ...``). Validation is per object: a bad
object is reported and skipped, every other object is still programmed.

Only the fields the proxy uses are read; unknown fields are ignored, as the API
server's clients do.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.model import Interner, IPAddress, IPNetwork, Protocol

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""EndpointSlice label naming the Service it belongs to."""
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
LB_ALGORITHM_ANNOTATION = "kpr.dev/lb-algorithm"
"""Per-Service load-balancing algorithm: ``random`` or ``maglev``."""
"""Service label that hands the Service to another proxy (kube-proxy skips these)."""
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
"""When the change that produced this EndpointSlice version happened (RFC 3339); the
start of kubeproxy_network_programming_duration_seconds."""
ZONE_LABEL = "topology.kubernetes.io/zone"
"""Node label naming the node's zone (topology hints)."""
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
"""Taint the cluster autoscaler sets on a node it is about to delete; kube-proxy's
/healthz then fails so load balancers drain the node."""
DEFAULT_AFFINITY_TIMEOUT = 10800
"""sessionAffinityConfig.clientIP.timeoutSeconds when unset (API default, 3 h)."""


_PROTOCOLS = {p.name: p for p in Protocol}


class ObjectError(ValueError):
    """A Kubernetes object that cannot be used, with the object and field named."""

    def __init__(self, kind: str, ref: str, path: str, message: str) -> None:
        self.kind = kind
        self.ref = ref
        self.path = path
        self.message = message
        super().__init__(f"{kind} {ref}: {path}: {message}")


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """Namespace and name of an object."""

    namespace: str
    """metadata.namespace ("default" when absent, as kubectl does)."""
    name: str
    """metadata.name."""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of spec.ports."""

    name: str
    """Port name; "" for a single unnamed port."""
    port: int
    """The service port."""
    protocol: Protocol
    """TCP (default), UDP or SCTP."""
    node_port: int
    """spec.ports[].nodePort, 0 when unset."""


@dataclass(frozen=True, slots=True)
class Service:
    """A v1/Service, reduced to what the proxy needs."""

    key: ObjectKey
    """Namespace and name."""
    type: str
    """spec.type: ClusterIP, NodePort, LoadBalancer or ExternalName."""
    cluster_ips: tuple[IPAddress, ...]
    """spec.clusterIPs (or the single spec.clusterIP); empty for headless."""
    ports: tuple[ServicePort, ...]
    """spec.ports."""
    labels: Mapping[str, str]
    """metadata.labels."""
    external_ips: tuple[IPAddress, ...] = ()
    """spec.externalIPs."""
    lb_ips: tuple[IPAddress, ...] = ()
    """status.loadBalancer.ingress[].ip whose ipMode is VIP (the default); ipMode
    Proxy addresses are the load balancer's own and are not bound, as in kube-proxy."""
    affinity_timeout: int = 0
    """sessionAffinity ClientIP: its timeoutSeconds; 0 when affinity is None."""
    external_policy_local: bool = False
    """spec.externalTrafficPolicy is Local (and the Service accepts external traffic)."""
    internal_policy_local: bool = False
    """spec.internalTrafficPolicy is Local."""
    lb_source_ranges: tuple[IPNetwork, ...] = ()
    """spec.loadBalancerSourceRanges."""
    health_check_node_port: int = 0
    """spec.healthCheckNodePort, 0 when unset."""
    traffic_distribution: str = ""
    """spec.trafficDistribution: "", PreferClose, PreferSameZone or PreferSameNode."""
    lb_algorithm: str = ""
    """Annotation kpr.dev/lb-algorithm: "random", "maglev", or "" (the default)."""

    @property
    def headless(self) -> bool:
        return not self.cluster_ips

    @property
    def externally_accessible(self) -> bool:
        """kube-proxy's ExternallyAccessible: NodePort/LoadBalancer, or externalIPs."""
        return self.type in ("NodePort", "LoadBalancer") or bool(self.external_ips)


@dataclass(frozen=True, slots=True)
class EndpointConditions:
    """endpoints[].conditions, with the API's defaults for unset fields applied."""

    ready: bool
    """Unset means ready (API contract)."""
    serving: bool
    """Unset means the same as ready."""
    terminating: bool
    """Unset means not terminating."""


@dataclass(frozen=True, slots=True)
class EndpointFacts:
    """What an endpoint shares with many others: its conditions, zone and hints.
    One instance per distinct combination (see ``Endpoint.make``)."""

    conditions: EndpointConditions
    """Readiness facts."""
    zone: str
    """endpoints[].zone, "" when unset."""
    zone_hints: frozenset[str]
    """endpoints[].hints.forZones[].name: zones this endpoint should serve."""
    node_hints: frozenset[str]
    """endpoints[].hints.forNodes[].name: nodes this endpoint should serve."""


_shared_facts: Interner[EndpointFacts] = Interner()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One entry of endpoints[] of an EndpointSlice.

    Three fields, the rest shared in ``facts``: an endpoint is the most numerous
    object kpr holds (200,000 at 50,000 Services), and six fields were 80 B each
    where three are 56."""

    address: IPAddress | None
    """endpoints[].addresses[0]; None in an FQDN slice. All the addresses are
    validated, but kube-proxy uses only the first (the API calls them fungible),
    and a tuple per endpoint was 9 MB at 200,000 endpoints."""
    node_name: str
    """endpoints[].nodeName, "" when unset."""
    facts: EndpointFacts
    """Conditions, zone and hints."""

    @staticmethod
    def make(address: IPAddress | None, conditions: EndpointConditions, node_name: str,
             zone: str = "", zone_hints: frozenset[str] = frozenset(),
             node_hints: frozenset[str] = frozenset()) -> Endpoint:
        """An endpoint whose facts are shared with every endpoint with the same ones
        (bounded, see Interner)."""
        return Endpoint(address, node_name,
                        _shared_facts(EndpointFacts(conditions, zone, zone_hints, node_hints)))

    @property
    def conditions(self) -> EndpointConditions:
        return self.facts.conditions

    @property
    def zone(self) -> str:
        return self.facts.zone

    @property
    def zone_hints(self) -> frozenset[str]:
        return self.facts.zone_hints

    @property
    def node_hints(self) -> frozenset[str]:
        return self.facts.node_hints


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """One entry of ports[] of an EndpointSlice."""

    name: str
    """Matches ServicePort.name."""
    port: int
    """The target port."""
    protocol: Protocol
    """Matches ServicePort.protocol."""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice, reduced to what the proxy needs."""

    key: ObjectKey
    """Namespace and name of the slice itself."""
    service: ObjectKey
    """The Service it belongs to (label kubernetes.io/service-name)."""
    address_type: str
    """IPv4, IPv6 or FQDN (FQDN slices are ignored, as kube-proxy does)."""
    endpoints: tuple[Endpoint, ...]
    """endpoints[]."""
    ports: tuple[EndpointPort, ...]
    """ports[]."""
    trigger_time: float | None = field(default=None, compare=False)
    """The last-change-trigger-time annotation as a Unix time; not part of equality,
    so a slice that differs only by it is a no-op change."""


@dataclass(frozen=True, slots=True)
class Node:
    """The v1/Node kpr runs on, reduced to what the proxy needs."""

    name: str
    """metadata.name."""
    labels: Mapping[str, str]
    """metadata.labels (the zone label feeds topology hints)."""
    addresses: tuple[IPAddress, ...]
    """status.addresses of type InternalIP and ExternalIP, in order."""
    deleting: bool
    """metadata.deletionTimestamp is set, or the autoscaler's to-be-deleted taint is on:
    /healthz fails so that load balancers stop sending new traffic here."""

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")


def object_ref(obj: Any) -> str:
    """``namespace/name`` of a raw object, as well as it can be read."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return "<no metadata>"
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or '<no name>'}"


class _Reader:
    """Field access that raises ObjectError with the field's path."""

    def __init__(self, kind: str, obj: Any) -> None:
        self.kind = kind
        self.ref = object_ref(obj)

    def fail(self, path: str, message: str) -> ObjectError:
        return ObjectError(self.kind, self.ref, path, message)

    def mapping(self, value: Any, path: str, required: bool = False) -> Mapping[str, Any]:
        if type(value) is dict:  # the common case; the ABC check below is slow
            return value
        if value is None and not required:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {_show(value)}")
        return value

    def seq(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {_show(value)}")
        return value

    def string(self, value: Any, path: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_show(value)}")
        return value

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_show(value)}")
        return value

    def port(self, value: Any, path: str, allow_zero: bool = False) -> int:
        lo = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 65535:
            raise self.fail(path, f"must be an integer {lo}-65535, got {_show(value)}")
        return value

    def protocol(self, value: Any, path: str) -> Protocol:
        if value is None:
            return Protocol.TCP
        p = _PROTOCOLS.get(value) if isinstance(value, str) else None
        if p is not None:
            return p
        raise self.fail(path, f"must be TCP, UDP or SCTP, got {_show(value)}")

    def ip(self, value: Any, path: str) -> IPAddress:
        # inet_pton + the packed constructor is ~5x faster than ip_address(str), which
        # matters at 100,000 endpoints; both reject what the API server rejects.
        if isinstance(value, str):
            try:
                return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
            except OSError:
                try:
                    return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, value))
                except OSError:
                    pass
        raise self.fail(path, f"must be an IP address, got {_show(value)}")

    def key(self, obj: Mapping[str, Any]) -> tuple[ObjectKey, Mapping[str, Any]]:
        meta = self.mapping(obj.get("metadata"), "metadata", required=True)
        name = self.string(meta.get("name"), "metadata.name")
        if not name:
            raise self.fail("metadata.name", "is required")
        ns = self.string(meta.get("namespace"), "metadata.namespace") or "default"
        return ObjectKey(_word(ns), name), meta


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NO_LABELS: Mapping[str, str] = types.MappingProxyType({})
"""Shared by every object without labels (a dict each was 3 MB at 50,000 Services)."""


def _labels(r: _Reader, meta: Mapping[str, Any]) -> Mapping[str, str]:
    labels = r.mapping(meta.get("labels"), "metadata.labels")
    if not labels:
        return _NO_LABELS
    return {str(k): r.string(v, f"metadata.labels[{k}]") for k, v in labels.items()}


_shared_ports: Interner[tuple[Any, ...]] = Interner()
"""Most Services and slices repeat a handful of port lists (a tuple and its ports per
object were 10 MB at 50,000 Services); NodePorts make distinct ones."""


def _word(value: str) -> str:
    """Intern a string that many objects repeat (namespaces, types, port names): the
    JSON decoder makes a new one per occurrence, 50-60 B each, and six per Service
    held 16 MB at 50,000 Services."""
    return sys.intern(value)


def parse_service(obj: Any) -> Service:
    """Validate a raw v1/Service dict."""
    r = _Reader("Service", obj)
    obj = r.mapping(obj, "<object>", required=True)
    key, meta = r.key(obj)
    spec = r.mapping(obj.get("spec"), "spec")
    svc_type = r.string(spec.get("type"), "spec.type", "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise r.fail("spec.type", f"must be ClusterIP, NodePort, LoadBalancer or ExternalName, "
                                  f"got {_show(svc_type)}")

    ips: list[IPAddress] = []
    raw_ips = spec.get("clusterIPs")
    if raw_ips is not None:
        for i, v in enumerate(r.seq(raw_ips, "spec.clusterIPs")):
            if v == "None":
                ips = []
                break
            ips.append(r.ip(v, f"spec.clusterIPs[{i}]"))
    else:
        single = spec.get("clusterIP")
        if single not in (None, "", "None"):
            ips.append(r.ip(single, "spec.clusterIP"))
    if svc_type == "ExternalName":
        ips = []

    ports: list[ServicePort] = []
    seen: set[tuple[int, Protocol]] = set()
    for i, p in enumerate(r.seq(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        p = r.mapping(p, path, required=True)
        sp = ServicePort(
            name=_word(r.string(p.get("name"), f"{path}.name")),
            port=r.port(p.get("port"), f"{path}.port"),
            protocol=r.protocol(p.get("protocol"), f"{path}.protocol"),
            node_port=r.port(p.get("nodePort", 0), f"{path}.nodePort", allow_zero=True),
        )
        if (sp.port, sp.protocol) in seen:
            raise r.fail(f"{path}.port", f"duplicate port {sp.port}/{sp.protocol.name}")
        seen.add((sp.port, sp.protocol))
        ports.append(sp)

    external_ips = tuple(r.ip(v, f"spec.externalIPs[{i}]")
                         for i, v in enumerate(r.seq(spec.get("externalIPs"), "spec.externalIPs")))
    status = r.mapping(obj.get("status"), "status")
    lb = r.mapping(status.get("loadBalancer"), "status.loadBalancer")
    lb_ips: list[IPAddress] = []
    for i, ing in enumerate(r.seq(lb.get("ingress"), "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        ing = r.mapping(ing, path, required=True)
        mode = r.string(ing.get("ipMode"), f"{path}.ipMode", "VIP")
        if mode not in ("VIP", "Proxy"):
            raise r.fail(f"{path}.ipMode", f"must be VIP or Proxy, got {_show(mode)}")
        if ing.get("ip") in (None, "") or mode == "Proxy":
            continue  # a hostname-only ingress, or a proxying LB: nothing to bind
        lb_ips.append(r.ip(ing.get("ip"), f"{path}.ip"))

    affinity = r.string(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    if affinity not in ("None", "ClientIP"):
        raise r.fail("spec.sessionAffinity", f"must be None or ClientIP, got {_show(affinity)}")
    timeout = 0
    if affinity == "ClientIP":
        cfg = r.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
        cip = r.mapping(cfg.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        raw = cip.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 86400:
            raise r.fail(path, f"must be an integer 1-86400, got {_show(raw)}")
        timeout = raw

    etp = r.string(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy", "Cluster")
    itp = r.string(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", "Cluster")
    for path, v in (("spec.externalTrafficPolicy", etp), ("spec.internalTrafficPolicy", itp)):
        if v not in ("Cluster", "Local"):
            raise r.fail(path, f"must be Cluster or Local, got {_show(v)}")
    ranges: list[IPNetwork] = []
    for i, v in enumerate(r.seq(spec.get("loadBalancerSourceRanges"),
                                "spec.loadBalancerSourceRanges")):
        path = f"spec.loadBalancerSourceRanges[{i}]"
        try:
            if not isinstance(v, str):
                raise ValueError
            ranges.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise r.fail(path, f"must be a CIDR, got {_show(v)}") from None
    td = r.string(spec.get("trafficDistribution"), "spec.trafficDistribution")
    annotations = r.mapping(meta.get("annotations"), "metadata.annotations")
    algo_path = f"metadata.annotations[{LB_ALGORITHM_ANNOTATION}]"
    algo = r.string(annotations.get(LB_ALGORITHM_ANNOTATION), algo_path)
    if algo not in ("", "random", "maglev"):
        raise r.fail(algo_path, f"must be random or maglev, got {_show(algo)}")

    svc = Service(
        key=key,
        type=_word(svc_type),
        cluster_ips=tuple(ips),
        ports=_shared_ports(tuple(ports)),
        labels=_labels(r, meta),
        external_ips=external_ips,
        lb_ips=tuple(lb_ips) if svc_type == "LoadBalancer" else (),
        affinity_timeout=timeout,
        internal_policy_local=itp == "Local",
        lb_source_ranges=tuple(ranges) if svc_type == "LoadBalancer" else (),
        health_check_node_port=r.port(spec.get("healthCheckNodePort", 0),
                                      "spec.healthCheckNodePort", allow_zero=True),
        traffic_distribution=td,
        lb_algorithm=algo,
    )
    # kube-proxy: the external policy only means something for a Service that takes
    # external traffic at all.
    if etp == "Local" and svc.externally_accessible:
        svc = dataclasses.replace(svc, external_policy_local=True)
    return svc


def _time(r: _Reader, value: Any, path: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise r.fail(path, f"must be an RFC 3339 time, got {_show(value)}") from None


def parse_node(obj: Any) -> Node:
    """Validate a raw v1/Node dict."""
    r = _Reader("Node", obj)
    obj = r.mapping(obj, "<object>", required=True)
    meta = r.mapping(obj.get("metadata"), "metadata", required=True)
    name = r.string(meta.get("name"), "metadata.name")
    if not name:
        raise r.fail("metadata.name", "is required")
    r.ref = name
    spec = r.mapping(obj.get("spec"), "spec")
    status = r.mapping(obj.get("status"), "status")
    addrs: list[IPAddress] = []
    for i, a in enumerate(r.seq(status.get("addresses"), "status.addresses")):
        a = r.mapping(a, f"status.addresses[{i}]", required=True)
        if a.get("type") in ("InternalIP", "ExternalIP"):
            addrs.append(r.ip(a.get("address"), f"status.addresses[{i}].address"))
    deleting = meta.get("deletionTimestamp") not in (None, "")
    for i, t in enumerate(r.seq(spec.get("taints"), "spec.taints")):
        t = r.mapping(t, f"spec.taints[{i}]", required=True)
        if t.get("key") == TO_BE_DELETED_TAINT:
            deleting = True
    return Node(name=name, labels=_labels(r, meta), addresses=tuple(addrs), deleting=deleting)


def parse_slice(obj: Any) -> EndpointSlice:
    """Validate a raw discovery.k8s.io/v1 EndpointSlice dict."""
    r = _Reader("EndpointSlice", obj)
    obj = r.mapping(obj, "<object>", required=True)
    key, meta = r.key(obj)
    labels = _labels(r, meta)
    svc_name = labels.get(SERVICE_NAME_LABEL, "")
    if not svc_name:
        raise r.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", "is required")
    address_type = r.string(obj.get("addressType"), "addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise r.fail("addressType", f"must be IPv4, IPv6 or FQDN, got {_show(address_type)}")

    endpoints: list[Endpoint] = []
    for i, e in enumerate(r.seq(obj.get("endpoints"), "endpoints")):
        path = f"endpoints[{i}]"
        e = r.mapping(e, path, required=True)
        addrs: list[IPAddress] = []
        raw_addrs = r.seq(e.get("addresses"), f"{path}.addresses")
        if not raw_addrs:
            raise r.fail(f"{path}.addresses", "must hold at least one address")
        if address_type != "FQDN":
            want = 4 if address_type == "IPv4" else 6
            for j, a in enumerate(raw_addrs):
                ip = r.ip(a, f"{path}.addresses[{j}]")
                if ip.version != want:
                    raise r.fail(f"{path}.addresses[{j}]",
                                 f"{ip} is not an {address_type} address")
                addrs.append(ip)
        cond = r.mapping(e.get("conditions"), f"{path}.conditions")
        # kube-proxy (endpointslicecache.go): unset ready and serving mean true,
        # unset terminating means false.
        ready = r.boolean(cond.get("ready"), f"{path}.conditions.ready", True)
        endpoints.append(Endpoint.make(
            address=addrs[0] if addrs else None,
            conditions=_conditions(
                ready,
                r.boolean(cond.get("serving"), f"{path}.conditions.serving", True),
                r.boolean(cond.get("terminating"), f"{path}.conditions.terminating", False),
            ),
            # interned: a cluster has few nodes and zones and many endpoints
            node_name=sys.intern(r.string(e.get("nodeName"), f"{path}.nodeName")),
            zone=sys.intern(r.string(e.get("zone"), f"{path}.zone")),
            zone_hints=_hints(r, e, path, "forZones"),
            node_hints=_hints(r, e, path, "forNodes"),
        ))

    ports: list[EndpointPort] = []
    for i, p in enumerate(r.seq(obj.get("ports"), "ports")):
        path = f"ports[{i}]"
        p = r.mapping(p, path, required=True)
        ports.append(EndpointPort(
            name=_word(r.string(p.get("name"), f"{path}.name")),
            port=r.port(p.get("port"), f"{path}.port"),
            protocol=r.protocol(p.get("protocol"), f"{path}.protocol"),
        ))

    annotations = r.mapping(meta.get("annotations"), "metadata.annotations")
    path = f"metadata.annotations[{TRIGGER_TIME_ANNOTATION}]"
    return EndpointSlice(
        key=key,
        service=ObjectKey(key.namespace, svc_name),
        address_type=_word(address_type),
        endpoints=tuple(endpoints),
        ports=_shared_ports(tuple(ports)),
        trigger_time=_time(r, annotations.get(TRIGGER_TIME_ANNOTATION), path),
    )


_NO_HINTS: frozenset[str] = frozenset()
"""Shared by every endpoint without hints: CPython 3.11 makes a new empty frozenset
per frozenset(set()) call, 200 B each, 80 MB at 50,000 Services x 4 endpoints."""

_CONDITIONS: dict[tuple[bool, bool, bool], EndpointConditions] = {}
"""One shared instance per combination (they are immutable)."""


def _conditions(ready: bool, serving: bool, terminating: bool) -> EndpointConditions:
    key = (ready, serving, terminating)
    c = _CONDITIONS.get(key)
    if c is None:
        c = _CONDITIONS.setdefault(key, EndpointConditions(*key))
    return c


def _hints(r: _Reader, e: Mapping[str, Any], path: str, which: str) -> frozenset[str]:
    if e.get("hints") is None:
        return _NO_HINTS
    hints = r.mapping(e.get("hints"), f"{path}.hints")
    out = set()
    for i, h in enumerate(r.seq(hints.get(which), f"{path}.hints.{which}")):
        h = r.mapping(h, f"{path}.hints.{which}[{i}]", required=True)
        out.add(sys.intern(r.string(h.get("name"), f"{path}.hints.{which}[{i}].name")))
    return frozenset(out) if out else _NO_HINTS

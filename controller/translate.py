"""Kubernetes objects -> model entries, with the proxy's node-local semantics.

One Service plus its EndpointSlices become one :class:`ServiceEntry` per frontend:
each (cluster IP, external IP, load-balancer IP, node port) x service port. The
semantics are kube-proxy's (pkg/proxy/servicechangetracker.go, topology.go
``CategorizeEndpoints``), so an operator moving from kube-proxy sees the same
behaviour:

* ExternalName and headless Services are not proxied; neither is a Service that
  carries the ``service.kubernetes.io/service-proxy-name`` label, unless kpr was
  given that proxy name (then only those are proxied).
* Families: a Service is proxied in each IP family it has a cluster IP of; its
  external and load-balancer IPs of any other family are ignored, as a per-family
  kube-proxy does. Endpoints come from the slices of the frontend's family.
* An endpoint port is matched to a service port by name and protocol.
* Endpoint categorization: *cluster* endpoints are the ready ones, narrowed by
  topology hints when the hints allow it (every ready endpoint hinted, one for this
  node/zone); when none is ready anywhere, the serving-and-terminating ones. *Local*
  endpoints are this node's ready ones, else this node's serving-and-terminating ones.
* internalTrafficPolicy Local makes ClusterIP frontends use local endpoints;
  externalTrafficPolicy Local does the same for external IPs, load-balancer IPs and
  node ports, which still carry the cluster endpoints for traffic from inside the
  cluster (kube-proxy's short-circuit).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from controller.model import (
    Backend,
    BackendFlag,
    Frontend,
    FrontendKind,
    IPAddress,
    ServiceEntry,
    ServiceFlag,
)
from controller.objects import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    Endpoint,
    EndpointSlice,
    Service,
)

UNSPECIFIED: dict[int, IPAddress] = {4: ipaddress.IPv4Address(0), 6: ipaddress.IPv6Address(0)}
"""The frontend address of node ports, per family."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The node kpr runs on, as far as translation needs it."""

    name: str = ""
    """Node name (``--hostname-override``); marks endpoints local."""
    proxy_name: str = ""
    """The value of service.kubernetes.io/service-proxy-name that kpr serves; "" serves
    only Services without that label, as kube-proxy does."""
    zone: str = ""
    """The node's topology.kubernetes.io/zone label; "" disables zone hints."""


def should_proxy(svc: Service, node: NodeInfo) -> bool:
    """Whether this Service is kpr's to program at all."""
    if svc.type == "ExternalName" or svc.headless:
        return False
    if HEADLESS_LABEL in svc.labels:
        return False
    return svc.labels.get(SERVICE_PROXY_NAME_LABEL, "") == node.proxy_name


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint of one service port, with the facts categorization needs."""

    backend: Backend
    """Address and target port (flags: LOCAL, TERMINATING)."""
    endpoint: Endpoint
    """The EndpointSlice entry it came from."""

    @property
    def ready(self) -> bool:
        return self.endpoint.conditions.ready

    @property
    def serving_terminating(self) -> bool:
        c = self.endpoint.conditions
        return c.serving and c.terminating

    @property
    def local(self) -> bool:
        return bool(self.backend.flags & BackendFlag.LOCAL)


@dataclass(frozen=True, slots=True)
class Categorized:
    """kube-proxy's CategorizeEndpoints result."""

    cluster: tuple[Backend, ...]
    """Endpoints for Cluster traffic policy."""
    local: tuple[Backend, ...]
    """Endpoints for Local traffic policy."""
    has_any: bool
    """A usable (ready, or serving-terminating) endpoint exists anywhere."""


def topology_mode(cands: Sequence[Candidate], traffic_distribution: str,
                  node: NodeInfo) -> str:
    """"node", "zone" or "" (no topology): kube-proxy's topologyModeFromHints.

    Hints are used only when every ready endpoint carries them (a partly-hinted
    slice set is mid-update) and at least one is for this node or zone; otherwise
    narrowing could overload the few hinted endpoints or leave none."""
    all_node = all_zone = True
    for_node = for_zone = False
    for c in cands:
        if not c.ready:
            continue
        if not c.endpoint.node_hints:
            all_node = False
        elif node.name in c.endpoint.node_hints:
            for_node = True
        if not c.endpoint.zone_hints:
            all_zone = False
        elif node.zone and node.zone in c.endpoint.zone_hints:
            for_zone = True
    if traffic_distribution == "PreferSameNode" and all_node and for_node and node.name:
        return "node"
    if all_zone and for_zone:
        return "zone"
    return ""


def categorize(cands: Sequence[Candidate], *, uses_cluster: bool, uses_local: bool,
               traffic_distribution: str = "", node: NodeInfo = NodeInfo()) -> Categorized:
    """Split one service port's endpoints into cluster and local sets."""
    cluster: list[Backend] = []
    has_any = False
    if uses_cluster:
        mode = topology_mode(cands, traffic_distribution, node)

        def in_topology(c: Candidate) -> bool:
            if mode == "node":
                return node.name in c.endpoint.node_hints
            if mode == "zone":
                return node.zone in c.endpoint.zone_hints
            return True

        cluster = [c.backend for c in cands if c.ready and in_topology(c)]
        if not cluster:
            # No ready endpoint anywhere (topology was already dropped if the hinted
            # ones were not ready): fall back to those still serving while they
            # terminate, so a rolling update of the last pod does not blackhole.
            cluster = [c.backend for c in cands if c.serving_terminating]
        has_any = bool(cluster)
    local: list[Backend] = []
    if uses_local:
        has_any = has_any or any(c.ready or c.serving_terminating for c in cands)
        local = [c.backend for c in cands if c.local and c.ready]
        if not local:
            local = [c.backend for c in cands if c.local and c.serving_terminating]
    return Categorized(tuple(cluster), tuple(local), has_any)


def candidates(svc_port_name: str, protocol: object, family: str,
               slices: Iterable[EndpointSlice], node: NodeInfo) -> list[Candidate]:
    """The endpoints of one service port in one family."""
    out: list[Candidate] = []
    for sl in slices:
        if sl.address_type != family:
            continue
        port = next((p.port for p in sl.ports
                     if p.name == svc_port_name and p.protocol == protocol), None)
        if port is None:
            continue
        for ep in sl.endpoints:
            if ep.address is None:  # FQDN: excluded by family above
                continue
            flags = BackendFlag.NONE
            if node.name and ep.node_name == node.name:
                flags |= BackendFlag.LOCAL
            if ep.conditions.terminating:
                flags |= BackendFlag.TERMINATING
            out.append(Candidate(Backend(ep.address, port, flags), ep))
    return out


def translate_service(svc: Service, slices: Iterable[EndpointSlice],
                      node: NodeInfo) -> tuple[ServiceEntry, ...]:
    """All entries of one Service, in canonical order."""
    if not should_proxy(svc, node):
        return ()
    slices = list(slices)
    external = svc.externally_accessible
    # kube-proxy's UsesClusterEndpoints / UsesLocalEndpoints
    uses_cluster = not svc.internal_policy_local or external
    uses_local = svc.internal_policy_local or svc.external_policy_local
    base_flags = ServiceFlag.AFFINITY if svc.affinity_timeout else ServiceFlag.NONE
    if svc.lb_algorithm:
        base_flags |= ServiceFlag.MAGLEV if svc.lb_algorithm == "maglev" else ServiceFlag.RANDOM
    entries: list[ServiceEntry] = []
    families = sorted({ip.version for ip in svc.cluster_ips})
    for sp in svc.ports:
        name = f"{svc.key}:{sp.name}" if sp.name else str(svc.key)
        for version in families:
            family = f"IPv{version}"
            cands = candidates(sp.name, sp.protocol, family, slices, node)
            cat = categorize(cands, uses_cluster=uses_cluster, uses_local=uses_local,
                             traffic_distribution=svc.traffic_distribution, node=node)
            # Serving endpoints keep the flows they have, whether or not they take
            # new ones (see ServiceEntry.draining): every one for frontends that
            # may reach the whole cluster, this node's for a ClusterIP with
            # internalTrafficPolicy Local (it never sends a flow elsewhere).
            serving = [c for c in cands if c.endpoint.conditions.serving]
            local_serving = [c.backend for c in serving if c.local]
            all_serving = [c.backend for c in serving]
            flags = base_flags | (ServiceFlag.HAS_ENDPOINTS if cat.has_any
                                  else ServiceFlag.NONE)

            def add(ip: IPAddress, port: int, kind: FrontendKind, cat: Categorized = cat,
                    flags: ServiceFlag = flags, name: str = name,
                    local_serving: list[Backend] = local_serving,
                    all_serving: list[Backend] = all_serving) -> None:
                local = (svc.internal_policy_local if kind == FrontendKind.CLUSTER_IP
                         else svc.external_policy_local)
                kw: dict[str, object] = {}
                pool = local_serving if local and kind == FrontendKind.CLUSTER_IP \
                    else all_serving
                if pool:
                    kw["draining"] = pool
                if local:
                    flags |= ServiceFlag.LOCAL_POLICY
                    if kind != FrontendKind.CLUSTER_IP:
                        kw["cluster_backends"] = cat.cluster
                if kind == FrontendKind.LOAD_BALANCER:
                    kw["source_ranges"] = [n for n in svc.lb_source_ranges
                                           if n.version == ip.version]
                if kind in (FrontendKind.LOAD_BALANCER, FrontendKind.NODE_PORT) and local:
                    kw["health_check_node_port"] = svc.health_check_node_port
                entries.append(ServiceEntry.make(
                    Frontend(ip, port, sp.protocol), cat.local if local else cat.cluster,
                    name, kind=kind, flags=flags, affinity_timeout=svc.affinity_timeout,
                    **kw))

            for ip in svc.cluster_ips:
                if ip.version == version:
                    add(ip, sp.port, FrontendKind.CLUSTER_IP)
            for ip in svc.external_ips:
                if ip.version == version:
                    add(ip, sp.port, FrontendKind.EXTERNAL_IP)
            for ip in svc.lb_ips:
                if ip.version == version:
                    add(ip, sp.port, FrontendKind.LOAD_BALANCER)
            if sp.node_port and svc.type in ("NodePort", "LoadBalancer"):
                add(UNSPECIFIED[version], sp.node_port, FrontendKind.NODE_PORT)
    return tuple(sorted(entries, key=lambda e: e.frontend))


def no_local_endpoints(entries: Iterable[ServiceEntry]) -> tuple[int, int]:
    """(internal, external) service ports whose Local policy finds no local endpoint
    while endpoints exist elsewhere: kubeproxy_sync_proxy_rules_no_local_endpoints_total."""
    internal: set[str] = set()
    external: set[str] = set()
    want = ServiceFlag.LOCAL_POLICY | ServiceFlag.HAS_ENDPOINTS
    for e in entries:
        if (e.flags & want) == want and not e.backends:
            (internal if e.kind == FrontendKind.CLUSTER_IP else external).add(e.name)
    return len(internal), len(external)

"""Translation tables: kube-proxy's endpoint categorization and Service semantics.

The categorization table mirrors the cases of kube-proxy's TestCategorizeEndpoints
(pkg/proxy/topology_test.go): topology hints, traffic policies, terminating
endpoints, and their combinations. Each row gives the endpoints as compact strings
and the expected cluster and local sets.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controller.model import FrontendKind, Protocol, ServiceFlag
from controller.objects import (
    Endpoint,
    EndpointConditions,
    ObjectError,
    parse_node,
    parse_service,
    parse_slice,
)
from controller.testbed import service_obj, slice_obj
from controller.translate import Candidate, NodeInfo, categorize, translate_service
from controller.model import Backend, BackendFlag


def ep(addr: str, *, ready: bool = True, serving: bool | None = None, terminating: bool = False,
       local: bool = False, zones: str = "", nodes: str = "") -> Candidate:
    """An endpoint: address, conditions, locality and hints ("a,b")."""
    e = Endpoint.make(ipaddress.ip_address(addr),
                      EndpointConditions(ready, ready if serving is None else serving, terminating),
                      "node-1" if local else "node-2", "",
                      frozenset(z for z in zones.split(",") if z),
                      frozenset(n for n in nodes.split(",") if n))
    flags = BackendFlag.LOCAL if local else BackendFlag.NONE
    return Candidate(Backend(ipaddress.ip_address(addr), 80, flags), e)


NODE = NodeInfo(name="node-1", zone="zone-a")
T = dict(ready=False, serving=True, terminating=True)        # serving, terminating
TN = dict(ready=False, serving=False, terminating=True)      # terminating, not serving

# (name, endpoints, uses_cluster, uses_local, trafficDistribution, node,
#  want cluster, want local, want has_any)
CASES: list[tuple[Any, ...]] = [
    ("hints used when every ready endpoint has one and one is for our zone",
     [ep("10.1.2.3", zones="zone-a"), ep("10.1.2.4", zones="zone-b"),
      ep("10.1.2.5", zones="zone-c"), ep("10.1.2.6", zones="zone-a")],
     True, False, "", NODE, {"10.1.2.3", "10.1.2.6"}, None, True),
    ("externalTrafficPolicy Local: topology ignored for local endpoints",
     [ep("10.1.2.3", zones="zone-a", local=True), ep("10.1.2.4", zones="zone-b", local=True),
      ep("10.1.2.5", zones="zone-c")],
     True, True, "", NODE, {"10.1.2.3"}, {"10.1.2.3", "10.1.2.4"}, True),
    ("internalTrafficPolicy Local only: no cluster endpoints, topology ignored",
     [ep("10.1.2.3", zones="zone-a", local=True), ep("10.1.2.4", zones="zone-b", local=True),
      ep("10.1.2.5", zones="zone-c")],
     False, True, "", NODE, set(), {"10.1.2.3", "10.1.2.4"}, True),
    ("node without zone label: hints ignored",
     [ep("10.1.2.3", zones="zone-a"), ep("10.1.2.4", zones="zone-b")],
     True, False, "", NodeInfo(name="node-1"), {"10.1.2.3", "10.1.2.4"}, None, True),
    ("no endpoint hinted for our zone: no filtering",
     [ep("10.1.2.3", zones="zone-b"), ep("10.1.2.4", zones="zone-c")],
     True, False, "", NODE, {"10.1.2.3", "10.1.2.4"}, None, True),
    ("unready endpoint in our zone is filtered, hinted ready ones kept",
     [ep("10.1.2.3", zones="zone-a"), ep("10.1.2.4", zones="zone-b"),
      ep("10.1.2.6", zones="zone-a", ready=False)],
     True, False, "", NODE, {"10.1.2.3"}, None, True),
    ("only unready endpoints in our zone: topology not used",
     [ep("10.1.2.3", zones="zone-a", ready=False), ep("10.1.2.4", zones="zone-b"),
      ep("10.1.2.5", zones="zone-c")],
     True, False, "", NODE, {"10.1.2.4", "10.1.2.5"}, None, True),
    ("a ready endpoint without hints: all ready endpoints",
     [ep("10.1.2.3", zones="zone-a"), ep("10.1.2.4"), ep("10.1.2.5", zones="zone-a")],
     True, False, "", NODE, {"10.1.2.3", "10.1.2.4", "10.1.2.5"}, None, True),
    ("an endpoint hinted for several zones counts for each",
     [ep("10.1.2.3", zones="zone-a,zone-b"), ep("10.1.2.4", zones="zone-b"),
      ep("10.1.2.5", zones="zone-b,zone-c")],
     True, False, "", NODE, {"10.1.2.3"}, None, True),
    ("PreferSameNode: node hints narrow to this node",
     [ep("10.1.2.3", zones="zone-a", nodes="node-1", local=True),
      ep("10.1.2.4", zones="zone-a", nodes="node-2"), ep("10.1.2.5", zones="zone-b",
                                                         nodes="node-3")],
     True, False, "PreferSameNode", NODE, {"10.1.2.3"}, None, True),
    ("node hints without PreferSameNode: zone hints apply",
     [ep("10.1.2.3", zones="zone-a", nodes="node-1", local=True),
      ep("10.1.2.4", zones="zone-a", nodes="node-2"), ep("10.1.2.5", zones="zone-b",
                                                         nodes="node-3")],
     True, False, "PreferSameZone", NODE, {"10.1.2.3", "10.1.2.4"}, None, True),
    ("PreferSameNode with no hint for this node falls back to zone hints",
     [ep("10.1.2.4", zones="zone-a", nodes="node-2"), ep("10.1.2.5", zones="zone-b",
                                                         nodes="node-3")],
     True, False, "PreferSameNode", NODE, {"10.1.2.4"}, None, True),
    ("iTP Local, no endpoints at all",
     [], False, True, "", NODE, set(), set(), False),
    ("iTP Local, every endpoint remote: none local, but some exist",
     [ep("10.0.0.0"), ep("10.0.0.1")], False, True, "", NODE, set(), set(), True),
    ("iTP Local, every endpoint local",
     [ep("10.0.0.0", local=True), ep("10.0.0.1", local=True)], False, True, "", NODE,
     set(), {"10.0.0.0", "10.0.0.1"}, True),
    ("iTP Local, some endpoints local",
     [ep("10.0.0.0", local=True), ep("10.0.0.1")], False, True, "", NODE,
     set(), {"10.0.0.0"}, True),
    ("Cluster, no endpoint ready or serving",
     [ep("10.0.0.0", ready=False, serving=False), ep("10.0.0.1", ready=False, serving=False)],
     True, False, "", NODE, set(), None, False),
    ("Cluster, some endpoints ready",
     [ep("10.0.0.0", ready=False, serving=False), ep("10.0.0.1")], True, False, "", NODE,
     {"10.0.0.1"}, None, True),
    ("Cluster, all terminating: the serving ones are used",
     [ep("10.0.0.0", **T), ep("10.0.0.1", **TN)], True, False, "", NODE,
     {"10.0.0.0"}, None, True),
    ("Cluster, a ready endpoint wins over serving-terminating ones",
     [ep("10.0.0.0", **T), ep("10.0.0.1")], True, False, "", NODE, {"10.0.0.1"}, None, True),
    ("iTP Local eTP Cluster, some local",
     [ep("10.0.0.0", local=True), ep("10.0.0.1")], True, True, "", NODE,
     {"10.0.0.0", "10.0.0.1"}, {"10.0.0.0"}, True),
    ("iTP Local eTP Local, local endpoints all serving-terminating",
     [ep("10.0.0.0", local=True, **T), ep("10.0.0.1", local=True, **T), ep("10.0.0.2"),
      ep("10.0.0.3")], True, True, "", NODE,
     {"10.0.0.2", "10.0.0.3"}, {"10.0.0.0", "10.0.0.1"}, True),
    ("iTP Local eTP Local, local endpoints terminating and not serving",
     [ep("10.0.0.0", local=True, **TN), ep("10.0.0.1", local=True, **TN), ep("10.0.0.2"),
      ep("10.0.0.3")], True, True, "", NODE, {"10.0.0.2", "10.0.0.3"}, set(), True),
    ("eTP Local, only remote serving-terminating endpoints",
     [ep("10.0.0.0", local=True, **TN), ep("10.0.0.2", **T)], True, True, "", NODE,
     {"10.0.0.2"}, set(), True),
    ("local ready wins over local serving-terminating",
     [ep("10.0.0.0", local=True, **T), ep("10.0.0.1", local=True)], False, True, "", NODE,
     set(), {"10.0.0.1"}, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_categorize_endpoints(case: tuple[Any, ...]) -> None:
    _, eps, uses_cluster, uses_local, td, node, want_cluster, want_local, want_any = case
    got = categorize(eps, uses_cluster=uses_cluster, uses_local=uses_local,
                     traffic_distribution=td, node=node)
    assert {str(b.ip) for b in got.cluster} == want_cluster
    if want_local is not None:
        assert {str(b.ip) for b in got.local} == want_local
    assert got.has_any == want_any


# ----- whole Services ------------------------------------------------------------------------

def svc(**spec: Any) -> dict[str, Any]:
    o = service_obj("web", "10.96.0.10", [("http", 80, "TCP")])
    status = spec.pop("status", None)
    o["spec"].update(spec)
    if status:
        o["status"] = status
    return o


def sl(addrs: list[Any], family: str = "IPv4", name: str = "web-abcde",
       port: tuple[str, int, str] = ("http", 8080, "TCP")) -> dict[str, Any]:
    o = slice_obj("web", addrs, [port], name=name)
    o["addressType"] = family
    return o


def translate(service: dict[str, Any], *slices: dict[str, Any],
              node: NodeInfo = NodeInfo(name="node-1")) -> dict[tuple[str, int, int], Any]:
    entries = translate_service(parse_service(service), [parse_slice(s) for s in slices], node)
    return {(str(e.frontend.ip), e.frontend.port, int(e.kind)): e for e in entries}


def on(node: str, addr: str) -> dict[str, Any]:
    return {"addresses": [addr], "conditions": {"ready": True}, "nodeName": node}


CIP, EIP, LB, NP = (FrontendKind.CLUSTER_IP, FrontendKind.EXTERNAL_IP,
                    FrontendKind.LOAD_BALANCER, FrontendKind.NODE_PORT)


def test_every_frontend_kind() -> None:
    s = svc(type="LoadBalancer", externalIPs=["192.0.2.7"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"},
                                                 {"ip": "198.51.100.2", "ipMode": "Proxy"},
                                                 {"hostname": "lb.example"}]}})
    got = translate(s, sl(["10.244.0.11"]))
    assert sorted(got) == sorted([("10.96.0.10", 80, CIP), ("192.0.2.7", 80, EIP),
                                  ("198.51.100.1", 80, LB), ("0.0.0.0", 30080, NP)])
    for e in got.values():
        assert [str(b) for b in e.backends] == ["10.244.0.11:8080"]
        assert e.flags == ServiceFlag.HAS_ENDPOINTS


def test_nodeport_only_for_nodeport_and_lb_types() -> None:
    s = svc(ports=[{"name": "http", "port": 80, "nodePort": 30080}])  # ClusterIP type
    assert list(translate(s, sl(["10.244.0.11"]))) == [("10.96.0.10", 80, CIP)]


def test_ports_by_protocol_tcp_udp_sctp() -> None:
    s = svc(ports=[{"name": "a", "port": 53, "protocol": "UDP"},
                   {"name": "b", "port": 53, "protocol": "TCP"},
                   {"name": "c", "port": 9000, "protocol": "SCTP"}])
    slc = slice_obj("web", ["10.244.0.11"], [("a", 5353, "UDP"), ("b", 5353, "TCP"),
                                             ("c", 9001, "SCTP")])
    entries = translate_service(parse_service(s), [parse_slice(slc)], NodeInfo())
    assert [(e.frontend.port, e.frontend.protocol, e.backends[0].port) for e in entries] == [
        (53, Protocol.TCP, 5353), (53, Protocol.UDP, 5353), (9000, Protocol.SCTP, 9001)]


def test_session_affinity_client_ip() -> None:
    got = translate(svc(sessionAffinity="ClientIP"), sl(["10.244.0.11"]))
    e = got[("10.96.0.10", 80, CIP)]
    assert e.flags & ServiceFlag.AFFINITY and e.affinity_timeout == 10800
    got = translate(svc(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": 60}}), sl(["10.244.0.11"]))
    assert got[("10.96.0.10", 80, CIP)].affinity_timeout == 60


def test_external_traffic_policy_local() -> None:
    s = svc(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}})
    slc = sl([])
    slc["endpoints"] = [on("node-1", "10.244.0.11"), on("node-2", "10.244.1.11")]
    got = translate(s, slc)
    cip = got[("10.96.0.10", 80, CIP)]
    assert {str(b.ip) for b in cip.backends} == {"10.244.0.11", "10.244.1.11"}
    assert not cip.flags & ServiceFlag.LOCAL_POLICY
    for key in (("198.51.100.1", 80, LB), ("0.0.0.0", 30080, NP)):
        e = got[key]
        assert [str(b.ip) for b in e.backends] == ["10.244.0.11"]
        assert e.backends[0].flags & BackendFlag.LOCAL
        assert e.flags & ServiceFlag.LOCAL_POLICY
        # traffic from inside the cluster still reaches every endpoint
        assert {str(b.ip) for b in e.cluster_backends} == {"10.244.0.11", "10.244.1.11"}
        assert e.health_check_node_port == 32000
    # on a node without a local endpoint: nothing for external traffic
    other = translate(s, slc, node=NodeInfo(name="node-3"))[("198.51.100.1", 80, LB)]
    assert other.backends == () and other.flags & ServiceFlag.HAS_ENDPOINTS


def test_external_policy_ignored_when_not_externally_accessible() -> None:
    slc = sl([])
    slc["endpoints"] = [on("node-2", "10.244.1.11")]
    got = translate(svc(externalTrafficPolicy="Local"), slc)
    assert [str(b.ip) for b in got[("10.96.0.10", 80, CIP)].backends] == ["10.244.1.11"]


def test_internal_traffic_policy_local() -> None:
    slc = sl([])
    slc["endpoints"] = [on("node-1", "10.244.0.11"), on("node-2", "10.244.1.11")]
    e = translate(svc(internalTrafficPolicy="Local"), slc)[("10.96.0.10", 80, CIP)]
    assert [str(b.ip) for b in e.backends] == ["10.244.0.11"]
    assert e.flags & ServiceFlag.LOCAL_POLICY


def test_load_balancer_source_ranges_by_family() -> None:
    s = svc(type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8::/32",
                                                           " 192.0.2.0/25 "],
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}})
    e = translate(s, sl(["10.244.0.11"]))[("198.51.100.1", 80, LB)]
    assert [str(n) for n in e.source_ranges] == ["192.0.2.0/25", "203.0.113.0/24"]
    assert translate(s, sl(["10.244.0.11"]))[("10.96.0.10", 80, CIP)].source_ranges == ()


def test_dual_stack_takes_endpoints_per_family() -> None:
    s = svc(clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv4", "IPv6"],
            externalIPs=["192.0.2.7", "2001:db8::7"])
    got = translate(s, sl(["10.244.0.11"]), sl(["fd00:244::11"], "IPv6", name="web-v6"))
    assert [str(b) for b in got[("fd00::10", 80, CIP)].backends] == ["[fd00:244::11]:8080"]
    assert [str(b) for b in got[("10.96.0.10", 80, CIP)].backends] == ["10.244.0.11:8080"]
    assert [str(b) for b in got[("2001:db8::7", 80, EIP)].backends] == ["[fd00:244::11]:8080"]


def test_single_stack_ignores_other_family_external_ips() -> None:
    got = translate(svc(externalIPs=["2001:db8::7", "192.0.2.7"]), sl(["10.244.0.11"]))
    assert sorted(got) == [("10.96.0.10", 80, CIP), ("192.0.2.7", 80, EIP)]


def test_flag_change_is_an_entry_change() -> None:
    """An endpoint that starts terminating changes the entry (a datapath that drains
    gracefully must hear of it), even though its address did not change."""
    a = translate(svc(), sl(["10.244.0.11"]))[("10.96.0.10", 80, CIP)]
    b = translate(svc(), sl([("10.244.0.11", {"ready": False, "serving": True,
                                                "terminating": True})]))[
        ("10.96.0.10", 80, CIP)]
    assert a.backends == b.backends and a != b


@pytest.mark.parametrize("spec,path", [
    ({"sessionAffinity": "Sticky"}, "spec.sessionAffinity"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {
        "timeoutSeconds": 0}}}, "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ({"externalTrafficPolicy": "local"}, "spec.externalTrafficPolicy"),
    ({"loadBalancerSourceRanges": ["10.0.0.0/33"]}, "spec.loadBalancerSourceRanges[0]"),
    ({"externalIPs": ["1.2.3"]}, "spec.externalIPs[0]"),
    ({"healthCheckNodePort": 70000}, "spec.healthCheckNodePort"),
])
def test_invalid_service_fields_are_named(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(ObjectError) as e:
        parse_service(svc(**spec))
    assert str(e.value).startswith(f"Service default/web: {path}: ")


def test_node_zone_and_deletion() -> None:
    n = parse_node({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}},
                    "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"},
                                             {"type": "Hostname", "address": "n1"}]}})
    assert n.zone == "z" and [str(a) for a in n.addresses] == ["10.0.0.5"] and not n.deleting
    d = parse_node({"metadata": {"name": "n1"}, "spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})
    assert d.deleting
    assert parse_node({"metadata": {"name": "n1",
                                    "deletionTimestamp": "2026-01-01T00:00:00Z"}}).deleting


def test_trigger_time_annotation() -> None:
    s = sl(["10.244.0.11"])
    s["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-21T10:00:00Z"}
    t = parse_slice(s).trigger_time
    assert t is not None and abs(t - 1795255200.0) < 1
    s["metadata"]["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"] = "soon"
    with pytest.raises(ObjectError, match="last-change-trigger-time"):
        parse_slice(s)

"""The shared packet-flow table, in kube-proxy's style (pkg/proxy/*/proxier_test.go):
Services and EndpointSlices as the API server would hold them, and flows
``{src, dst, port, proto, expect, masq}`` that any datapath must forward so.

The topology is the testbed's: pods a, b, c (this node), r (another node, reached
over its own link), a client pod, and an external client 172.16.0.2 behind the
node's external link 172.16.0.1. kpr runs with ``--cluster-cidr 10.244.0.0/24``
and ``--nodeport-addresses 172.16.0.0/24``, as node ``node-1``.

Every Service is dual-stack (RequireDualStack, one EndpointSlice per family), and
the table holds every IPv4 row and its IPv6 twin (:data:`FLOWS6`, the same row
with each address mapped by :func:`v6`): the same features, both families.

``expect`` is the set of backends that may answer, ``REJECT`` (the client is refused
at once: ICMP port unreachable, or the node's own RST where nothing is proxied) or
``DROP`` (no answer at all). ``masq`` says whether the backend sees the node's
masquerade address (True) or the client's own (False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NODE = "node-1"
OTHER_NODE = "node-2"
CLUSTER_CIDR = "10.244.0.0/24,fd00:244::/64"
NODE_IP = "172.16.0.1"
EXT_IP = "172.16.0.2"
NODEPORT_CIDR = "172.16.0.0/24,fd00:16::/64"
CLUSTER_CIDR6 = "fd00:244::/64"
POD_LINK_IP = "169.254.1.1"
"""A node address outside --nodeport-addresses: NodePorts must not answer on it."""
PODS = ("a", "b", "c", "r", "client")
"""Pod names in creation order (testbed addresses 10.244.0.11 onwards)."""
TARGET = 8080
REJECT = "REJECT"
DROP = "DROP"

_V6_PREFIXES = {"10.96.0.": "fd00:96::", "10.244.0.": "fd00:244::", "172.16.0.": "fd00:16::",
                "192.0.2.": "2001:db8::", "169.254.1.": "fd00:169::", "10.0.0.": "fd00:10::"}
"""IPv4 prefix -> IPv6 prefix: an address's twin keeps its last octet's digits."""


def v6(addr: str) -> str:
    """The IPv6 twin of one of the table's IPv4 addresses or CIDRs (10.96.0.10 ->
    fd00:96::10, 172.16.0.0/24 -> fd00:16::/64, 10.0.0.0/8 -> fd00:10::/32)."""
    if "/" in addr:
        net, plen = addr.split("/")
        return f"{v6(net).replace('::0', '::')}/{ {24: 64, 8: 32}[int(plen)]}"
    for p4, p6 in _V6_PREFIXES.items():
        if addr.startswith(p4):
            return p6 + addr[len(p4):]
    raise ValueError(f"no IPv6 twin for {addr}")


def _service(name: str, cluster_ip: str, svc_type: str = "ClusterIP",
             ports: tuple[tuple[str, int, str, int], ...] = (("http", 80, "TCP", 0),),
             lb: str | None = None, **spec: Any) -> dict[str, Any]:
    """A dual-stack v1/Service from its IPv4 addresses (the IPv6 ones are their
    twins); ports are (name, port, protocol, nodePort)."""
    for field in ("externalIPs", "loadBalancerSourceRanges"):
        if field in spec:
            spec[field] = [*spec[field], *map(v6, spec[field])]
    out: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": svc_type, "clusterIP": cluster_ip,
                 "clusterIPs": [cluster_ip, v6(cluster_ip)],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"name": n, "port": p, "protocol": proto, "targetPort": TARGET,
                            **({"nodePort": np} if np else {})}
                           for n, p, proto, np in ports], **spec},
    }
    if lb:
        out["status"] = {"loadBalancer": {"ingress": [{"ip": lb}, {"ip": v6(lb)}]}}
    return out


def _slices(service: str, endpoints: list[tuple[str, str]],
            ports: tuple[tuple[str, str], ...] = (("http", "TCP"),)) -> list[dict[str, Any]]:
    """One EndpointSlice per family; endpoints are (pod name, node name), resolved by
    ``objects``."""
    return [{
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-{fam.lower()}", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": fam,
        "endpoints": [{"addresses": [pod], "conditions": {"ready": True}, "nodeName": node}
                      for pod, node in endpoints],
        "ports": [{"name": n, "port": TARGET, "protocol": p} for n, p in ports],
    } for fam in ("IPv4", "IPv6")]


def objects(pod_ips: dict[str, str], pod_ips6: dict[str, str]) -> list[dict[str, Any]]:
    """The table's Services and EndpointSlices, pod names resolved to addresses."""
    both = (("http", 80, "TCP", 30080), ("dns", 53, "UDP", 30053))
    objs = [
        _service("web", "10.96.0.10", "LoadBalancer", both, lb="192.0.2.10",
                 externalIPs=["192.0.2.20"]),
        *_slices("web", [("a", NODE), ("b", NODE)], (("http", "TCP"), ("dns", "UDP"))),
        _service("empty", "10.96.0.30", ports=(("http", 80, "TCP", 0), ("dns", 53, "UDP", 0))),
        _service("local", "10.96.0.40", "LoadBalancer", (("http", 80, "TCP", 30040),),
                 lb="192.0.2.40", externalTrafficPolicy="Local"),
        *_slices("local", [("c", NODE), ("r", OTHER_NODE)]),
        _service("local-none", "10.96.0.41", "LoadBalancer", (("http", 80, "TCP", 30041),),
                 lb="192.0.2.41", externalTrafficPolicy="Local"),
        *_slices("local-none", [("r", OTHER_NODE)]),
        _service("itp-local", "10.96.0.50", internalTrafficPolicy="Local"),
        *_slices("itp-local", [("c", NODE), ("r", OTHER_NODE)]),
        _service("itp-none", "10.96.0.51", internalTrafficPolicy="Local"),
        *_slices("itp-none", [("r", OTHER_NODE)]),
        _service("ranged-in", "10.96.0.60", "LoadBalancer", (("http", 80, "TCP", 30060),),
                 lb="192.0.2.60", loadBalancerSourceRanges=["172.16.0.0/24"]),
        *_slices("ranged-in", [("a", NODE)]),
        _service("ranged-out", "10.96.0.61", "LoadBalancer", (("http", 80, "TCP", 30061),),
                 lb="192.0.2.61", loadBalancerSourceRanges=["10.0.0.0/8"]),
        *_slices("ranged-out", [("a", NODE)]),
        _service("hairpin", "10.96.0.70"),
        *_slices("hairpin", [("a", NODE)]),
    ]
    for o in objs:
        ips = pod_ips6 if o.get("addressType") == "IPv6" else pod_ips
        for ep in o.get("endpoints", []):
            ep["addresses"] = [ips[ep["addresses"][0]]]
    return objs


@dataclass(frozen=True)
class Flow:
    """One row: traffic from ``src`` to ``dst:port`` and what must happen to it."""

    src: str
    """A pod name, "ext" for the external client, or "node" for the node itself."""
    dst: str
    """Destination address (a ClusterIP, node address, LB IP or external IP)."""
    port: int
    """Destination port."""
    proto: str
    """tcp or udp."""
    expect: frozenset[str] | str
    """Backends that may answer (all of them must, over repeated tries), REJECT or DROP."""
    masq: bool = False
    """The backend sees the masquerade address (else the client's own)."""
    why: str = ""
    """What the row checks."""

    def __str__(self) -> str:
        return f"{self.src}->{self.dst}:{self.port}/{self.proto}"


def _f(src: str, dst: str, port: int, proto: str, expect: str, masq: bool = False,
       why: str = "") -> Flow:
    exp: frozenset[str] | str = expect if expect in (REJECT, DROP) else frozenset(expect)
    return Flow(src, dst, port, proto, exp, masq, why)


FLOWS: list[Flow] = [
    # ClusterIP
    _f("client", "10.96.0.10", 80, "tcp", "ab", why="ClusterIP, pod client, real source"),
    _f("client", "10.96.0.10", 53, "udp", "ab", why="ClusterIP over UDP"),
    _f("ext", "10.96.0.10", 80, "tcp", "ab", True, why="off-cluster client: masquerade"),
    _f("client", "10.96.0.10", 81, "tcp", REJECT, why="undefined port of a ClusterIP"),
    _f("client", "10.96.0.30", 80, "tcp", REJECT, why="no endpoints: TCP refused"),
    _f("client", "10.96.0.30", 53, "udp", REJECT, why="no endpoints: UDP refused"),
    _f("a", "10.96.0.70", 80, "tcp", "a", True, why="hairpin: masquerade"),
    _f("client", "10.96.0.50", 80, "tcp", "c", why="internalTrafficPolicy Local"),
    _f("client", "10.96.0.51", 80, "tcp", DROP, why="iTP Local, no local endpoint"),
    _f("client", "10.96.0.40", 80, "tcp", "cr", why="eTP Local: ClusterIP uses all"),
    # NodePort
    _f("ext", NODE_IP, 30080, "tcp", "ab", True, why="NodePort, eTP Cluster"),
    _f("ext", NODE_IP, 30053, "udp", "ab", True, why="NodePort over UDP"),
    _f("client", NODE_IP, 30080, "tcp", "ab", True, why="NodePort from a pod"),
    _f("client", POD_LINK_IP, 30080, "tcp", REJECT, why="not a --nodeport-addresses IP"),
    _f("ext", NODE_IP, 30040, "tcp", "c", why="eTP Local: local only, source kept"),
    _f("ext", NODE_IP, 30041, "tcp", DROP, why="eTP Local, no local endpoint"),
    _f("client", NODE_IP, 30040, "tcp", "cr", why="eTP Local from a pod: all endpoints"),
    _f("ext", NODE_IP, 30061, "tcp", "a", True, why="source ranges do not bind NodePorts"),
    # LoadBalancer IPs and externalIPs
    _f("ext", "192.0.2.10", 80, "tcp", "ab", True, why="LB IP, eTP Cluster"),
    _f("ext", "192.0.2.10", 53, "udp", "ab", True, why="LB IP over UDP"),
    _f("ext", "192.0.2.20", 80, "tcp", "ab", True, why="externalIP"),
    _f("client", "192.0.2.10", 80, "tcp", "ab", True, why="LB IP from a pod, eTP Cluster"),
    _f("ext", "192.0.2.40", 80, "tcp", "c", why="LB IP, eTP Local"),
    _f("ext", "192.0.2.41", 80, "tcp", DROP, why="LB IP, eTP Local, no local endpoint"),
    _f("ext", "192.0.2.60", 80, "tcp", "a", True, why="inside loadBalancerSourceRanges"),
    _f("ext", "192.0.2.61", 80, "tcp", DROP, why="outside loadBalancerSourceRanges"),
    # The node itself (socket programs): no masquerade needed, the kernel picks the
    # node's address on the link to the backend.
    _f("node", "10.96.0.10", 80, "tcp", "ab", why="host to ClusterIP (connect4/connect6)"),
    _f("node", "10.96.0.10", 53, "udp", "ab", why="host to ClusterIP over UDP"),
    _f("node", NODE_IP, 30080, "tcp", "ab", why="host to its own NodePort"),
    _f("node", "10.96.0.30", 80, "tcp", REJECT, why="host, no endpoints: ECONNREFUSED"),
    _f("node", "192.0.2.40", 80, "tcp", "cr", why="host to eTP Local LB IP: all endpoints"),
]

FLOWS6: list[Flow] = [
    Flow(f.src, v6(f.dst), f.port, f.proto, f.expect, f.masq, f"IPv6: {f.why}") for f in FLOWS]
"""Every row again over IPv6: the same features in the other family."""

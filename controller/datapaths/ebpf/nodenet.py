"""The node's own network facts the programs need: its addresses, where NodePorts
answer, the masquerade address, the cluster CIDRs and the namespace cookie.

They are read from the kernel (rtnetlink, in the datapath's namespace) at start,
on every full sync, and whenever the link watcher sees an address change, then
written to node_addrs4, local_cidrs4 and config4. Writing compares with what the
maps hold, so an unchanged node costs three reads.

``--nodeport-addresses`` follows kube-proxy: CIDRs select the node addresses in
them; ``primary`` selects the primary address; empty selects every address
(loopback excluded, as kube-proxy's nftables mode does).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from controller.datapaths.ebpf import loader
from controller.datapaths.ebpf.maps import BpfMap

SO_NETNS_COOKIE = 71  # Linux 5.14+, include/uapi/asm-generic/socket.h
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_C = loader.consts()
_LPM_KEY = struct.Struct("=I4s")
_CONFIG = struct.Struct("=4sIQ")


@dataclass(frozen=True, slots=True)
class NodeNet:
    """What config4, node_addrs4 and local_cidrs4 should hold."""

    addresses: tuple[ipaddress.IPv4Address, ...]
    """Every IPv4 address of the node except loopback."""
    nodeport: tuple[ipaddress.IPv4Address, ...]
    """The addresses NodePorts answer on."""
    snat: ipaddress.IPv4Address | None
    """The masquerade address; None: masquerading is off (no usable address)."""
    cluster_cidrs: tuple[ipaddress.IPv4Network, ...]
    """detect-local: clients inside these are in-cluster."""
    masquerade_all: bool
    """masqueradeAll."""
    netns_cookie: int
    """The namespace's cookie (socket programs act only inside it)."""


def _addresses(ipr: IPRoute) -> list[tuple[int, ipaddress.IPv4Address]]:
    out = []
    for msg in ipr.get_addr(family=socket.AF_INET):
        raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if raw:
            ip = ipaddress.IPv4Address(raw)
            if ip not in LOOPBACK:
                out.append((msg["index"], ip))
    return sorted(out)


def _primary(ipr: IPRoute, addrs: list[tuple[int, ipaddress.IPv4Address]]
             ) -> ipaddress.IPv4Address | None:
    """The default route's preferred source, else the first address on its link, else
    the first global address outside 169.254/16."""
    for r in ipr.get_default_routes(family=socket.AF_INET):
        src = r.get_attr("RTA_PREFSRC")
        if src:
            return ipaddress.IPv4Address(src)
        oif = r.get_attr("RTA_OIF")
        on_link = [ip for idx, ip in addrs if idx == oif and ip not in LINK_LOCAL]
        if on_link:
            return on_link[0]
    usable = [ip for _, ip in addrs if ip not in LINK_LOCAL]
    return usable[0] if usable else None


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (0 if unsupported)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                  "little")
        except OSError:
            return 0


def discover(ipr: IPRoute, nodeport_addresses: Iterable[str],
             cluster_cidrs: Iterable[ipaddress.IPv4Network], masquerade_all: bool,
             masquerade_address: str, cookie: int) -> NodeNet:
    addrs = _addresses(ipr)
    primary = _primary(ipr, addrs)
    snat = ipaddress.IPv4Address(masquerade_address) if masquerade_address else primary
    allv4 = tuple(dict.fromkeys(ip for _, ip in addrs))
    specs = list(nodeport_addresses)
    if not specs:
        nodeport = allv4
    else:
        nets = [ipaddress.ip_network(s) for s in specs if s != "primary"]
        chosen = [ip for ip in allv4 if any(ip in n for n in nets if n.version == 4)]
        if "primary" in specs and primary is not None:
            chosen.append(primary)
        nodeport = tuple(dict.fromkeys(chosen))
    return NodeNet(allv4, nodeport, snat, tuple(cluster_cidrs), masquerade_all, cookie)


class NodeMaps:
    """Writes a NodeNet into the maps, touching only what differs."""

    def __init__(self, bpf: Any) -> None:
        self.addrs = BpfMap(bpf["node_addrs4"], "node_addrs4")
        self.cidrs = BpfMap(bpf["local_cidrs4"], "local_cidrs4", batch=False)
        self.config = BpfMap(bpf["config4"], "config4", batch=False)

    def write(self, net: NodeNet) -> int:
        ops = 0
        want = {ip.packed: struct.pack("=I", _C["ADDR_F_NODEPORT"] if ip in net.nodeport
                                       else 0) for ip in net.addresses}
        have = dict(self.addrs.items())
        ops += self.addrs.update((k, v) for k, v in want.items() if have.get(k) != v)
        ops += self.addrs.delete(k for k in have if k not in want)
        want_c = {_LPM_KEY.pack(n.prefixlen, n.network_address.packed)
                  for n in net.cluster_cidrs}
        have_c = set(self.cidrs.keys())
        ops += self.cidrs.update((k, b"\1") for k in want_c - have_c)
        ops += self.cidrs.delete(have_c - want_c)
        flags = (_C["CFG_F_MASQ_ALL"] if net.masquerade_all else 0) | \
            (_C["CFG_F_DETECT_LOCAL"] if net.cluster_cidrs else 0)
        cfg = _CONFIG.pack(net.snat.packed if net.snat else bytes(4), flags, net.netns_cookie)
        if dict(self.config.items()).get(bytes(4)) != cfg:
            ops += self.config.update([(bytes(4), cfg)])
        return ops

"""The node's own network facts every datapath needs: its addresses, where NodePorts
answer, the masquerade addresses, the cluster CIDRs and the namespace cookie.

They are read from the kernel (rtnetlink, in the datapath's namespace). Both
families are read alike; each has its own masquerade address (an IPv4 flow is
masqueraded to an IPv4 node address, an IPv6 flow to an IPv6 one).

``--nodeport-addresses`` follows kube-proxy: CIDRs select the node addresses in
them; ``primary`` selects each family's primary address; empty selects every
address (loopback and IPv6 link-local excluded, as kube-proxy's nftables mode does:
a link-local address is ambiguous without its link).
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from controller.model import IPAddress, IPNetwork

log = logging.getLogger(__name__)
RTMGRP_IPV4_IFADDR = 0x10  # include/uapi/linux/rtnetlink.h
RTMGRP_IPV6_IFADDR = 0x100

SO_NETNS_COOKIE = 71  # Linux 5.14+, include/uapi/asm-generic/socket.h
LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))
LINK_LOCAL = (ipaddress.IPv4Network("169.254.0.0/16"), ipaddress.IPv6Network("fe80::/10"))


@dataclass(frozen=True, slots=True)
class NodeNet:
    """The node as the datapaths see it."""

    addresses: tuple[IPAddress, ...]
    """Every address of the node except loopback and IPv6 link-local."""
    nodeport: tuple[IPAddress, ...]
    """The addresses NodePorts answer on."""
    snat: tuple[IPAddress, ...]
    """The masquerade addresses, at most one per family; a family without one is not
    masqueraded (no usable address)."""
    cluster_cidrs: tuple[IPNetwork, ...]
    """detect-local: clients inside these are in-cluster."""
    masquerade_all: bool
    """masqueradeAll."""
    netns_cookie: int
    """The namespace's cookie (socket programs act only inside it)."""


def _usable(ip: IPAddress) -> bool:
    return not any(ip in n for n in LOOPBACK if n.version == ip.version)


def _link_local(ip: IPAddress) -> bool:
    return any(ip in n for n in LINK_LOCAL if n.version == ip.version)


VIP_LINKS = ("kpr-ipvs0", "kube-ipvs0")
"""Dummy links that hold the IPVS datapath's (or kube-proxy's) Service addresses:
those are not node addresses (NodePorts do not answer on a ClusterIP)."""


def _addresses(ipr: IPRoute) -> list[tuple[int, IPAddress]]:
    out: list[tuple[int, IPAddress]] = []
    vip_links = {link["index"] for link in ipr.get_links()
                 if link.get_attr("IFLA_IFNAME") in VIP_LINKS}
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_addr(family=family):
            if msg["index"] in vip_links:
                continue
            raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not raw:
                continue
            ip = ipaddress.ip_address(raw)
            if _usable(ip) and not (ip.version == 6 and _link_local(ip)):
                out.append((msg["index"], ip))
    return sorted(out, key=lambda x: (x[1].version, x[0], x[1].packed))


def _primary(ipr: IPRoute, addrs: list[tuple[int, IPAddress]], version: int
             ) -> IPAddress | None:
    """The family's default route's preferred source, else the first address on its
    link, else the family's first global address outside link-local."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    mine = [(idx, ip) for idx, ip in addrs if ip.version == version]
    for r in ipr.get_default_routes(family=family):
        src = r.get_attr("RTA_PREFSRC")
        if src:
            return ipaddress.ip_address(src)
        oif = r.get_attr("RTA_OIF")
        on_link = [ip for idx, ip in mine if idx == oif and not _link_local(ip)]
        if on_link:
            return on_link[0]
    usable = [ip for _, ip in mine if not _link_local(ip)]
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
             cluster_cidrs: Iterable[IPNetwork], masquerade_all: bool,
             masquerade_address: str, cookie: int) -> NodeNet:
    addrs = _addresses(ipr)
    primary = {v: _primary(ipr, addrs, v) for v in (4, 6)}
    fixed = {ip.version: ip for ip in
             (ipaddress.ip_address(a) for a in masquerade_address.split(",") if a)}
    snat = tuple(ip for ip in (fixed.get(v) or primary[v] for v in (4, 6)) if ip is not None)
    every = tuple(dict.fromkeys(ip for _, ip in addrs))
    specs = list(nodeport_addresses)
    if not specs:
        nodeport = every
    else:
        nets = [ipaddress.ip_network(s) for s in specs if s != "primary"]
        chosen = [ip for ip in every if any(ip in n for n in nets if n.version == ip.version)]
        if "primary" in specs:
            chosen += [ip for ip in primary.values() if ip is not None]
        nodeport = tuple(dict.fromkeys(chosen))
    return NodeNet(every, nodeport, snat, tuple(cluster_cidrs), masquerade_all, cookie)


def node_facts(netns: str | None, nodeport_addresses: Iterable[str],
               cluster_cidrs: Iterable[IPNetwork], masquerade_all: bool,
               masquerade_address: str
               ) -> tuple[dict[int, tuple[IPAddress, ...]], dict[int, IPAddress]]:
    """What the rule-based writers follow: the NodePort addresses per family, and
    the masquerade address per family (a family without one is absent)."""
    from controller.netns import open_ipr

    with open_ipr(netns) as ipr:
        net = discover(ipr, nodeport_addresses, cluster_cidrs, masquerade_all,
                       masquerade_address, 0)
    nodeport = {v: tuple(ip for ip in net.nodeport if ip.version == v) for v in (4, 6)}
    return nodeport, {ip.version: ip for ip in net.snat}


class AddressWatcher:
    """Calls ``on_change`` (from its own thread) whenever an address of either family
    is added to or removed from the namespace, a burst of events once."""

    def __init__(self, on_change: Callable[[], None], netns: str | None = None) -> None:
        self.on_change = on_change
        self.netns = netns
        self._stop = threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name="kpr-addresses")
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        if self.netns:
            from controller.netns import setns_thread

            setns_thread(self.netns)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            ready.set()
            while not self._stop.is_set():
                r, _, _ = select.select([sock], [], [], 0.5)
                if not r:
                    continue
                try:
                    while sock.recv(65536, socket.MSG_DONTWAIT):
                        pass
                except BlockingIOError:
                    pass
                except OSError as e:  # ENOBUFS: events lost; we re-read everything anyway
                    log.debug("address events: %s", e)
                try:
                    self.on_change()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("handling an address change failed")
        finally:
            sock.close()
            ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


Facts = tuple[dict[int, tuple[IPAddress, ...]], dict[int, IPAddress]]
"""(NodePort addresses per family, masquerade address per family)."""


def facts_of(cfg: Any) -> Facts:
    """``node_facts`` for a rule-based writer's config (the nftables, iptables and
    IPVS configs share these fields)."""
    return node_facts(cfg.netns, cfg.nodeport_addresses, cfg.cluster_cidrs,
                      cfg.masquerade_all, cfg.masquerade_address)


def log_facts(facts: Facts) -> None:
    """Log what a node address change moved."""
    nodeport, snat = facts
    log.info("node addresses changed: NodePorts on %s; masquerading as %s",
             ",".join(str(ip) for v in (4, 6) for ip in nodeport[v]) or "-",
             ",".join(map(str, snat.values())) or "- (off)")

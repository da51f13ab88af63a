"""What one ServiceEntry becomes in the IPVS datapath: virtual services, addresses on
the dummy link, and elements of kpr's companion nftables table. Pure: no netlink,
no nft.

The layout follows kube-proxy's IPVS mode (pkg/proxy/ipvs, v1.31):

* one IPVS virtual service per ClusterIP, load-balancer IP and externalIP frontend,
  and one per NodePort on each NodePort address; masquerading real servers (the
  NAT forwarding method), weight 1; ClientIP affinity is IPVS persistence with the
  Service's timeout;
* the frontend addresses are bound to a dummy link, ``kpr-ipvs0``, so the node
  accepts their packets and IPVS (at LOCAL_IN, or LOCAL_OUT for the node's own
  connections) translates them; a port no Service defines is refused by the node's
  own stack (an RST, a port unreachable), as for any local address;
* what IPVS cannot say lives in nftables sets, where kube-proxy uses ipsets with
  iptables (both kernel sets; nft sets change element by element in one
  transaction, as ipset does): masquerade decisions, source ranges, "Local policy,
  no local endpoint" drops, and hairpin masquerade.

Two departures, each for a reason:

* Traffic policy Local for external frontends keeps kube-proxy's short-circuit
  (pods and the node use every endpoint): those clients' packets get a firewall
  mark (``twin`` map) and reach a second, fwmark virtual service with the
  cluster-wide endpoints; IPVS looks fwmark services up first. kube-proxy's IPVS
  mode has no such short-circuit for in-cluster clients.
* The masquerade request is a conntrack mark (0x4000 of ``ct mark``), not a packet
  mark, so it never mixes with the firewall marks of the twin services.

Maglev Services use IPVS's own Maglev scheduler (``mh``); others use the configured
scheduler (rr by default, as kube-proxy).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from controller.model import (
    Backend,
    FrontendKind,
    IPAddress,
    IPNetwork,
    Protocol,
    ServiceEntry,
    ServiceFlag,
)

TABLE = "kpr-ipvs"
LINK = "kpr-ipvs0"
MASQ_CT_MARK = 0x4000
FWMARK_BASE = 0x4B500000
"""Firewall marks of the twin services: FWMARK_BASE | a 20-bit id."""
FWMARK_MASK = 0xFFF00000
NAME_MAX = 100
FLAGS_KEPT = ServiceFlag.LOCAL_POLICY | ServiceFlag.AFFINITY | ServiceFlag.HAS_ENDPOINTS | \
    ServiceFlag.MAGLEV
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "mh", "sed", "nq", "fo",
              "ovf")
"""IPVS schedulers (ip_vs_<name> modules, Linux 6.1)."""


def family(version: int) -> str:
    return "ip" if version == 4 else "ip6"


@dataclass(frozen=True, slots=True, order=True)
class VKey:
    """Identity of one IPVS virtual service."""

    version: int
    """4 or 6."""
    protocol: int
    """IPPROTO_TCP/UDP/SCTP; 0 for a fwmark service."""
    addr: str
    """The virtual address ("" for a fwmark service)."""
    port: int
    """The virtual port (0 for a fwmark service)."""
    fwmark: int = 0
    """The firewall mark of a fwmark service."""

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark:#x}/IPv{self.version}"
        host = f"[{self.addr}]" if self.version == 6 else self.addr
        return f"{Protocol(self.protocol).name} {host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VService:
    """One wanted IPVS virtual service."""

    key: VKey
    """Its identity."""
    scheduler: str
    """Scheduler name."""
    timeout: int
    """Persistence timeout in seconds (0: not persistent)."""
    dests: tuple[tuple[str, int], ...]
    """Real servers (address, port), weight 1 each, sorted."""
    draining: tuple[tuple[str, int], ...] = ()
    """Real servers that take no new connection but keep the ones they have
    (weight 0): the entry's draining endpoints (terminating, still serving), sorted.
    A UDP real server among them stays too, so its flows keep it while it serves."""


@dataclass(slots=True)
class Rendered:
    """Everything one entry needs."""

    services: dict[VKey, VService] = field(default_factory=dict)
    """Virtual services owned by this entry."""
    elements: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """nft elements (family, set, element text) this entry holds a reference to."""
    vips: tuple[IPAddress, ...] = ()
    """Addresses this entry needs on the dummy link."""


def fwmark(e: ServiceEntry, taken: set[int]) -> int:
    """A stable firewall mark for an entry's twin service: a hash of its frontend,
    probing on past marks already taken."""
    h = int.from_bytes(hashlib.blake2b(f"{e.frontend}/{int(e.kind)}".encode(),
                                       digest_size=4).digest(), "big") & 0xFFFFF
    while FWMARK_BASE | (h or 1) in taken:
        h = (h + 1) & 0xFFFFF
    return FWMARK_BASE | (h or 1)


def comment(e: ServiceEntry) -> str:
    name = e.name.encode()[:NAME_MAX].decode(errors="ignore").replace('"', "'")
    flags = (e.flags & FLAGS_KEPT).value
    timeout = e.affinity_timeout if e.flags & ServiceFlag.AFFINITY else 0
    return f"{name}|{int(e.kind)}|{flags}|{timeout}"


def _dests(backends: tuple[Backend, ...]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted({(str(b.ip), b.port) for b in backends}))


def render(e: ServiceEntry, nodeport_ips: tuple[IPAddress, ...], scheduler: str,
           masquerade_all: bool, has_cidrs: bool, mark: int = 0) -> Rendered:
    """The objects of one entry. ``nodeport_ips``: this family's NodePort addresses;
    ``mark``: the twin service's firewall mark (external Local frontends with
    cluster-wide endpoints)."""
    f = e.frontend
    v = f.ip.version
    fam = family(v)
    r = Rendered()
    proto = f.protocol.name.lower()
    nodeport = e.kind == FrontendKind.NODE_PORT
    external = e.kind != FrontendKind.CLUSTER_IP
    local = bool(e.flags & ServiceFlag.LOCAL_POLICY)
    sched = "mh" if e.flags & ServiceFlag.MAGLEV else scheduler
    timeout = e.affinity_timeout if e.flags & ServiceFlag.AFFINITY else 0
    key = f"{proto} . {f.port}" if nodeport else f"{f.ip} . {proto} . {f.port}"
    sfx = "-nodeports" if nodeport else ""
    el = r.elements
    el[(fam, f"frontends{sfx}", f'{key} comment "{comment(e)}"')] += 1
    if not nodeport:
        r.vips = (f.ip,)
    cluster = e.cluster_backends if external and local else ()
    if e.backends:
        addrs = nodeport_ips if nodeport else (f.ip,)
        for a in addrs:
            k = VKey(v, int(f.protocol), str(a), f.port)
            r.services[k] = VService(k, sched, timeout, _dests(e.backends),
                                     _dests(e.draining))
    elif local and e.flags & ServiceFlag.HAS_ENDPOINTS:
        el[(fam, f"local-drop{sfx}", key)] += 1
    if cluster and mark:
        k = VKey(v, 0, "", 0, mark)
        r.services[k] = VService(k, sched, timeout, _dests(cluster))
        el[(fam, f"twin{sfx}", f"{key} : {mark:#x}")] += 1
    if e.kind == FrontendKind.LOAD_BALANCER and (e.backends or cluster):
        ranges = [n for n in e.source_ranges if n.version == v]
        if ranges:
            el[(fam, "fw-frontends", key)] += 1
            for n in ranges:
                el[(fam, "fw-allow", f"{key} . {n}")] += 1
    if e.backends or cluster:
        if masquerade_all or (external and not local):
            el[(fam, f"masq{sfx}", key)] += 1
        elif not external and has_cidrs:
            el[(fam, "masq-offcluster", key)] += 1
        for b in (*e.backends, *cluster):
            el[(fam, "loopback", f"{b.ip} . {b.ip}")] += 1
    return r


def addr_type(version: int) -> str:
    return "ipv4_addr" if version == 4 else "ipv6_addr"


def table(version: int, cluster_cidrs: tuple[IPNetwork, ...], nodeport_ips: tuple[IPAddress, ...],
          snat: IPAddress | None) -> list[str]:
    """The companion table of one family, empty of Services (every full sync)."""
    fam = family(version)
    t = f"{fam} {TABLE}"
    at = addr_type(version)
    a = fam
    svc = f"{at} . inet_proto . inet_service"
    np = "inet_proto . inet_service"
    fw = f"{a} daddr . meta l4proto . th dport"
    cidrs = [str(n) for n in cluster_cidrs if n.version == version]
    out = [
        f"add table {t} {{ comment \"kpr: IPVS datapath companion rules (managed)\" ; }}",
        f"add set {t} cluster-cidrs {{ type {at} ; flags interval ; }}",
        f"add set {t} nodeport-ips {{ type {at} ; }}",
        f"add set {t} frontends {{ type {svc} ; }}",
        f"add set {t} frontends-nodeports {{ type {np} ; }}",
        f"add set {t} masq {{ type {svc} ; }}",
        f"add set {t} masq-nodeports {{ type {np} ; }}",
        f"add set {t} masq-offcluster {{ type {svc} ; }}",
        f"add set {t} local-drop {{ type {svc} ; }}",
        f"add set {t} local-drop-nodeports {{ type {np} ; }}",
        f"add map {t} twin {{ type {svc} : mark ; }}",
        f"add map {t} twin-nodeports {{ type {np} : mark ; }}",
        f"add set {t} fw-frontends {{ type {svc} ; }}",
        f"add set {t} fw-allow {{ type {svc} . {at} ; flags interval ; }}",
        f"add set {t} loopback {{ type {at} . {at} ; }}",
        # before IPVS (LOCAL_IN 98 / LOCAL_OUT -98 on this hook order), after conntrack
        f"add chain {t} prerouting {{ type filter hook prerouting priority -110 ; "
        f"policy accept ; }}",
        f"add chain {t} output {{ type route hook output priority -110 ; policy accept ; }}",
        f"add chain {t} mark-masq",
        f"add chain {t} postrouting {{ type nat hook postrouting priority srcnat ; "
        f"policy accept ; }}",
        f"add rule {t} prerouting {fw} @fw-frontends {fw} . {a} saddr != @fw-allow drop",
    ]
    if cidrs:
        out += [f"add element {t} cluster-cidrs {{ {', '.join(cidrs)} }}",
                f"add rule {t} prerouting {a} saddr @cluster-cidrs meta mark set {fw} map @twin",
                f"add rule {t} prerouting {a} saddr @cluster-cidrs {a} daddr @nodeport-ips "
                f"meta mark set meta l4proto . th dport map @twin-nodeports",
                f"add rule {t} prerouting meta mark & {FWMARK_MASK:#x} == {FWMARK_BASE:#x} "
                f"return"]
    out += [
        f"add rule {t} prerouting {fw} @local-drop drop",
        f"add rule {t} prerouting {a} daddr @nodeport-ips meta l4proto . th dport "
        f"@local-drop-nodeports drop",
        f"add rule {t} prerouting jump mark-masq",
        # the node itself: every client is in-cluster (twin), and masqueraded there.
        # IPVS sends the packets it forwards through LOCAL_OUT too (ip_vs_nat_xmit,
        # Linux 6.1): those keep a pod's source and are not the node's own.
        f"add rule {t} output fib saddr type != local return",
        f"add rule {t} output meta mark set {fw} map @twin",
        f"add rule {t} output {a} daddr @nodeport-ips meta mark set meta l4proto . th dport "
        f"map @twin-nodeports",
        f"add rule {t} output meta mark & {FWMARK_MASK:#x} == {FWMARK_BASE:#x} "
        f"ct mark set ct mark or {MASQ_CT_MARK:#x} return",
        f"add rule {t} output jump mark-masq",
        f"add rule {t} mark-masq {fw} @masq ct mark set ct mark or {MASQ_CT_MARK:#x}",
        f"add rule {t} mark-masq {a} daddr @nodeport-ips meta l4proto . th dport "
        f"@masq-nodeports ct mark set ct mark or {MASQ_CT_MARK:#x}",
    ]
    if cidrs:
        out.append(f"add rule {t} mark-masq {a} saddr != @cluster-cidrs {fw} @masq-offcluster "
                   f"ct mark set ct mark or {MASQ_CT_MARK:#x}")
    return out + addresses(version, nodeport_ips, snat, fresh=True)


def addresses(version: int, nodeport_ips: tuple[IPAddress, ...], snat: IPAddress | None,
              fresh: bool = False) -> list[str]:
    """The NodePort addresses and the masquerade rules (they follow the node)."""
    fam = family(version)
    t = f"{fam} {TABLE}"
    out = [] if fresh else [f"flush set {t} nodeport-ips", f"flush chain {t} postrouting"]
    to = f"snat to {snat} fully-random" if snat else "masquerade fully-random"
    out += [f"add rule {t} postrouting ct mark & {MASQ_CT_MARK:#x} == {MASQ_CT_MARK:#x} {to}",
            f"add rule {t} postrouting {fam} saddr . {fam} daddr @loopback {to}"]
    if nodeport_ips:
        out.append(f"add element {t} nodeport-ips {{ {', '.join(map(str, nodeport_ips))} }}")
    return out


def element_commands(changes: dict[tuple[str, str, str], int]) -> list[str]:
    """nft commands for element changes: +1 add, -1 delete (deletes first)."""
    out = [f"delete element {fam} {TABLE} {s} {{ {el.split(' comment ')[0]} }}"
           for (fam, s, el), d in changes.items() if d < 0]
    out += [f"add element {fam} {TABLE} {s} {{ {el} }}"
            for (fam, s, el), d in changes.items() if d > 0]
    return out

"""What one ServiceEntry becomes in kpr's nftables tables, as nft command text.

The layout follows kube-proxy's nftables mode (pkg/proxy/nftables, v1.31), under
kpr's own tables ``ip kpr`` and ``ip6 kpr`` (one per family, identical in shape)::

    map service-ips        addr . proto . port : verdict   ClusterIPs, LB IPs, externalIPs
    map service-nodeports  proto . port : verdict           NodePorts (on @nodeport-ips)
    set cluster-ips        every ClusterIP: its undefined ports are rejected
    set nodeport-ips       the node addresses NodePorts answer on
    set cluster-cidrs      detect-local (--cluster-cidr of this family)
    chain services         the three lookups; jumped to from nat prerouting and output
    chain fe-<H>           one frontend: source ranges, masquerade marks, affinity,
                           then a random choice among its endpoint chains
    chain fe-<H>-c         external Local frontend: the cluster-wide twin (pods, node)
    chain ep-<H>-<B>       one endpoint of one frontend: hairpin mark, affinity
                           update, dnat
    set aff-<H>-<B>        ClientIP affinity: clients that chose this endpoint, with
                           the Service's timeout
    chain nat-postrouting  marked packets are SNATed to the node's masquerade address

A frontend without endpoints maps to ``goto reject-chain`` (REJECT), or ``drop``
when it has endpoints on other nodes only (traffic policy Local), in the same
maps, so a lookup is always one map access.

Two departures from kube-proxy's layout keep a full sync linear in the number of
Services. The kernel checks every jump, goto and verdict-map element for loops by
walking every set of the table (nf_tables_check_loops, kernel 6.18), so a table with
one anonymous ``numgen ... vmap`` per Service and a ``jump mark-for-masquerade`` per
endpoint costs O(Services^2) to load: 41 s for 10,000 Services here. So:

* the endpoint choice is a cascade, ``numgen random mod (N-i) == 0 goto ep_i`` for
  i < N-1, then ``goto ep_N-1`` (iptables' statistic cascade; uniform, and O(N)
  rule evaluations only for a connection's first packet);
* the masquerade mark is set inline (``meta mark set mark or 0x4000``), not in a
  jumped-to chain.

Names are short stable hashes (H of the frontend, B of the backend), so a chain
keeps its name across restarts and a partial sync touches only the chains and
elements of the entries that changed. Each map element carries a comment with
what the rules cannot say (name, kind, flags, affinity timeout), so ``dump()``
reads everything back from the kernel.

This module is pure: it renders text and never runs nft.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.model import (
    Backend,
    FrontendKind,
    IPAddress,
    IPNetwork,
    ServiceEntry,
    ServiceFlag,
)

TABLE = "kpr"
MASQ_MARK = 0x4000
"""The packet mark bit that asks nat-postrouting to masquerade (kube-proxy's)."""
MARK = f"meta mark set mark or {MASQ_MARK:#x}"
"""Mark for masquerade (inline: see the module docstring)."""
NAME_MAX = 100
"""Bytes of the Service name kept in an element comment (nft allows 128)."""
FLAGS_KEPT = (ServiceFlag.LOCAL_POLICY | ServiceFlag.AFFINITY | ServiceFlag.HAS_ENDPOINTS)
"""The flags this datapath implements (no Maglev: kube-proxy's nftables mode has
none either; such Services get numgen random)."""


def family(version: int) -> str:
    """The nft family (and address expression keyword) of an IP version."""
    return "ip" if version == 4 else "ip6"


def addr_type(version: int) -> str:
    return "ipv4_addr" if version == 4 else "ipv6_addr"


def _h(text: str, n: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=n).hexdigest()


def fe_chain(e: ServiceEntry) -> str:
    return f"fe-{_h(str(e.frontend) + '/' + str(int(e.kind)), 6)}"


def ep_chain(fe: str, b: Backend) -> str:
    return f"ep-{fe[3:]}-{_h(str(b), 4)}"


def aff_set(ep: str, timeout: int) -> str:
    """The affinity set of an endpoint chain; the timeout is in the name, so a new
    timeout is a new set (nft cannot change a set's timeout in place)."""
    return f"aff-{ep[3:]}-{timeout}"


def affinity_elements(fam: str, name: str, clients: Iterable[tuple[str, int]]) -> list[str]:
    """Commands putting clients back into an affinity set, each with the seconds it
    had left (``expires`` on add: kernel >= 5.3). The set's timeout is in its name."""
    timeout = int(name.rsplit("-", 1)[1])
    els = [f"{ip} timeout {timeout}s expires {min(left, timeout)}s" for ip, left in clients]
    return [f"add element {fam} {TABLE} {name} {{ {', '.join(els)} }}"] if els else []


def addr(ip: IPAddress) -> str:
    return str(ip)


def hostport(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Node:
    """Node facts the rules depend on (a change needs a full sync)."""

    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """detect-local, both families."""
    masquerade_all: bool = False
    """masqueradeAll."""

    def has_cidrs(self, version: int) -> bool:
        return any(n.version == version for n in self.cluster_cidrs)


@dataclass(slots=True)
class Rendered:
    """The kernel objects of one entry."""

    fam: str
    """nft family: ip or ip6."""
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Chain name -> its rules, in order (every chain is owned by this entry)."""
    sets: dict[str, str] = field(default_factory=dict)
    """Affinity set name -> its declaration body."""
    element: tuple[str, str, str, str] | None = None
    """(map, key, comment, verdict) of its map element."""
    cluster_ip: IPAddress | None = None
    """The ClusterIP (for the cluster-ips set, reference-counted by the writer)."""


def meta_comment(e: ServiceEntry) -> str:
    """What the rules do not say about an entry, for ``dump()``."""
    name = e.name.encode()[:NAME_MAX].decode(errors="ignore").replace('"', "'")
    flags = (e.flags & FLAGS_KEPT).value
    return f"{name}|{int(e.kind)}|{flags}|{e.affinity_timeout if e.flags & ServiceFlag.AFFINITY else 0}"


def render(e: ServiceEntry, node: Node) -> Rendered:
    """The objects of one entry (an entry of either family)."""
    f = e.frontend
    v = f.ip.version
    fam, a = family(v), family(v)
    r = Rendered(fam)
    proto = f.protocol.name.lower()
    external = e.kind != FrontendKind.CLUSTER_IP
    local = bool(e.flags & ServiceFlag.LOCAL_POLICY)
    affinity = bool(e.flags & ServiceFlag.AFFINITY)
    if e.kind == FrontendKind.NODE_PORT:
        mapname, key = "service-nodeports", f"{proto} . {f.port}"
    else:
        mapname, key = "service-ips", f"{addr(f.ip)} . {proto} . {f.port}"
    if e.kind == FrontendKind.CLUSTER_IP:
        r.cluster_ip = f.ip
    comment = meta_comment(e)
    cluster = tuple(Backend(b.ip, b.port) for b in e.cluster_backends) if external and local \
        else ()
    if not e.backends and not cluster:
        # No endpoints anywhere: REJECT; endpoints on other nodes only (Local): DROP.
        verdict = "drop" if local and e.flags & ServiceFlag.HAS_ENDPOINTS else \
            "goto reject-chain"
        r.element = (mapname, key, comment, verdict)
        return r
    fe = fe_chain(e)
    r.element = (mapname, key, comment, f"goto {fe}")

    def endpoint(b: Backend) -> str:
        ep = ep_chain(fe, b)
        if ep in r.chains:
            return ep
        rules = [f"{a} saddr {addr(b.ip)} {MARK}"]  # hairpin
        if affinity:
            s = aff_set(ep, e.affinity_timeout)
            r.sets[s] = (f"type {addr_type(v)} ; flags dynamic,timeout ; "
                         f"timeout {e.affinity_timeout}s ;")
            rules.append(f"update @{s} {{ {a} saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {hostport(b.ip, b.port)}")
        r.chains[ep] = tuple(rules)
        return ep

    def balance(backends: tuple[Backend, ...]) -> list[str]:
        eps = [endpoint(b) for b in backends]
        rules = [f"{a} saddr @{aff_set(ep, e.affinity_timeout)} goto {ep}"
                 for ep in eps] if affinity else []
        n = len(eps)
        rules += [f"numgen random mod {n - i} == 0 goto {ep}" for i, ep in enumerate(eps[:-1])]
        rules.append(f"goto {eps[-1]}")
        return rules

    rules: list[str] = []
    if e.kind == FrontendKind.LOAD_BALANCER:
        ranges = [n for n in e.source_ranges if n.version == v]
        if ranges:
            rules.append(f"{a} saddr != {{ {', '.join(map(str, ranges))} }} drop")
    if node.masquerade_all:
        rules.append(MARK)
    if not external:
        if not node.masquerade_all and node.has_cidrs(v):
            rules.append(f"{a} saddr != @cluster-cidrs {MARK}")
    elif not local:
        rules.append(MARK)
    else:
        # kube-proxy's external chain for Local policy: pods and the node itself use
        # every endpoint (the node masqueraded); other clients the local ones only.
        if cluster:
            twin = f"{fe}-c"
            r.chains[twin] = tuple(balance(cluster))
            if node.has_cidrs(v):
                rules.append(f"{a} saddr @cluster-cidrs goto {twin}")
            rules.append(f"fib saddr type local {MARK}")
            rules.append(f"fib saddr type local goto {twin}")
    rules += balance(tuple(Backend(b.ip, b.port) for b in e.backends)) if e.backends \
        else ["drop"]
    r.chains[fe] = tuple(rules)
    return r


def base(fam: str, version: int, node: Node, nodeport_ips: tuple[IPAddress, ...],
         snat: IPAddress | None) -> list[str]:
    """The table skeleton of one family, created by every full sync."""
    t = f"{fam} {TABLE}"
    at = addr_type(version)
    a = fam
    # TCP gets an RST, everything else a port unreachable. kube-proxy sends ICMP for
    # TCP too, but a client pod on this node gets that ICMP while its connect()
    # still holds the socket, and its kernel drops it (TcpExtLockDroppedIcmps,
    # kernel 6.18, both families for an error sent by the node's stack): the
    # connect then waits a second for the SYN's retransmission. An RST is queued
    # to the socket instead and refuses the connect at once; it is also not
    # subject to the node's ICMP rate limit (net.ipv4.icmp_ratelimit).
    reject = ["meta l4proto tcp reject with tcp reset",
              "reject" if version == 4 else "reject with icmpv6 port-unreachable"]
    out = [
        f"add table {t} {{ comment \"kpr: Service proxy rules (managed, do not edit)\" ; }}",
        f"add set {t} cluster-ips {{ type {at} ; }}",
        f"add set {t} nodeport-ips {{ type {at} ; }}",
        f"add set {t} cluster-cidrs {{ type {at} ; flags interval ; }}",
        f"add map {t} service-ips {{ type {at} . inet_proto . inet_service : verdict ; }}",
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}",
        f"add chain {t} reject-chain",
        *(f"add rule {t} reject-chain {r}" for r in reject),
        f"add chain {t} services",
        f"add rule {t} services {a} daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services {a} daddr @nodeport-ips meta l4proto . th dport "
        f"vmap @service-nodeports",
        f"add rule {t} services {a} daddr @cluster-ips goto reject-chain",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; "
        f"policy accept ; }}",
        f"add rule {t} nat-prerouting jump services",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; policy accept ; }}",
        f"add rule {t} nat-output jump services",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; "
        f"policy accept ; }}",
    ]
    cidrs = [str(n) for n in node.cluster_cidrs if n.version == version]
    if cidrs:
        out.append(f"add element {t} cluster-cidrs {{ {', '.join(cidrs)} }}")
    return out + addresses(fam, nodeport_ips, snat, fresh=True)


def addresses(fam: str, nodeport_ips: tuple[IPAddress, ...], snat: IPAddress | None,
              fresh: bool = False) -> list[str]:
    """The objects that follow the node's addresses: the NodePort addresses and the
    masquerade rule. ``fresh=False`` replaces what a previous call wrote."""
    t = f"{fam} {TABLE}"
    out = [] if fresh else [f"flush set {t} nodeport-ips", f"flush chain {t} nat-postrouting"]
    out += [
        f"add rule {t} nat-postrouting meta mark & {MASQ_MARK:#x} == 0 return",
        f"add rule {t} nat-postrouting meta mark set mark xor {MASQ_MARK:#x}",
        f"add rule {t} nat-postrouting " + (f"snat to {snat} fully-random" if snat
                                             else "masquerade fully-random"),
    ]
    if nodeport_ips:
        out.append(f"add element {t} nodeport-ips {{ {', '.join(map(str, nodeport_ips))} }}")
    return out


def create(r: Rendered) -> list[str]:
    """Commands creating an entry's objects from nothing."""
    return change(None, r)


def change(old: Rendered | None, new: Rendered | None) -> list[str]:
    """Commands turning one entry's objects from ``old`` into ``new`` (either may be
    None), in an order every intermediate step of which nft accepts: sets and chains
    exist before rules use them, rules stop using chains before those are deleted."""
    fam = (new or old).fam  # type: ignore[union-attr]
    t = f"{fam} {TABLE}"
    o_ch = old.chains if old else {}
    n_ch = new.chains if new else {}
    o_sets = old.sets if old else {}
    n_sets = new.sets if new else {}
    out = [f"add set {t} {s} {{ {body} }}" for s, body in n_sets.items() if s not in o_sets]
    out += [f"add chain {t} {c}" for c in n_ch if c not in o_ch]
    for c, rules in n_ch.items():
        if o_ch.get(c) == rules:
            continue
        if c in o_ch:
            out.append(f"flush chain {t} {c}")
        out += [f"add rule {t} {c} {rule}" for rule in rules]
    o_el = old.element if old else None
    n_el = new.element if new else None
    if o_el != n_el:
        if o_el:
            out.append(f"delete element {t} {o_el[0]} {{ {o_el[1]} }}")
        if n_el:
            out.append(f"add element {t} {n_el[0]} {{ {n_el[1]} comment \"{n_el[2]}\" : "
                       f"{n_el[3]} }}")
    gone = [c for c in o_ch if c not in n_ch]
    # frontend chains first: they hold the references to endpoint chains
    gone.sort(key=lambda c: (c.startswith("ep-"), c))
    out += [f"flush chain {t} {c}" for c in gone]
    out += [f"delete chain {t} {c}" for c in gone]
    out += [f"delete set {t} {s}" for s in o_sets if s not in n_sets]
    return out

"""What one ServiceEntry becomes in iptables, as ``iptables-restore`` text.

The layout is kube-proxy's iptables mode (pkg/proxy/iptables, v1.31) under kpr's own
chain names, the same in both families (iptables and ip6tables)::

    nat    PREROUTING, OUTPUT  -> KPR-SERVICES
           KPR-SERVICES        -> KPR-FRONTENDS, then per NodePort address -> KPR-NODEPORTS
           KPR-FRONTENDS       one rule per ClusterIP / LB IP / externalIP frontend
           KPR-NODEPORTS       one rule per NodePort
           KPR-SVC-<H>         one frontend: masquerade marks, affinity, then a
                               statistic cascade over its endpoint chains
           KPR-SVX-<H>         external Local frontend: the cluster-wide twin
           KPR-FW-<H>          loadBalancerSourceRanges (RETURN if inside, else mark drop)
           KPR-SEP-<H>         one endpoint of one frontend: hairpin mark, affinity, DNAT
           KPR-MARK-MASQ/-DROP set the masquerade (0x4000) / drop (0x8000) mark
           KPR-MARK-NONLOCAL   mark masquerade unless the source is in --cluster-cidr
           POSTROUTING         -> KPR-POSTROUTING: masquerade marked packets
    filter INPUT, FORWARD, OUTPUT (new connections) -> KPR-FILTER
           KPR-FILTER          drop marked packets; skip DNATed ones; then
                               KPR-NOEP (frontends without endpoints: REJECT or DROP),
                               KPR-NOEP-NP per NodePort address, KPR-CLUSTER-IPS
                               (undefined ports of a ClusterIP: REJECT)

Departures from kube-proxy, each for a reason:

* The filter chains run only for connections that were not DNATed (``--ctstate
  DNAT -j RETURN``): kube-proxy walks its filter KUBE-SERVICES (one rule per Service
  without endpoints) for every new connection, proxied or not.
* ClusterIP ports that no Service defines are rejected (KPR-CLUSTER-IPS), as
  kube-proxy's nftables mode does; its iptables mode lets them leave by the default
  route.
* TCP is rejected with an RST, not ICMP (render.py of nftables explains why).
* Frontends live in KPR-FRONTENDS, not in KPR-SERVICES beside the NodePort jumps, so
  a partial sync adds and deletes single rules (``-A``/``-D``) and never rewrites a
  chain of every Service, as kube-proxy's KUBE-SERVICES rewrite does.

The nat table cannot DROP (iptables refuses the target there), so source ranges and
"Local policy, no local endpoint" mark the packet 0x8000 and KPR-FILTER drops it, as
kube-proxy's KUBE-MARK-DROP did.

Names are stable hashes (H of the frontend and its kind, of the backend too for
KPR-SEP), at most 28 characters (XT_EXTENSION_MAXNAMELEN). Each frontend's rule in
KPR-FRONTENDS/KPR-NODEPORTS/KPR-NOEP carries a comment ``name|kind|flags|timeout``,
so ``dump()`` reads everything back from the kernel.

Affinity uses the ``recent`` match, as kube-proxy does. Its lists hold 100 addresses
each by default (xt_recent's ip_list_tot, a module parameter: with a built-in
xt_recent only the kernel command line ``xt_recent.ip_list_tot=N`` changes it); the
oldest client then loses its affinity.

This module is pure: it renders text and never runs iptables.
"""

from __future__ import annotations

import hashlib
import ipaddress
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

MASQ_MARK = 0x4000
"""Asks KPR-POSTROUTING to masquerade (kube-proxy's bit)."""
DROP_MARK = 0x8000
"""Asks KPR-FILTER to drop (kube-proxy's KUBE-MARK-DROP bit)."""
NAME_MAX = 100
"""Bytes of the Service name kept in a comment (xt_comment allows 255)."""
FLAGS_KEPT = ServiceFlag.LOCAL_POLICY | ServiceFlag.AFFINITY | ServiceFlag.HAS_ENDPOINTS
"""The flags this datapath implements (no Maglev, as in kube-proxy's iptables mode:
such Services get the random cascade)."""

SERVICES = "KPR-SERVICES"
FRONTENDS = "KPR-FRONTENDS"
NODEPORTS = "KPR-NODEPORTS"
POSTROUTING = "KPR-POSTROUTING"
MARK_MASQ = "KPR-MARK-MASQ"
MARK_DROP = "KPR-MARK-DROP"
MARK_NONLOCAL = "KPR-MARK-NONLOCAL"
FILTER = "KPR-FILTER"
NOEP = "KPR-NOEP"
NOEP_NP = "KPR-NOEP-NP"
CLUSTER_IPS = "KPR-CLUSTER-IPS"
PREFIX = "KPR-"

STATIC = {
    "nat": (SERVICES, FRONTENDS, NODEPORTS, POSTROUTING, MARK_MASQ, MARK_DROP, MARK_NONLOCAL),
    "filter": (FILTER, NOEP, NOEP_NP, CLUSTER_IPS),
}
"""Chains every full sync creates, per table."""

HOOKS = {
    "nat": (("PREROUTING", f'-m comment --comment "kpr service portals" -j {SERVICES}'),
            ("OUTPUT", f'-m comment --comment "kpr service portals" -j {SERVICES}'),
            ("POSTROUTING", f'-m comment --comment "kpr postrouting" -j {POSTROUTING}')),
    "filter": tuple((c, f'-m conntrack --ctstate NEW -m comment --comment "kpr filter" '
                        f'-j {FILTER}') for c in ("INPUT", "FORWARD", "OUTPUT")),
}
"""The rules kpr places first in the built-in chains (table -> (chain, rule))."""


def _h(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest().upper()


def fe_key(e: ServiceEntry) -> str:
    return f"{e.frontend}/{int(e.kind)}"


def svc_chain(e: ServiceEntry) -> str:
    return f"KPR-SVC-{_h(fe_key(e))}"


def sep_chain(e: ServiceEntry, b: Backend) -> str:
    return f"KPR-SEP-{_h(fe_key(e) + '>' + str(b))}"


def host(ip: IPAddress | IPNetwork) -> str:
    """An address as a match (-s/-d), with its prefix length."""
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return f"{ip}/{ip.max_prefixlen}"
    return str(ip)


def hostport(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def proto_match(p: Protocol, port: int) -> str:
    name = p.name.lower()
    return f"-p {name} -m {name} --dport {port}"


def comment(e: ServiceEntry) -> str:
    """What the rules do not say about an entry, for ``dump()``."""
    name = e.name.encode()[:NAME_MAX].decode(errors="ignore").replace('"', "'")
    name = name.replace(" ", "_")
    flags = (e.flags & FLAGS_KEPT).value
    timeout = e.affinity_timeout if e.flags & ServiceFlag.AFFINITY else 0
    return f'-m comment --comment "{name}|{int(e.kind)}|{flags}|{timeout}"'


def reject(version: int, proto: Protocol | None) -> str:
    """The REJECT target: an RST for TCP, a port unreachable otherwise."""
    if proto == Protocol.TCP:
        return "-j REJECT --reject-with tcp-reset"
    return "-j REJECT --reject-with " + ("icmp-port-unreachable" if version == 4
                                         else "icmp6-port-unreachable")


@dataclass(frozen=True, slots=True)
class Node:
    """Node facts the rules depend on (a change needs a full sync)."""

    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """detect-local, both families."""
    masquerade_all: bool = False
    """masqueradeAll."""

    def cidrs(self, version: int) -> list[IPNetwork]:
        return [n for n in self.cluster_cidrs if n.version == version]


@dataclass(slots=True)
class Rendered:
    """The iptables objects of one entry."""

    version: int
    """4 (iptables) or 6 (ip6tables)."""
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """nat chains owned by this entry -> their rules (arguments after ``-A chain``)."""
    rule: tuple[str, str, str] | None = None
    """(table, shared chain, rule) that sends the frontend's traffic to its chain,
    or rejects / drops it."""
    cluster_ip: IPAddress | None = None
    """The ClusterIP (its undefined ports are rejected; reference-counted)."""


def render(e: ServiceEntry, node: Node) -> Rendered:
    """The objects of one entry (either family)."""
    f = e.frontend
    v = f.ip.version
    r = Rendered(v)
    external = e.kind != FrontendKind.CLUSTER_IP
    local = bool(e.flags & ServiceFlag.LOCAL_POLICY)
    affinity = bool(e.flags & ServiceFlag.AFFINITY)
    nodeport = e.kind == FrontendKind.NODE_PORT
    if e.kind == FrontendKind.CLUSTER_IP:
        r.cluster_ip = f.ip
    match = proto_match(f.protocol, f.port)
    if not nodeport:
        match = f"-d {host(f.ip)} {match}"
    cluster = tuple(Backend(b.ip, b.port) for b in e.cluster_backends) if external and local \
        else ()
    if not e.backends and not cluster:
        # No endpoints anywhere: REJECT; endpoints on other nodes only (Local): DROP.
        verdict = "-j DROP" if local and e.flags & ServiceFlag.HAS_ENDPOINTS else \
            reject(v, f.protocol)
        r.rule = ("filter", NOEP_NP if nodeport else NOEP, f"{match} {comment(e)} {verdict}")
        return r
    svc = svc_chain(e)
    r.rule = ("nat", NODEPORTS if nodeport else FRONTENDS, f"{match} {comment(e)} -j {svc}")
    proto = f.protocol.name.lower()

    def endpoint(b: Backend) -> str:
        sep = sep_chain(e, b)
        if sep in r.chains:
            return sep
        rules = [f"-s {host(b.ip)} -j {MARK_MASQ}"]  # hairpin
        if affinity:
            rules.append(f"-m recent --set --name {sep} --mask {_full_mask(v)} --rsource")
        rules.append(f"-p {proto} -m {proto} -j DNAT --to-destination "
                     f"{hostport(b.ip, b.port)}")
        r.chains[sep] = tuple(rules)
        return sep

    def balance(backends: tuple[Backend, ...]) -> list[str]:
        seps = [endpoint(b) for b in backends]
        rules = [f"-m recent --rcheck --seconds {e.affinity_timeout} --reap --name {sep} "
                 f"--mask {_full_mask(v)} --rsource -j {sep}" for sep in seps] \
            if affinity else []
        n = len(seps)
        rules += [f"-m statistic --mode random --probability {1 / (n - i):.11f} -j {sep}"
                  for i, sep in enumerate(seps[:-1])]
        rules.append(f"-j {seps[-1]}")
        return rules

    rules: list[str] = []
    if e.kind == FrontendKind.LOAD_BALANCER:
        ranges = [n for n in e.source_ranges if n.version == v]
        if ranges:
            fw = f"KPR-FW-{svc[8:]}"
            r.chains[fw] = (*(f"-s {n} -j RETURN" for n in ranges), f"-j {MARK_DROP}")
            rules.append(f"-j {fw}")
    if node.masquerade_all:
        rules.append(f"-j {MARK_MASQ}")
    if not external:
        if not node.masquerade_all and node.cidrs(v):
            rules.append(f"-j {MARK_NONLOCAL}")
    elif not local:
        rules.append(f"-j {MARK_MASQ}")
    elif cluster:
        # kube-proxy's external chain for Local policy: pods and the node itself use
        # every endpoint (the node masqueraded); other clients the local ones only.
        twin = f"KPR-SVX-{svc[8:]}"
        r.chains[twin] = tuple(balance(cluster))
        rules += [f"-s {n} -j {twin}" for n in node.cidrs(v)]
        rules.append(f"-m addrtype --src-type LOCAL -j {MARK_MASQ}")
        rules.append(f"-m addrtype --src-type LOCAL -j {twin}")
    rules += balance(tuple(Backend(b.ip, b.port) for b in e.backends)) if e.backends \
        else [f"-j {MARK_DROP}"]
    r.chains[svc] = tuple(rules)
    return r


def _full_mask(version: int) -> str:
    return "255.255.255.255" if version == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def static_rules(version: int, node: Node, nodeport_ips: tuple[IPAddress, ...],
                 snat: IPAddress | None) -> dict[str, dict[str, list[str]]]:
    """The rules of the static chains (table -> chain -> rules)."""
    nat: dict[str, list[str]] = {c: [] for c in STATIC["nat"]}
    flt: dict[str, list[str]] = {c: [] for c in STATIC["filter"]}
    nat[MARK_MASQ] = [f"-j MARK --set-xmark {MASQ_MARK:#x}/{MASQ_MARK:#x}"]
    nat[MARK_DROP] = [f"-j MARK --set-xmark {DROP_MARK:#x}/{DROP_MARK:#x}"]
    nat[MARK_NONLOCAL] = [*(f"-s {n} -j RETURN" for n in node.cidrs(version)),
                          f"-j {MARK_MASQ}"]
    addr = addresses(version, nodeport_ips, snat)
    nat[SERVICES] = addr[SERVICES]
    nat[POSTROUTING] = addr[POSTROUTING]
    flt[FILTER] = addr[FILTER]
    return {"nat": nat, "filter": flt}


def addresses(version: int, nodeport_ips: tuple[IPAddress, ...],
              snat: IPAddress | None) -> dict[str, list[str]]:
    """The chains that follow the node's addresses (rewritten whole when they change):
    the NodePort jumps and the masquerade rule."""
    nat_target = f"-j SNAT --to-source {snat} --random-fully" if snat else \
        "-j MASQUERADE --random-fully"
    return {
        SERVICES: [f"-j {FRONTENDS}", *(f"-d {host(ip)} -j {NODEPORTS}" for ip in nodeport_ips)],
        POSTROUTING: [f"-m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN",
                      f"-j MARK --xor-mark {MASQ_MARK:#x}",
                      nat_target],
        FILTER: [f"-m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP",
                 "-m conntrack --ctstate DNAT -j RETURN",
                 f"-j {NOEP}",
                 *(f"-d {host(ip)} -j {NOEP_NP}" for ip in nodeport_ips),
                 f"-j {CLUSTER_IPS}"],
    }


def cluster_ip_rules(ip: IPAddress) -> list[str]:
    """KPR-CLUSTER-IPS rules of one ClusterIP: any port no Service defines is refused."""
    return [f"-d {host(ip)} -p tcp {reject(ip.version, Protocol.TCP)}",
            f"-d {host(ip)} {reject(ip.version, None)}"]


class Restore:
    """One ``iptables-restore --noflush`` input: per table, chain declarations
    (which create or flush a chain), then rule deletions, additions, and chain
    deletions, in that order, so every step is valid when iptables applies it.

    Each table is its own commit (iptables-legacy replaces one table at a time), so
    the tables' order matters to a packet that arrives between two: ``nat`` is
    written before ``filter``, and removed after it (``removing=True``). Otherwise,
    in a switch to or from IPVS, KPR-CLUSTER-IPS would refuse the ClusterIP
    packets that IPVS, not kpr's DNAT, was about to take."""

    def __init__(self, removing: bool = False) -> None:
        self.order = ("filter", "nat") if removing else ("nat", "filter")
        self.declare: dict[str, list[str]] = {"nat": [], "filter": []}
        self.delete: dict[str, list[str]] = {"nat": [], "filter": []}
        self.add: dict[str, list[str]] = {"nat": [], "filter": []}
        self.remove: dict[str, list[str]] = {"nat": [], "filter": []}

    def __len__(self) -> int:
        return sum(len(x[t]) for x in (self.declare, self.delete, self.add, self.remove)
                   for t in ("nat", "filter"))

    def chain(self, table: str, name: str, rules: tuple[str, ...] | list[str]) -> None:
        """Create or replace a chain with these rules."""
        self.declare[table].append(name)
        self.add[table] += [f"-A {name} {rule}" for rule in rules]

    def text(self) -> str:
        out: list[str] = []
        for t in self.order:
            body = [f":{c} - [0:0]" for c in dict.fromkeys(self.declare[t])]
            body += self.delete[t] + self.add[t] + [f"-X {c}" for c in self.remove[t]]
            if body:
                out += [f"*{t}", *body, "COMMIT"]
        return "\n".join(out) + "\n" if out else ""


def change(old: Rendered | None, new: Rendered | None, out: Restore) -> None:
    """Add to ``out`` what turns one entry's objects from ``old`` into ``new``
    (either may be None)."""
    o_ch = old.chains if old else {}
    n_ch = new.chains if new else {}
    for c, rules in n_ch.items():
        if o_ch.get(c) != rules:
            out.chain("nat", c, rules)
    o_rule = old.rule if old else None
    n_rule = new.rule if new else None
    if o_rule != n_rule:
        if o_rule:
            out.delete[o_rule[0]].append(f"-D {o_rule[1]} {o_rule[2]}")
        if n_rule:
            out.add[n_rule[0]].append(f"-A {n_rule[1]} {n_rule[2]}")
    gone = [c for c in o_ch if c not in n_ch]
    out.declare["nat"] += gone  # flushed first, so no chain references another
    out.remove["nat"] += gone

"""The nftables datapath: kube-proxy's nftables mode, as kpr's own tables.

Every sync is one ``nft -f -`` transaction: atomic, all or nothing.

* A full sync replaces both tables whole (``add table``, ``delete table``, then
  everything, in one transaction: no packet ever sees a half-built table). It is
  the first sync, the periodic repair, and the recovery after any failure.
* A partial sync sends only the commands that turn the changed entries' objects
  into their new form (render.change): their chains, map elements and affinity
  sets. It never lists the ruleset; the writer's shadow (what it last committed)
  says what exists. That listing is what makes kube-proxy's nftables mode slow at
  tens of thousands of Services.

A failed transaction changes nothing in the kernel (nft's atomicity), but the
shadow is no longer trusted: the next sync must be a full one (DatapathError).

``dump()`` reads the kernel (``nft -j list table``) back into the model: backends
from the dnat statements of the endpoint chains, source ranges from the drop
rule, the rest from each element's comment.

A sync that removes a UDP endpoint deletes its flows from conntrack
(controller/datapaths/flows.py), so they move to a live endpoint.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.datapaths import node
from controller.datapaths.base import DatapathError, Probe, SyncResult
from controller.datapaths.base import canonical_entry as shared_canonical
from controller.datapaths.flows import UdpFlows
from controller.datapaths.nftables import render
from controller.model import (
    Backend,
    Diff,
    Frontend,
    FrontendKind,
    IPNetwork,
    Protocol,
    ServiceEntry,
    ServiceFlag,
    State,
)

log = logging.getLogger(__name__)

FAMILIES = ((4, "ip"), (6, "ip6"))
MIN_NFT = (1, 0, 1)
MIN_KERNEL = (5, 13)


@dataclass(frozen=True, slots=True)
class NftablesConfig:
    """Settings of the nftables datapath."""

    netns: str | None = None
    """Named network namespace to program (None: the process's own)."""
    nodeport_addresses: tuple[str, ...] = ()
    """--nodeport-addresses: CIDRs and/or "primary"; empty: every node address."""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """--cluster-cidr: detect-local, per family."""
    masquerade_all: bool = False
    """masqueradeAll."""
    masquerade_address: str = ""
    """Node addresses to SNAT masqueraded traffic to, one per family; a family
    without one uses its primary address."""


def canonical_entry(e: ServiceEntry) -> ServiceEntry:
    """What ``dump()`` returns for an entry once programmed."""
    return shared_canonical(e, e.name.encode()[:render.NAME_MAX].decode(errors="ignore").replace('"', "'"), render.FLAGS_KEPT, collapse_ranges=True)


def _unsupported(e: ServiceEntry) -> str:
    return "sctp" if e.frontend.protocol == Protocol.SCTP else ""


class NftablesDatapath:
    """kpr's ``ip kpr`` and ``ip6 kpr`` tables."""

    name = "nftables"

    def __init__(self, cfg: NftablesConfig) -> None:
        self.cfg = cfg
        self.node = render.Node(tuple(cfg.cluster_cidrs), cfg.masquerade_all)
        self._shadow: dict[Frontend, render.Rendered] = {}
        self._flows = UdpFlows(cfg.netns)
        self._vips: dict[Any, int] = {}  # ClusterIP -> entries using it
        self.unprogrammed: dict[Frontend, str] = {}
        """Frontends skipped, with the reason (exported as a metric)."""
        self._lock = threading.Lock()  # syncs and address changes (watcher thread)
        self._addrs: Any = None  # (nodeport, snat) last written; None: no tables yet
        self._watcher: Any = None

    # ----- running nft ----------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        pre = ["nsenter", f"--net=/run/netns/{self.cfg.netns}"] if self.cfg.netns else []
        return [*pre, "nft", *args]

    def _run(self, commands: list[str], check_only: bool = False) -> None:
        if not commands:
            return
        text = "\n".join(commands) + "\n"
        argv = self._argv("-c", "-f", "-") if check_only else self._argv("-f", "-")
        p = subprocess.run(argv, input=text, capture_output=True, text=True)
        if p.returncode != 0:
            err = p.stderr.strip()
            raise DatapathError(f"nft transaction of {len(commands)} commands failed: "
                                f"{err[:4000]}")

    def _list(self, fam: str) -> list[dict[str, Any]]:
        p = subprocess.run(self._argv("-j", "list", "table", fam, render.TABLE),
                           capture_output=True, text=True)
        if p.returncode != 0:
            if "No such file" in p.stderr:
                return []
            raise DatapathError(f"nft list table {fam} {render.TABLE}: {p.stderr.strip()}")
        objs: list[dict[str, Any]] = json.loads(p.stdout)["nftables"]
        return objs

    # ----- protocol -------------------------------------------------------------------

    def probe(self) -> Probe:
        nft = shutil.which("nft")
        if nft is None:
            return Probe(False, "the nft command is missing (Debian: nftables)")
        p = subprocess.run([nft, "--version"], capture_output=True, text=True)
        m = re.search(r"v(\d+)\.(\d+)\.(\d+)", p.stdout)
        if not m or tuple(map(int, m.groups())) < MIN_NFT:
            return Probe(False, f"nft {m.group(0) if m else '?'} is older than "
                                f"{'.'.join(map(str, MIN_NFT))}")
        rel = os.uname().release
        km = re.match(r"(\d+)\.(\d+)", rel)
        if not km or tuple(map(int, km.groups())) < MIN_KERNEL:
            return Probe(False, f"kernel {rel} is older than "
                                f"{'.'.join(map(str, MIN_KERNEL))}")
        try:  # the kernel accepts what we use (numgen, vmaps, concatenations)?
            self._run(render.base("ip", 4, self.node, (), None) +
                      [f"delete table ip {render.TABLE}"], check_only=True)
        except (DatapathError, OSError) as e:
            return Probe(False, f"nftables check failed: {e}")
        return Probe(True, f"nft {m.group(0)}, kernel {rel}")

    def start(self) -> None:
        """Watch the node's addresses; the first (full) sync creates the tables."""
        if self._watcher is None:
            self._watcher = node.AddressWatcher(self.refresh_node, self.cfg.netns)

    def refresh_node(self) -> None:
        """Rewrite the NodePort addresses and the masquerade rule if the node's
        addresses changed (one small transaction; services are untouched)."""
        with self._lock:
            if self._addrs is None:
                return
            try:
                facts = node.facts_of(self.cfg)
                if facts == self._addrs:
                    return
                nodeport, snat = facts
                self._run([c for v, fam in FAMILIES
                           for c in render.addresses(fam, nodeport[v], snat.get(v))])
            except (DatapathError, OSError) as e:
                log.warning("nftables datapath: updating node addresses failed: %s", e)
                return
            self._addrs = facts
            node.log_facts(facts)


    def _render(self, e: ServiceEntry) -> render.Rendered | None:
        reason = _unsupported(e)
        if reason:
            if self.unprogrammed.get(e.frontend) != reason:
                log.warning("nftables datapath: %s (%s) not programmed: %s", e.frontend,
                            e.name, reason)
            self.unprogrammed[e.frontend] = reason
            return None
        self.unprogrammed.pop(e.frontend, None)
        return render.render(e, self.node)

    def _vip_ref(self, r: render.Rendered | None, delta: int, out: list[str]) -> None:
        if r is None or r.cluster_ip is None:
            return
        ip = r.cluster_ip
        n = self._vips.get(ip, 0) + delta
        t = f"{r.fam} {render.TABLE}"
        if n <= 0:
            self._vips.pop(ip, None)
            out.append(f"delete element {t} cluster-ips {{ {ip} }}")
        else:
            if ip not in self._vips:
                out.append(f"add element {t} cluster-ips {{ {ip} }}")
            self._vips[ip] = n

    def sync(self, state: State, diff: Diff | None) -> SyncResult:
        with self._lock:
            if diff is None:
                return self._full(state)
            return self._partial(diff)

    def _partial(self, diff: Diff) -> SyncResult:
        out: list[str] = []
        shadow = dict(self._shadow)
        vips = dict(self._vips)
        changes: list[tuple[Frontend, ServiceEntry | None]] = \
            [(f, None) for f in diff.removed] + [(e.frontend, e) for e in diff.upserted]
        for f, e in changes:
            old = shadow.get(f)
            new = self._render(e) if e is not None else None
            if e is None:
                self.unprogrammed.pop(f, None)
            if old is None and new is None:
                continue
            self._vip_ref(new, +1, out)
            out += render.change(old, new)
            self._vip_ref(old, -1, out)
            if new is None:
                shadow.pop(f, None)
            else:
                shadow[f] = new
        try:
            self._run(out)
        except (DatapathError, OSError) as e:
            self._vips = vips
            raise DatapathError(str(e)) from e
        self._shadow = shadow
        self._flows.changed(changes)
        return SyncResult(full=False, ops=len(out), frontends=len(self._shadow))

    def _full(self, state: State) -> SyncResult:
        facts = node.facts_of(self.cfg)
        nodeport, snat = facts
        out: list[str] = []
        for v, fam in FAMILIES:
            out += [f"add table {fam} {render.TABLE}", f"delete table {fam} {render.TABLE}"]
            out += render.base(fam, v, self.node, nodeport[v], snat.get(v))
        shadow: dict[Frontend, render.Rendered] = {}
        self._vips = {}
        self.unprogrammed = {}
        clients = self._affinity_clients()
        for e in state.values():
            r = self._render(e)
            if r is None:
                continue
            shadow[e.frontend] = r
            self._vip_ref(r, +1, out)
            out += render.create(r)
            for name in r.sets:
                out += render.affinity_elements(r.fam, name, clients.get((r.fam, name), ()))
        self._shadow = {}
        try:
            self._run(out)
        except (DatapathError, OSError) as e:
            self._vips = {}
            raise DatapathError(str(e)) from e
        self._shadow = shadow
        self._flows.reset(state.values())
        self._addrs = facts
        return SyncResult(full=True, ops=len(out), frontends=len(shadow))

    def _affinity_clients(self) -> dict[tuple[str, str], list[tuple[str, int]]]:
        """(family, affinity set) -> its clients with seconds left to their expiry.

        A full sync replaces the tables, affinity sets included; it adds these back
        in the same transaction, so ClientIP affinity outlives it (as it outlives
        kube-proxy's full syncs, which flush chains but not sets). Clients that a
        packet adds between this listing and the transaction are lost: they choose
        afresh once. ``list sets`` also lists other tables' sets (nft 1.0.6 ignores
        ``table`` there), and never maps: kpr's big maps are not read."""
        out: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for _, fam in FAMILIES:
            p = subprocess.run(self._argv("-j", "list", "sets", fam),
                               capture_output=True, text=True)
            if p.returncode != 0:
                log.warning("nftables datapath: cannot read affinity sets (%s): %s",
                            fam, p.stderr.strip()[:200])
                continue
            for o in json.loads(p.stdout)["nftables"]:
                body = o.get("set")
                if not body or body.get("table") != render.TABLE or \
                        not str(body.get("name", "")).startswith("aff-"):
                    continue
                for el in body.get("elem", []):
                    el = el.get("elem", el) if isinstance(el, dict) else el
                    if isinstance(el, dict) and isinstance(el.get("val"), str) \
                            and el.get("expires"):
                        out.setdefault((fam, body["name"]), []).append(
                            (el["val"], int(el["expires"])))
        return out

    def canonical(self, state: Iterable[ServiceEntry]) -> State:
        """The State ``dump()`` returns once ``state`` is programmed."""
        return State(canonical_entry(e) for e in state if not _unsupported(e))

    def tables(self) -> list[str]:
        """The families whose kpr table exists."""
        return [fam for _, fam in FAMILIES if self._list(fam)]

    def dump(self) -> State:
        entries: list[ServiceEntry] = []
        for v, fam in FAMILIES:
            entries += _parse_table(self._list(fam), v)
        return State(entries)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def cleanup(self) -> None:
        self.close()
        cleanup(self.cfg.netns)


def installed(netns: str | None = None) -> bool:
    """Whether kpr's nftables tables are in place (read-only; False without nft)."""
    pre = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    if shutil.which("nft") is None:
        return False
    return any(subprocess.run([*pre, "nft", "list", "table", fam, render.TABLE],
                              capture_output=True, text=True).returncode == 0
               for _, fam in FAMILIES)


def cleanup(netns: str | None = None) -> int:
    """Delete kpr's nftables tables (idempotent); returns how many existed."""
    pre = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    if shutil.which("nft") is None:
        return 0
    removed = 0
    for _, fam in FAMILIES:
        p = subprocess.run([*pre, "nft", "delete", "table", fam, render.TABLE],
                           capture_output=True, text=True)
        removed += p.returncode == 0
    return removed


# ----- reading the tables back -----------------------------------------------------------

def _targets(expr: Any) -> list[str]:
    """Chain names a statement jumps or goes to (goto, or a numgen vmap)."""
    if isinstance(expr, dict):
        if "goto" in expr:
            return [expr["goto"]["target"]]
        if "jump" in expr:
            return [expr["jump"]["target"]]
        out: list[str] = []
        for v in expr.values():
            out += _targets(v)
        return out
    if isinstance(expr, list):
        out = []
        for v in expr:
            out += _targets(v)
        return out
    return []


def _dnat(rules: list[list[dict[str, Any]]]) -> Backend | None:
    for rule in rules:
        for st in rule:
            if "dnat" in st:
                d = st["dnat"]
                return Backend(ipaddress.ip_address(d["addr"]), int(d["port"]))
    return None


def _prefixes(right: Any) -> list[IPNetwork]:
    """The networks of a match's right side: a set of them, or one (nft prints a
    one-element set as its element)."""
    out: list[IPNetwork] = []
    items = right["set"] if isinstance(right, dict) and "set" in right else right
    for it in items if isinstance(items, list) else [items]:
        if isinstance(it, dict) and "prefix" in it:
            out.append(ipaddress.ip_network(f"{it['prefix']['addr']}/{it['prefix']['len']}"))
        elif isinstance(it, str):
            out.append(ipaddress.ip_network(it))
    return out


def _parse_table(objs: list[dict[str, Any]], version: int) -> list[ServiceEntry]:
    chains: dict[str, list[list[dict[str, Any]]]] = {}
    maps: dict[str, list[Any]] = {}
    for o in objs:
        if "rule" in o:
            chains.setdefault(o["rule"]["chain"], []).append(o["rule"]["expr"])
        elif "chain" in o:
            chains.setdefault(o["chain"]["name"], [])
        elif "map" in o:
            maps[o["map"]["name"]] = o["map"].get("elem", [])

    def backends_of(chain: str) -> tuple[Backend, ...]:
        eps = list(dict.fromkeys(t for rule in chains.get(chain, []) for t in _targets(rule)
                                 if t.startswith("ep-")))
        return tuple(b for b in (_dnat(chains.get(ep, [])) for ep in eps) if b is not None)

    out: list[ServiceEntry] = []
    unspec = ipaddress.ip_address(0 if version == 4 else "::")
    for mapname in ("service-ips", "service-nodeports"):
        for key, verdict in maps.get(mapname, []):
            comment = ""
            if isinstance(key, dict) and "elem" in key:
                comment = key["elem"].get("comment", "")
                key = key["elem"]["val"]
            parts = key["concat"]
            if mapname == "service-ips":
                ip, proto, port = ipaddress.ip_address(parts[0]), parts[1], int(parts[2])
            else:
                ip, proto, port = unspec, parts[0], int(parts[1])
            name, kind_s, flags_s, aff_s = (comment.split("|") + ["", "0", "0", "0"])[:4]
            frontend = Frontend(ip, port, Protocol[str(proto).upper()])
            kw: dict[str, Any] = dict(kind=FrontendKind(int(kind_s)),
                                      flags=ServiceFlag(int(flags_s)),
                                      affinity_timeout=int(aff_s))
            bes: tuple[Backend, ...] = ()
            fe = _targets(verdict)
            if fe and fe[0].startswith("fe-"):
                bes = backends_of(fe[0])
                for rule in chains.get(fe[0], []):
                    tg = _targets(rule)
                    if tg and tg[0] == f"{fe[0]}-c" and "cluster_backends" not in kw:
                        kw["cluster_backends"] = backends_of(tg[0])
                    if any("drop" in st for st in rule):
                        for st in rule:
                            m = st.get("match")
                            if m and m.get("op") == "!=":
                                kw["source_ranges"] = tuple(_prefixes(m["right"]))
            out.append(ServiceEntry.make(frontend, bes, name, **kw))
    return out

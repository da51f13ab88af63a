"""The iptables datapath: kube-proxy's iptables mode, under kpr's own chains.

Each sync is one ``iptables-restore --noflush`` per family (ip6tables-restore for
IPv6): atomic per family, and it leaves every chain that is not kpr's alone.

* A full sync reads the nat and filter tables once (``iptables-save``), then
  declares (creates or flushes) and fills every kpr chain, deletes kpr chains that
  are no longer wanted, and makes sure the built-in chains jump to kpr's exactly
  once. It is the first sync, the periodic repair, and the recovery after failure.
* A partial sync writes only the changed entries' own chains (KPR-SVC, KPR-SEP,
  ...) and adds or deletes (``-A``/``-D``) their one rule in the shared chains. It
  never reads the tables: the writer's shadow (what it last committed) says what
  exists.

A failed restore changes nothing (the table is replaced whole by iptables-legacy,
and iptables-nft sends one nf_tables batch), but the shadow is no longer trusted:
the next sync must be a full one (DatapathError).

Both iptables back ends work: ``iptables-nft`` (Debian's default since 10) and
``iptables-legacy`` (the x_tables interface), chosen by ``backend``; ``auto`` takes
the one the ``iptables`` command is (update-alternatives). ``cleanup()`` removes
kpr's chains from both.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
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
from controller.datapaths.iptables import render
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

BACKENDS = ("nft", "legacy")
TABLES = ("nat", "filter")
BUILTIN = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
           "filter": ("INPUT", "FORWARD", "OUTPUT")}


@dataclass(frozen=True, slots=True)
class IptablesConfig:
    """Settings of the iptables datapath."""

    netns: str | None = None
    """Named network namespace to program (None: the process's own)."""
    backend: str = "auto"
    """iptables back end: nft, legacy, or auto (what the ``iptables`` command is)."""
    nodeport_addresses: tuple[str, ...] = ()
    """--nodeport-addresses: CIDRs and/or "primary"; empty: every node address."""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """--cluster-cidr: detect-local, per family."""
    masquerade_all: bool = False
    """masqueradeAll."""
    masquerade_address: str = ""
    """Node addresses to SNAT masqueraded traffic to, one per family."""


def _clean_name(name: str) -> str:
    return name.encode()[:render.NAME_MAX].decode(errors="ignore").replace('"', "'") \
        .replace(" ", "_")


def canonical_entry(e: ServiceEntry) -> ServiceEntry:
    """What ``dump()`` returns for an entry once programmed."""
    return shared_canonical(e, _clean_name(e.name), render.FLAGS_KEPT, collapse_ranges=False)


def resolve_backend(backend: str) -> str:
    """nft or legacy: ``auto`` is what the ``iptables`` command is."""
    if backend != "auto":
        return backend
    try:
        p = subprocess.run(["iptables", "--version"], capture_output=True, text=True)
    except OSError:
        return "nft"
    return "legacy" if "legacy" in p.stdout else "nft"


def _tool(version: int, backend: str, what: str) -> str:
    """iptables-nft-restore, ip6tables-legacy-save, ..."""
    return f"{'ip6' if version == 6 else 'ip'}tables-{backend}-{what}"


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """``iptables-save`` output -> table -> chain -> its rules (the arguments after
    ``-A chain``), chains without rules included."""
    out: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = out.setdefault(line[1:].strip(), {})
        elif table is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, rest = line.split(" ", 2)
            table.setdefault(chain, []).append(rest)
    return out


class IptablesDatapath:
    """kpr's chains in the nat and filter tables of both families."""

    name = "iptables"

    def __init__(self, cfg: IptablesConfig) -> None:
        self.cfg = cfg
        self.backend = resolve_backend(cfg.backend)
        self.node = render.Node(tuple(cfg.cluster_cidrs), cfg.masquerade_all)
        self._shadow: dict[Frontend, render.Rendered] = {}
        self._vips: dict[Any, int] = {}  # ClusterIP -> entries using it
        self._flows = UdpFlows(cfg.netns)
        self.unprogrammed: dict[Frontend, str] = {}
        """Frontends skipped, with the reason (exported as a metric)."""
        self._lock = threading.Lock()  # syncs and address changes (watcher thread)
        self._addrs: Any = None  # (nodeport, snat) last written; None: nothing yet
        self._watcher: Any = None

    # ----- running iptables -------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        pre = ["nsenter", f"--net=/run/netns/{self.cfg.netns}"] if self.cfg.netns else []
        return [*pre, *args]

    def _restore(self, version: int, text: str) -> None:
        if not text:
            return
        # -w: wait for the xtables lock (iptables-legacy) instead of failing
        argv = self._argv(_tool(version, self.backend, "restore"), "--noflush", "-w", "5")
        p = subprocess.run(argv, input=text, capture_output=True, text=True)
        if p.returncode != 0:
            raise DatapathError(f"{argv[-4]} failed: {p.stderr.strip()[:4000]}")

    def _save(self, version: int) -> dict[str, dict[str, list[str]]]:
        out: dict[str, dict[str, list[str]]] = {}
        for t in TABLES:
            p = subprocess.run(self._argv(_tool(version, self.backend, "save"), "-t", t),
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise DatapathError(f"{_tool(version, self.backend, 'save')} -t {t}: "
                                    f"{p.stderr.strip()}")
            out[t] = parse_save(p.stdout).get(t, {})
        return out

    # ----- protocol -------------------------------------------------------------------

    def probe(self) -> Probe:
        for v in (4, 6):
            for what in ("restore", "save"):
                if shutil.which(_tool(v, self.backend, what)) is None:
                    return Probe(False, f"{_tool(v, self.backend, what)} is missing "
                                        "(Debian: iptables)")
        try:  # the kernel has the tables and matches we use?
            for v in (4, 6):
                text = self._static_text(v, (), None)
                argv = self._argv(_tool(v, self.backend, "restore"), "--test", "--noflush")
                p = subprocess.run(argv, input=text, capture_output=True, text=True)
                if p.returncode != 0:
                    return Probe(False, f"{argv[-3]} --test failed: {p.stderr.strip()}")
        except OSError as e:
            return Probe(False, f"cannot run iptables: {e}")
        p = subprocess.run([_tool(4, self.backend, "restore"), "--version"],
                           capture_output=True, text=True)
        return Probe(True, p.stdout.strip() or f"iptables-{self.backend}")

    def _static_text(self, version: int, nodeport: tuple[Any, ...], snat: Any) -> str:
        out = render.Restore()
        for t, chains in render.static_rules(version, self.node, nodeport, snat).items():
            for c, rules in chains.items():
                out.chain(t, c, rules)
        return out.text()

    def start(self) -> None:
        """Watch the node's addresses; the first (full) sync creates the chains."""
        if self._watcher is None:
            self._watcher = node.AddressWatcher(self.refresh_node, self.cfg.netns)

    def refresh_node(self) -> None:
        """Rewrite the NodePort jumps and the masquerade rule if the node's addresses
        changed (three small chains; services are untouched)."""
        with self._lock:
            if self._addrs is None:
                return
            try:
                facts = node.facts_of(self.cfg)
                if facts == self._addrs:
                    return
                nodeport, snat = facts
                for v in (4, 6):
                    out = render.Restore()
                    for c, rules in render.addresses(v, nodeport[v], snat.get(v)).items():
                        out.chain("filter" if c == render.FILTER else "nat", c, rules)
                    self._restore(v, out.text())
            except (DatapathError, OSError) as e:
                log.warning("iptables datapath: updating node addresses failed: %s", e)
                return
            self._addrs = facts
            node.log_facts(facts)


    def _render(self, e: ServiceEntry) -> render.Rendered:
        self.unprogrammed.pop(e.frontend, None)
        return render.render(e, self.node)

    def _vip_ref(self, r: render.Rendered | None, delta: int, out: render.Restore) -> None:
        if r is None or r.cluster_ip is None:
            return
        ip = r.cluster_ip
        n = self._vips.get(ip, 0) + delta
        if n <= 0:
            self._vips.pop(ip, None)
            out.delete["filter"] += [f"-D {render.CLUSTER_IPS} {rule}"
                                     for rule in render.cluster_ip_rules(ip)]
        else:
            if ip not in self._vips:
                out.add["filter"] += [f"-A {render.CLUSTER_IPS} {rule}"
                                      for rule in render.cluster_ip_rules(ip)]
            self._vips[ip] = n

    def sync(self, state: State, diff: Diff | None) -> SyncResult:
        with self._lock:
            if diff is None:
                return self._full(state)
            return self._partial(diff)

    def _partial(self, diff: Diff) -> SyncResult:
        outs = {4: render.Restore(), 6: render.Restore()}
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
            out = outs[f.ip.version]
            self._vip_ref(new, +1, out)
            render.change(old, new, out)
            self._vip_ref(old, -1, out)
            if new is None:
                shadow.pop(f, None)
            else:
                shadow[f] = new
        try:
            for v, out in outs.items():
                self._restore(v, out.text())
        except (DatapathError, OSError) as e:
            self._vips = vips
            raise DatapathError(str(e)) from e
        self._shadow = shadow
        self._flows.changed(changes)
        return SyncResult(full=False, ops=sum(map(len, outs.values())),
                          frontends=len(self._shadow))

    def _full(self, state: State) -> SyncResult:
        facts = node.facts_of(self.cfg)
        nodeport, snat = facts
        shadow: dict[Frontend, render.Rendered] = {}
        self._vips = {}
        self.unprogrammed = {}
        ops = 0
        texts: dict[int, str] = {}
        for v in (4, 6):
            saved = self._save(v)
            out = render.Restore()
            for t, chains in render.static_rules(v, self.node, nodeport[v], snat.get(v)).items():
                for c, rules in chains.items():
                    out.chain(t, c, rules)
            for e in state.values():
                if e.frontend.ip.version != v:
                    continue
                r = self._render(e)
                shadow[e.frontend] = r
                self._vip_ref(r, +1, out)
                render.change(None, r, out)
            for t in TABLES:
                wanted = set(out.declare[t])
                stale = [c for c in saved.get(t, {}) if c.startswith(render.PREFIX)
                         and c not in wanted]
                out.declare[t] += stale
                out.remove[t] += stale
                self._hooks(t, saved.get(t, {}), out)
            texts[v] = out.text()
            ops += len(out)
        self._shadow = {}
        try:
            for v, text in texts.items():
                self._restore(v, text)
        except (DatapathError, OSError) as e:
            self._vips = {}
            raise DatapathError(str(e)) from e
        self._shadow = shadow
        self._flows.reset(state.values())
        self._addrs = facts
        return SyncResult(full=True, ops=ops, frontends=len(shadow))

    @staticmethod
    def _hooks(table: str, saved: dict[str, list[str]], out: render.Restore) -> None:
        """The built-in chains jump to kpr's exactly once, first."""
        for chain, rule in render.HOOKS[table]:
            target = rule.rsplit(" ", 1)[1]
            have = [r for r in saved.get(chain, []) if r.endswith(f"-j {target}")]
            if len(have) == 1 and saved[chain][0] == have[0]:
                continue
            out.delete[table] += [f"-D {chain} {r}" for r in have]
            out.add[table].append(f"-I {chain} 1 {rule}")

    def canonical(self, state: Iterable[ServiceEntry]) -> State:
        """The State ``dump()`` returns once ``state`` is programmed."""
        return State(canonical_entry(e) for e in state)

    def chains(self) -> list[str]:
        """kpr's chains in this namespace (table/chain), for tests and status."""
        return [f"{t}/{c}" for v in (4, 6) for t, chains in self._save(v).items()
                for c in chains if c.startswith(render.PREFIX)]

    def dump(self) -> State:
        entries: list[ServiceEntry] = []
        for v in (4, 6):
            entries += _parse_tables(self._save(v), v)
        return State(entries)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def cleanup(self) -> None:
        self.close()
        cleanup(self.cfg.netns, (self.backend,))


def installed(netns: str | None = None, backends: tuple[str, ...] = BACKENDS) -> bool:
    """Whether kpr's nat chains are in place in either family and back end
    (read-only)."""
    pre = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    for backend in backends:
        for v in (4, 6):
            save = _tool(v, backend, "save")
            if shutil.which(save) is None:
                continue
            p = subprocess.run([*pre, save, "-t", "nat"], capture_output=True, text=True)
            if p.returncode == 0 and any(
                    c.startswith(render.PREFIX) for c in parse_save(p.stdout).get("nat", {})):
                return True
    return False


def cleanup(netns: str | None = None, backends: tuple[str, ...] = BACKENDS) -> int:
    """Delete kpr's chains and its jumps from the built-in chains, in both families
    and the given back ends (idempotent); returns how many chains existed.

    iptables-nft creates its ``nat`` and ``filter`` tables on first use; a table
    left with nothing but empty built-in chains that accept is deleted too, so no
    empty hook stays registered. A table with any rule, any other chain or a
    non-ACCEPT policy is somebody's, and stays."""
    pre = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    removed = 0
    for backend in backends:
        for v in (4, 6):
            save, restore = _tool(v, backend, "save"), _tool(v, backend, "restore")
            if shutil.which(save) is None or shutil.which(restore) is None:
                continue
            out = render.Restore(removing=True)
            empty: list[str] = []
            for t in TABLES:
                p = subprocess.run([*pre, save, "-t", t], capture_output=True, text=True)
                if p.returncode != 0:
                    continue
                chains = parse_save(p.stdout).get(t, {})
                mine = [c for c in chains if c.startswith(render.PREFIX)]
                if not mine:
                    continue
                for c, rules in chains.items():
                    if not c.startswith(render.PREFIX):
                        out.delete[t] += [f"-D {c} {r}" for r in rules
                                          if re.search(r"-j KPR-\S+$", r)]
                out.declare[t] += mine
                out.remove[t] += mine
                removed += len(mine)
                others = {c: [r for r in rules if not re.search(r"-j KPR-\S+$", r)]
                          for c, rules in chains.items() if not c.startswith(render.PREFIX)}
                policies = re.findall(r"^:(\S+) (\S+)", p.stdout, re.M)
                if not any(others.values()) and all(
                        c.startswith(render.PREFIX) or pol == "ACCEPT" and c in BUILTIN[t]
                        for c, pol in policies):
                    empty.append(t)
            text = out.text()
            if text:
                p = subprocess.run([*pre, restore, "--noflush", "-w", "5"], input=text,
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    log.warning("%s: removing kpr's chains failed: %s", restore,
                                p.stderr.strip())
                    continue
            if backend == "nft":
                fam = "ip6" if v == 6 else "ip"
                for t in empty:
                    subprocess.run([*pre, "nft", "delete", "table", fam, t],
                                   capture_output=True, text=True)
    return removed


# ----- reading the tables back -----------------------------------------------------------

def _opts(rule: str) -> dict[str, str]:
    """A rule's options (-d, -p, --dport, --comment, -j, --to-destination, ...); a
    negated option is kept as "!<option>"."""
    out: dict[str, str] = {}
    toks = shlex.split(rule)
    neg = False
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "!":
            neg = True
        elif t.startswith("-"):
            val = toks[i + 1] if i + 1 < len(toks) and not toks[i + 1].startswith("-") else ""
            out[("!" if neg else "") + t] = val
            neg = False
            i += 1 if val else 0
        i += 1
    return out


def _host(value: str) -> Any:
    return ipaddress.ip_network(value, strict=False).network_address


def _backend(dest: str) -> Backend:
    host, port = dest.rsplit(":", 1)
    return Backend(ipaddress.ip_address(host.strip("[]")), int(port))


def _parse_tables(saved: dict[str, dict[str, list[str]]], version: int) -> list[ServiceEntry]:
    nat = saved.get("nat", {})
    flt = saved.get("filter", {})
    unspec = ipaddress.ip_address(0 if version == 4 else "::")

    def backends_of(chain: str) -> tuple[Backend, ...]:
        seps = dict.fromkeys(o["-j"] for o in map(_opts, nat.get(chain, []))
                             if o.get("-j", "").startswith("KPR-SEP-"))
        out = []
        for sep in seps:
            for o in map(_opts, nat.get(sep, [])):
                if o.get("-j") == "DNAT":
                    out.append(_backend(o["--to-destination"]))
        return tuple(out)

    out: list[ServiceEntry] = []
    rows = [(r, True) for c in (render.FRONTENDS, render.NODEPORTS) for r in nat.get(c, [])]
    rows += [(r, False) for c in (render.NOEP, render.NOEP_NP) for r in flt.get(c, [])]
    for rule, proxied in rows:
        o = _opts(rule)
        name, kind_s, flags_s, aff_s = (o.get("--comment", "").split("|") +
                                        ["", "0", "0", "0"])[:4]
        ip = _host(o["-d"]) if "-d" in o else unspec
        frontend = Frontend(ip, int(o["--dport"]), Protocol[o["-p"].upper()])
        kw: dict[str, Any] = dict(kind=FrontendKind(int(kind_s)),
                                  flags=ServiceFlag(int(flags_s)),
                                  affinity_timeout=int(aff_s))
        bes: tuple[Backend, ...] = ()
        if proxied:
            svc = o["-j"]
            bes = backends_of(svc)
            for r in map(_opts, nat.get(svc, [])):
                target = r.get("-j", "")
                if target.startswith("KPR-SVX-") and "cluster_backends" not in kw:
                    kw["cluster_backends"] = backends_of(target)
                elif target.startswith("KPR-FW-"):
                    kw["source_ranges"] = tuple(
                        ipaddress.ip_network(f["-s"]) for f in map(_opts, nat.get(target, []))
                        if "-s" in f)
        out.append(ServiceEntry.make(frontend, bes, name, **kw))
    return out

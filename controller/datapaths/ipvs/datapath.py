"""The IPVS datapath: IPVS virtual services over generic netlink (pyroute2), the
Service addresses on the dummy link ``kpr-ipvs0``, and kpr's companion nftables
table ``kpr-ipvs`` (render.py explains the layout).

* A full sync reads what the kernel holds (every IPVS service kpr owns with its
  real servers, the dummy link's addresses), compares it with what is wanted, and
  writes only the difference; the companion table is replaced whole, in one nft
  transaction. It adopts what a previous kpr left, so a restart disturbs no
  connection.
* A partial sync applies only the changed entries' objects, from the writer's
  shadow, without reading the kernel.
* Graceful termination: a real server that leaves a TCP or SCTP service is first
  given weight 0 (no new connections; open ones carry on), and removed once IPVS
  counts no connection to it (active or inactive), or after ``graceful_period``.
  A UDP real server that is terminating but still serving (the entry's draining
  endpoints) is kept at weight 0 too, so its flows keep it while it answers
  (kube-proxy's IPVS mode deletes it at once, and they move); once it leaves the
  slice or stops serving, a UDP real server goes at once, and its flows' conntrack
  entries with it (controller/datapaths/flows.py): ``expire_nodest_conn`` then balances each flow's
  next datagram afresh. (While the conntrack entry lives, IPVS drops them: Debian's
  6.1, ip_vs_in() with an "old" conntrack.)

kpr sets the sysctls IPVS needs, as kube-proxy does: ``net.ipv4.vs.conntrack=1``
(netfilter tracks IPVS connections, so masquerade applies to them),
``expire_nodest_conn`` and ``expire_quiescent_template``, and ``arp_ignore=1`` /
``arp_announce=2`` so the node does not answer ARP for the dummy link's addresses.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.datapaths import node
from controller.datapaths.base import DatapathError, Probe, SyncResult
from controller.datapaths.base import canonical_entry as shared_canonical
from controller.datapaths.flows import UdpFlows
from controller.datapaths.ipvs import render
from controller.model import (
    Backend,
    Diff,
    Frontend,
    FrontendKind,
    IPAddress,
    IPNetwork,
    Protocol,
    ServiceEntry,
    ServiceFlag,
    State,
)

log = logging.getLogger(__name__)

IP_VS_SVC_F_PERSISTENT = 0x1  # include/uapi/linux/ip_vs.h
IP_VS_CONN_F_MASQ = 0x0
SYSCTLS = {"net/ipv4/vs/conntrack": "1", "net/ipv4/vs/expire_nodest_conn": "1",
           "net/ipv4/vs/expire_quiescent_template": "1",
           "net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2",
           "net/ipv4/ip_forward": "1"}


@dataclass(frozen=True, slots=True)
class IpvsConfig:
    """Settings of the IPVS datapath."""

    netns: str | None = None
    """Named network namespace to program (None: the process's own)."""
    scheduler: str = "rr"
    """ipvs.scheduler: the IPVS scheduler of Services (Maglev ones use mh)."""
    nodeport_addresses: tuple[str, ...] = ()
    """--nodeport-addresses."""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """--cluster-cidr: detect-local, per family."""
    masquerade_all: bool = False
    """masqueradeAll."""
    masquerade_address: str = ""
    """Node addresses to SNAT masqueraded traffic to, one per family."""
    graceful_period: float = 600.0
    """Longest wait for a removed TCP real server's connections to drain."""


Dest = tuple[str, int]
"""A real server: (address, port)."""


@dataclass(slots=True)
class Held:
    """One IPVS virtual service as the kernel holds it (or, in a partial sync, as
    the writer left it)."""

    scheduler: str
    """Its scheduler's name."""
    timeout: int
    """Persistence timeout in seconds (0: not persistent)."""
    dests: dict[Dest, tuple[int, int]]
    """Real server -> (weight, active plus inactive connections)."""


def canonical_entry(e: ServiceEntry) -> ServiceEntry:
    """What ``dump()`` returns for an entry once programmed."""
    return shared_canonical(e, e.name.encode()[:render.NAME_MAX].decode(errors="ignore").replace('"', "'"), render.FLAGS_KEPT, collapse_ranges=True)


class IpvsDatapath:
    """IPVS virtual services, the dummy link and the companion table."""

    name = "ipvs"

    def __init__(self, cfg: IpvsConfig) -> None:
        self.cfg = cfg
        self._shadow: dict[Frontend, render.Rendered] = {}
        self._marks: dict[Frontend, int] = {}
        self._elements: Counter[tuple[str, str, str]] = Counter()
        self._vips: Counter[IPAddress] = Counter()
        self._services: dict[render.VKey, render.VService] = {}  # programmed
        self._draining: dict[tuple[render.VKey, tuple[str, int]], float] = {}
        self.unprogrammed: dict[Frontend, str] = {}
        self._lock = threading.RLock()
        self._addrs: Any = None
        self._local = threading.local()  # one IPVS socket per thread (pyroute2 0.9)
        self._socks: list[Any] = []
        self._flows = UdpFlows(cfg.netns)
        self._stop = threading.Event()
        self._threads: list[Any] = []
        self._entries: dict[Frontend, ServiceEntry] = {}  # what is programmed

    # ----- kernel access --------------------------------------------------------------

    def _in_ns(self, fn: Any, *args: Any) -> Any:
        if self.cfg.netns:
            from controller.netns import in_netns

            return in_netns(self.cfg.netns, fn, *args)
        return fn(*args)

    def _sock(self) -> Any:
        """This thread's IPVS socket. pyroute2 0.9 binds a socket's transport to the
        thread of its first request: used from another thread (the address
        watcher's full syncs), it fails with ECONNRESET. So each thread has its own,
        opened in the namespace (netns=)."""
        ipvs = getattr(self._local, "ipvs", None)
        if ipvs is None:
            from pyroute2 import IPVS

            ipvs = self._local.ipvs = IPVS(netns=self.cfg.netns) if self.cfg.netns else IPVS()
            with self._lock:
                self._socks.append(ipvs)
        return ipvs

    def _nft(self, commands: list[str]) -> None:
        if not commands:
            return
        pre = ["nsenter", f"--net=/run/netns/{self.cfg.netns}"] if self.cfg.netns else []
        p = subprocess.run([*pre, "nft", "-f", "-"], input="\n".join(commands) + "\n",
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise DatapathError(f"nft transaction of {len(commands)} commands failed: "
                                f"{p.stderr.strip()[:4000]}")

    @staticmethod
    def _svc(k: render.VKey, s: render.VService | None = None) -> Any:
        from pyroute2 import IPVSService

        af = socket.AF_INET if k.version == 4 else socket.AF_INET6
        kw: dict[str, Any] = {"af": af}
        if k.fwmark:
            kw["fwmark"] = k.fwmark
        else:
            kw.update(addr=k.addr, port=k.port, protocol=k.protocol)
        if s is not None:
            kw.update(sched_name=s.scheduler, timeout=s.timeout,
                      flags={"flags": IP_VS_SVC_F_PERSISTENT if s.timeout else 0,
                             "mask": 0xFFFFFFFF},
                      # IPv6: the persistence netmask is a prefix length, host order
                      netmask="255.255.255.255" if k.version == 4 else "128.0.0.0")
        return IPVSService(**kw)

    @staticmethod
    def _dest(version: int, addr: str, port: int, weight: int = 1) -> Any:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=addr, port=port, weight=weight, fwd_method=IP_VS_CONN_F_MASQ,
                        addr_family=socket.AF_INET if version == 4 else socket.AF_INET6)

    def _read(self, nodeport_ips: Iterable[str] = ()) -> dict[render.VKey, Held]:
        """The IPVS services kpr owns, as the kernel holds them: those on the dummy
        link's addresses, on NodePort addresses (now's, and ``nodeport_ips``: those
        of before an address change), or with kpr's firewall marks."""
        from pyroute2 import IPVSDest, IPVSService

        ipvs = self._sock()
        vips = {str(ip) for ip in self._link_addrs()}
        nodeport = {str(ip) for v in (4, 6) for ip in (self._addrs or ({4: (), 6: ()}, {}))[0][v]}
        nodeport.update(nodeport_ips)
        out: dict[render.VKey, Held] = {}
        for msg in ipvs.service("dump"):
            s = IPVSService.from_message(msg)
            version = 4 if s.get("af") == socket.AF_INET else 6
            mark = int(s.get("fwmark") or 0)
            if mark:
                if mark & render.FWMARK_MASK != render.FWMARK_BASE:
                    continue
                k = render.VKey(version, 0, "", 0, mark)
            else:
                addr = str(ipaddress.ip_address(s["addr"]))
                if addr not in vips and addr not in nodeport:
                    continue  # not kpr's
                k = render.VKey(version, int(s["protocol"]), addr, int(s["port"]))
            dests = {}
            for dm in ipvs.dest("dump", service=self._svc(k)):
                d = IPVSDest.from_message(dm)
                conns = _conns(d)
                dests[(str(ipaddress.ip_address(d["addr"])), int(d["port"]))] = \
                    (int(d.get("weight", 0)), conns)
            out[k] = Held(str(s.get("sched_name") or ""), int(s.get("timeout") or 0), dests)
        return out

    def _link(self) -> int:
        """The dummy link's index (created if missing)."""
        from controller.netns import open_ipr

        with open_ipr(self.cfg.netns) as ipr:
            idx = ipr.link_lookup(ifname=render.LINK)
            if not idx:
                ipr.link("add", ifname=render.LINK, kind="dummy")
                idx = ipr.link_lookup(ifname=render.LINK)
            return int(idx[0])

    def _link_addrs(self) -> set[IPAddress]:
        from controller.netns import open_ipr

        with open_ipr(self.cfg.netns) as ipr:
            idx = ipr.link_lookup(ifname=render.LINK)
            if not idx:
                return set()
            return {ipaddress.ip_address(m.get_attr("IFA_ADDRESS"))
                    for fam in (socket.AF_INET, socket.AF_INET6)
                    for m in ipr.get_addr(family=fam, index=idx[0])}

    def _set_vips(self, add: Iterable[IPAddress], delete: Iterable[IPAddress]) -> None:
        from controller.netns import open_ipr

        add, delete = list(add), list(delete)
        if not add and not delete:
            return
        idx = self._link()
        with open_ipr(self.cfg.netns) as ipr:
            for ip in add:
                try:
                    ipr.addr("add", index=idx, address=str(ip), prefixlen=ip.max_prefixlen,
                             **({"flags": 0x02} if ip.version == 6 else {}))  # IFA_F_NODAD
                except Exception as e:  # noqa: BLE001 - NetlinkError EEXIST
                    if getattr(e, "code", 0) != 17:
                        raise
            for ip in delete:
                try:
                    ipr.addr("del", index=idx, address=str(ip), prefixlen=ip.max_prefixlen)
                except Exception as e:  # noqa: BLE001 - NetlinkError EADDRNOTAVAIL
                    if getattr(e, "code", 0) != 99:
                        raise

    def _sysctls(self) -> None:
        def write() -> None:
            for k, v in SYSCTLS.items():
                try:
                    with open(f"/proc/sys/{k}", "w") as f:
                        f.write(v)
                except OSError as e:
                    if k.startswith("net/ipv4/vs/"):  # masquerade needs conntrack=1
                        raise DatapathError(f"cannot set {k}={v}: {e}") from e
                    log.warning("ipvs datapath: cannot set %s=%s: %s", k, v, e)
        self._in_ns(write)

    # ----- protocol -------------------------------------------------------------------

    def probe(self) -> Probe:
        if self.cfg.scheduler not in render.SCHEDULERS:
            return Probe(False, f"unknown IPVS scheduler {self.cfg.scheduler!r}")
        try:
            from pyroute2 import IPVS  # noqa: F401 - pyroute2 >= 0.9
        except ImportError:
            return Probe(False, "pyroute2 has no IPVS API (needs >= 0.9)")
        try:
            list(self._sock().service("dump"))
        except Exception as e:  # noqa: BLE001 - no IPVS family, permissions
            self._close_socks()
            return Probe(False, f"the kernel has no IPVS (generic netlink family IPVS: {e})")
        try:
            subprocess.run(["nft", "--version"], capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return Probe(False, "the nft command is missing (the companion table needs it)")
        return Probe(True, "IPVS over generic netlink, nftables companion table")

    def start(self) -> None:
        # the first request loads ip_vs (genl family autoload), which creates the
        # namespace's net.ipv4.vs sysctls
        try:
            list(self._sock().service("dump"))
        except Exception as e:  # noqa: BLE001 - NetlinkError
            raise DatapathError(f"IPVS is not available: {e}") from e
        self._sysctls()
        if not self._threads:
            self._threads = [node.AddressWatcher(self.refresh_node, self.cfg.netns)]
            t = threading.Thread(target=self._reaper, daemon=True, name="kpr-ipvs-drain")
            t.start()

    def refresh_node(self) -> None:
        """Node addresses changed: NodePort services move, the masquerade rule
        follows (a full sync: it compares and writes only the difference)."""
        with self._lock:
            if self._addrs is None:
                return
            try:
                if node.facts_of(self.cfg) == self._addrs:
                    return
                self._full(State(self._entries.values()))
            except (DatapathError, OSError) as e:
                log.warning("ipvs datapath: updating node addresses failed: %s", e)

    def _render(self, e: ServiceEntry, nodeport: dict[int, tuple[Any, ...]]) -> render.Rendered:
        mark = 0
        if e.kind != FrontendKind.CLUSTER_IP and e.flags & ServiceFlag.LOCAL_POLICY \
                and e.cluster_backends:
            mark = self._marks.get(e.frontend) or render.fwmark(
                e, set(self._marks.values()))
            self._marks[e.frontend] = mark
        v = e.frontend.ip.version
        return render.render(e, nodeport[v], self.cfg.scheduler, self.cfg.masquerade_all,
                             any(n.version == v for n in self.cfg.cluster_cidrs), mark)

    def sync(self, state: State, diff: Diff | None) -> SyncResult:
        with self._lock:
            if diff is None or self._addrs is None:
                return self._full(state)
            return self._partial(diff)

    def _apply_services(self, want: dict[render.VKey, render.VService],
                        have: dict[render.VKey, Held]) -> int:
        """Make IPVS hold ``want``, given that it holds ``have``; returns the ops."""
        ipvs = self._sock()
        ops = 0
        now = time.monotonic()
        for k, s in want.items():
            h = have.get(k)
            if h is None:
                ipvs.service("add", service=self._svc(k, s))
                h = have[k] = Held(s.scheduler, s.timeout, {})
                ops += 1
            elif (h.scheduler, h.timeout) != (s.scheduler, s.timeout):
                ipvs.service("set", service=self._svc(k, s))
                ops += 1
            for d in s.dests:
                w = h.dests.get(d, (None, 0))[0]
                if w is None:
                    ipvs.dest("add", service=self._svc(k), dest=self._dest(k.version, *d))
                    ops += 1
                elif w != 1:
                    ipvs.dest("set", service=self._svc(k), dest=self._dest(k.version, *d))
                    ops += 1
                self._draining.pop((k, d), None)
            for d, (w, _conns) in h.dests.items():
                if d in s.dests:
                    continue
                graceful = k.protocol in (int(Protocol.TCP), int(Protocol.SCTP)) or \
                    (k.fwmark and self._fw_proto(k) != int(Protocol.UDP)) or \
                    d in s.draining
                if graceful:
                    if w != 0:
                        ipvs.dest("set", service=self._svc(k),
                                  dest=self._dest(k.version, *d, weight=0))
                        ops += 1
                    self._draining.setdefault((k, d), now)
                else:
                    ipvs.dest("del", service=self._svc(k), dest=self._dest(k.version, *d))
                    ops += 1
            self._services[k] = s
        for k in list(have):
            if k not in want:
                ipvs.service("del", service=self._svc(k))
                self._services.pop(k, None)
                for key in [x for x in self._draining if x[0] == k]:
                    self._draining.pop(key)
                ops += 1
        return ops

    def _fw_proto(self, k: render.VKey) -> int:
        for f, m in self._marks.items():
            if m == k.fwmark:
                return int(f.protocol)
        return 0

    def _reaper(self) -> None:
        """Remove drained real servers (graceful termination), from a thread of its
        own (so with an IPVS socket of its own)."""
        while not self._stop.wait(1.0):
            if not self._draining:
                continue
            try:
                with self._lock:
                    self._reap(self._sock())
            except Exception as e:  # noqa: BLE001 - retried next second
                log.warning("ipvs datapath: draining real servers failed: %s", e)

    def _reap(self, ipvs: Any) -> None:
        from pyroute2 import IPVSDest

        now = time.monotonic()
        for (k, d), since in list(self._draining.items()):
            found = None
            try:
                for dm in ipvs.dest("dump", service=self._svc(k)):
                    x = IPVSDest.from_message(dm)
                    if (str(ipaddress.ip_address(x["addr"])), int(x["port"])) == d:
                        found = _conns(x)
            except Exception as e:  # noqa: BLE001 - NetlinkError
                if getattr(e, "code", 0) in (2, 3):  # ENOENT, ESRCH: the service is gone
                    self._draining.pop((k, d), None)
                    continue
                raise
            if found is None:
                self._draining.pop((k, d), None)  # deleted by someone else
            elif found == 0 or now - since > self.cfg.graceful_period:
                ipvs.dest("del", service=self._svc(k), dest=self._dest(k.version, *d))
                self._draining.pop((k, d), None)

    def _full(self, state: State) -> SyncResult:
        facts = node.facts_of(self.cfg)
        nodeport, snat = facts
        self._addrs = facts
        shadow: dict[Frontend, render.Rendered] = {}
        elements: Counter[tuple[str, str, str]] = Counter()
        vips: Counter[IPAddress] = Counter()
        want: dict[render.VKey, render.VService] = {}
        self._marks = {f: m for f, m in self._marks.items() if f in state}
        for e in state.values():
            r = self._render(e, nodeport)
            shadow[e.frontend] = r
            elements.update(r.elements)
            vips.update(r.vips)
            want.update(r.services)
        cmds: list[str] = []
        for v in (4, 6):
            fam = render.family(v)
            cmds += [f"add table {fam} {render.TABLE}", f"delete table {fam} {render.TABLE}"]
            cmds += render.table(v, self.cfg.cluster_cidrs, nodeport[v], snat.get(v))
        cmds += render.element_commands({k: 1 for k in elements})
        # Order: the companion rules (masquerade, drops) before the services they
        # qualify, the services before the addresses that let traffic reach them.
        try:
            before = self._table_nodeport_ips()  # kpr's services may be on them
            self._nft(cmds)
            self._link()
            have = self._read(before)
            self._services = {}
            ops = self._apply_services(want, have)
            have_vips = self._link_addrs()
            self._set_vips([ip for ip in vips if ip not in have_vips],
                           [ip for ip in have_vips if ip not in vips])
        except DatapathError:
            raise
        except Exception as e:  # noqa: BLE001 - NetlinkError and OSError
            raise DatapathError(f"ipvs full sync failed: {e}") from e
        self._shadow, self._elements, self._vips = shadow, elements, vips
        self._entries.clear()
        self._entries.update(state)
        self._flows.reset(state.values())
        return SyncResult(full=True, ops=ops + len(cmds), frontends=len(shadow))

    def _partial(self, diff: Diff) -> SyncResult:
        nodeport, _ = self._addrs
        elements = Counter(self._elements)
        vips = Counter(self._vips)
        want: dict[render.VKey, render.VService] = {}
        gone: dict[render.VKey, Held] = {}
        shadow = dict(self._shadow)
        changes: list[tuple[Frontend, ServiceEntry | None]] = \
            [(f, None) for f in diff.removed] + [(e.frontend, e) for e in diff.upserted]
        for f, e in changes:
            old = shadow.pop(f, None)
            if old is not None:
                elements.subtract(old.elements)
                vips.subtract(old.vips)
                for k in old.services:
                    # what IPVS holds for k: the programmed real servers, and the ones
                    # still draining at weight 0 (adding one of those back would fail
                    # with EEXIST: it is set back to weight 1)
                    cur = self._services[k]
                    gone[k] = Held(cur.scheduler, cur.timeout,
                                   {d: (0, 0) for (dk, d) in self._draining if dk == k})
                    gone[k].dests.update((d, (1, 0)) for d in cur.dests)
            if e is None:
                self._marks.pop(f, None)
                self._entries.pop(f, None)
                continue
            r = self._render(e, nodeport)
            shadow[f] = r
            elements.update(r.elements)
            vips.update(r.vips)
            want.update(r.services)
            self._entries[f] = e
        delta = {k: (1 if elements[k] > 0 else -1) for k in set(elements) | set(self._elements)
                 if (elements[k] > 0) != (self._elements[k] > 0)}
        vip_add = [ip for ip in vips if vips[ip] > 0 and self._vips[ip] <= 0]
        vip_del = [ip for ip in self._vips if self._vips[ip] > 0 and vips[ip] <= 0]
        try:
            cmds = render.element_commands(delta)
            self._nft(cmds)
            ops = self._apply_services(want, gone)  # the rest is new: not in IPVS
            self._set_vips(vip_add, vip_del)
        except DatapathError:
            raise
        except Exception as e:  # noqa: BLE001 - NetlinkError and OSError
            raise DatapathError(f"ipvs partial sync failed: {e}") from e
        self._shadow = shadow
        self._elements = +elements
        self._vips = +vips
        self._flows.changed(changes)
        return SyncResult(full=False, ops=ops + len(cmds) + len(vip_add) + len(vip_del),
                          frontends=len(shadow))

    # ----- reading back ---------------------------------------------------------------

    def canonical(self, state: Iterable[ServiceEntry]) -> State:
        return State(canonical_entry(e) for e in state)

    def tables(self) -> list[str]:
        """The families whose companion table exists."""
        return [fam for fam in ("ip", "ip6") if self._list(fam)]

    def _table_nodeport_ips(self) -> set[str]:
        """The NodePort addresses of the last full sync, from the companion table
        (so a restart finds them too)."""
        out: set[str] = set()
        pre = ["nsenter", f"--net=/run/netns/{self.cfg.netns}"] if self.cfg.netns else []
        for v in (4, 6):
            p = subprocess.run([*pre, "nft", "-j", "list", "set", render.family(v),
                                render.TABLE, "nodeport-ips"], capture_output=True, text=True)
            if p.returncode == 0:
                for o in json.loads(p.stdout)["nftables"]:
                    out.update(str(e) for e in (o.get("set") or {}).get("elem", []))
        return out

    def _list(self, fam: str) -> list[dict[str, Any]]:
        pre = ["nsenter", f"--net=/run/netns/{self.cfg.netns}"] if self.cfg.netns else []
        p = subprocess.run([*pre, "nft", "-j", "list", "table", fam, render.TABLE],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return []
        objs: list[dict[str, Any]] = json.loads(p.stdout)["nftables"]
        return objs

    def dump(self) -> State:
        """Entries from the kernel: frontends and their metadata from the companion
        table, real servers (weight > 0) from IPVS."""
        with self._lock:
            if self._addrs is None:
                self._addrs = node.facts_of(self.cfg)
            services = self._read()
            nodeport_ips = {str(ip) for v in (4, 6) for ip in self._addrs[0][v]}
        entries = []
        for v in (4, 6):
            fam = render.family(v)
            sets: dict[str, list[Any]] = {}
            for o in self._list(fam):
                body = o.get("set") or o.get("map")
                if body:
                    sets[body["name"]] = body.get("elem", [])
            entries += _parse(sets, services, v, nodeport_ips)
        return State(entries)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            if hasattr(t, "stop"):
                t.stop()
        self._threads = []
        self._close_socks()

    def _close_socks(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for ipvs in socks:
            try:
                ipvs.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort
                log.debug("ipvs datapath: closing a socket: %s", e)
        self._local = threading.local()

    def cleanup(self) -> None:
        with self._lock:
            try:
                self._read_and_delete()
            finally:
                self.close()
        cleanup(self.cfg.netns)

    def _read_and_delete(self) -> None:
        try:
            for k in self._read():
                self._sock().service("del", service=self._svc(k))
        except Exception as e:  # noqa: BLE001 - no IPVS here
            log.debug("ipvs cleanup: %s", e)


def _conns(d: Any) -> int:
    """Active plus inactive connections of a real server (pyroute2 0.9 keeps the
    attribute names of the kernel)."""
    return sum(int(d.get(k) or d.get(f"IPVS_DEST_ATTR_{k.upper()}") or 0)
               for k in ("active_conns", "inact_conns"))


def installed(netns: str | None = None) -> bool:
    """Whether the IPVS datapath's dummy link is in place (its services go with it;
    read-only)."""
    from controller.netns import open_ipr

    with open_ipr(netns) as ipr:
        return bool(ipr.link_lookup(ifname=render.LINK))


def cleanup(netns: str | None = None) -> int:
    """Remove the dummy link (its addresses go with it), every IPVS service on its
    addresses or with kpr's firewall marks, and the companion tables. Idempotent;
    returns how many objects existed."""
    from controller.netns import in_netns, open_ipr

    removed = 0

    def drop_services() -> int:
        try:
            from pyroute2 import IPVS, IPVSService
            ipvs = IPVS()
            list(ipvs.service("dump"))  # opens the socket, in this thread's namespace
        except Exception:  # noqa: BLE001 - no IPVS in this kernel
            return 0
        n = 0
        try:
            with open_ipr(None) as ipr:
                idx = ipr.link_lookup(ifname=render.LINK)
                vips = {str(ipaddress.ip_address(m.get_attr("IFA_ADDRESS")))
                        for fam in (socket.AF_INET, socket.AF_INET6)
                        for m in (ipr.get_addr(family=fam, index=idx[0]) if idx else [])}
            for msg in ipvs.service("dump"):
                s = IPVSService.from_message(msg)
                mark = int(s.get("fwmark") or 0)
                mine = (mark & render.FWMARK_MASK == render.FWMARK_BASE) if mark else \
                    str(ipaddress.ip_address(s["addr"])) in vips
                if mine:
                    key = {"af": s["af"], **({"fwmark": mark} if mark else
                                             {"addr": s["addr"], "port": s["port"],
                                              "protocol": s["protocol"]})}
                    ipvs.service("del", service=IPVSService(**key))
                    n += 1
        finally:
            ipvs.close()
        return n
    removed += in_netns(netns, drop_services) if netns else drop_services()
    with open_ipr(netns) as ipr:
        idx = ipr.link_lookup(ifname=render.LINK)
        if idx:
            ipr.link("del", index=idx[0])
            removed += 1
    pre = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    for fam in ("ip", "ip6"):
        p = subprocess.run([*pre, "nft", "delete", "table", fam, render.TABLE],
                           capture_output=True, text=True)
        removed += p.returncode == 0
    return removed


def _parse(sets: dict[str, list[Any]],
           services: dict[render.VKey, Held],
           version: int, nodeport_ips: set[str]) -> list[ServiceEntry]:
    def key_of(el: Any) -> tuple[Any, str]:
        comment = ""
        if isinstance(el, dict) and "elem" in el:
            comment = el["elem"].get("comment", "")
            el = el["elem"]["val"]
        return el, comment

    def dests(k: render.VKey) -> tuple[Backend, ...]:
        return tuple(Backend(ipaddress.ip_address(a), p)
                     for (a, p), (w, _) in (services[k].dests if k in services else {}).items()
                     if w > 0)

    twins: dict[Any, int] = {}
    for name in ("twin", "twin-nodeports"):
        for k, m in sets.get(name, []):
            twins[(name, json.dumps(k["concat"]))] = int(m)
    allow: dict[str, list[IPNetwork]] = {}
    for el in sets.get("fw-allow", []):
        el, _ = key_of(el)
        parts = el["concat"]
        net = parts[3]
        n = ipaddress.ip_network(f"{net['prefix']['addr']}/{net['prefix']['len']}") \
            if isinstance(net, dict) and "prefix" in net else \
            (ipaddress.ip_network(f"{net['range'][0]}") if isinstance(net, dict) else
             ipaddress.ip_network(net))
        allow.setdefault(json.dumps(parts[:3]), []).append(n)
    out = []
    unspec = ipaddress.ip_address(0 if version == 4 else "::")
    for name in ("frontends", "frontends-nodeports"):
        for el in sets.get(name, []):
            el, comment = key_of(el)
            parts = el["concat"]
            nodeport = name == "frontends-nodeports"
            if nodeport:
                ip, proto, port = unspec, parts[0], int(parts[1])
            else:
                ip, proto, port = ipaddress.ip_address(parts[0]), parts[1], int(parts[2])
            name_, kind_s, flags_s, aff_s = (comment.split("|") + ["", "0", "0", "0"])[:4]
            p = Protocol[str(proto).upper()]
            kw: dict[str, Any] = dict(kind=FrontendKind(int(kind_s)),
                                      flags=ServiceFlag(int(flags_s)),
                                      affinity_timeout=int(aff_s))
            bes: tuple[Backend, ...] = ()
            for k in services:
                if k.fwmark == 0 and k.version == version and k.protocol == int(p) and \
                        k.port == port and (k.addr in nodeport_ips if nodeport
                                            else k.addr == str(ip)):
                    bes = dests(k)
                    break
            tw = twins.get(("twin-nodeports" if nodeport else "twin", json.dumps(parts)))
            if tw:
                kw["cluster_backends"] = dests(render.VKey(version, 0, "", 0, tw))
            ranges = allow.get(json.dumps(parts))
            if ranges:
                kw["source_ranges"] = tuple(ipaddress.collapse_addresses(ranges))  # type: ignore[arg-type]
            out.append(ServiceEntry.make(Frontend(ip, port, p), bes, name_, **kw))
    return out

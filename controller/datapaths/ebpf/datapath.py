"""The eBPF datapath: compile, pin, attach, program.

Lifecycle:

* ``start()`` compiles the programs (bcc), opens or creates the pinned maps,
  adopts whatever a previous kpr left in them, and attaches at tc ingress/egress on
  the links matching ``interfaces`` (atomic replace; see tc.py).
* ``sync()`` programs the service maps (maps.py).
* ``close()`` stops the link watcher and leaves everything in place: the filters keep
  the programs loaded and the programs keep the maps, so forwarding continues while
  kpr is down or restarting, as kube-proxy's rules do.
* ``cleanup()`` removes the filters, the clsact qdiscs left empty, and the pins
  (a datapath switch keeps the qdiscs: tc.py).

Instances are isolated by pin directory (``<bpffs>/kpr/<instance>``) and, for tc, by
network namespace; tests and simulated nodes run several on one machine.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable

from controller import kernel
from controller.datapaths.base import DatapathError, Probe, SyncResult
from controller.datapaths.ebpf import handover, layouts, loader, nodenet, sock, tc
from controller.datapaths.ebpf.maps import (
    BpfMap,
    Key,
    MapOpError,
    Plan,
    SCOPE_EXTERNAL,
    Record,
    ServiceMaps,
    canonical,
    records,
)
from controller.model import Diff, Frontend, IPNetwork, Protocol, ServiceEntry, State
from controller.netns import in_netns, open_ipr

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/kpr")
STATE_F_COEXIST = loader.consts()["STATE_F_COEXIST"]


@dataclass(frozen=True, slots=True)
class EbpfConfig:
    """Settings of the eBPF datapath."""

    interfaces: list[str] = field(default_factory=list)
    """Link names/globs to attach to."""
    instance: str = "default"
    """Instance name: pin directory and filter names."""
    pin_root: Path = DEFAULT_PIN_ROOT
    """Parent of the per-instance pin directory on bpffs."""
    sizes: loader.MapSizes = field(default_factory=loader.MapSizes)
    """Map capacities."""
    netns: str | None = None
    """Named network namespace to attach in (None: the process's own)."""
    nodeport_addresses: tuple[str, ...] = ()
    """--nodeport-addresses: CIDRs and/or "primary"; empty: every node address."""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """--cluster-cidr: detect-local for masquerade and policy decisions, per family."""
    masquerade_all: bool = False
    """masqueradeAll."""
    masquerade_address: str = ""
    """The node addresses to masquerade with, one per family, comma-separated; a family
    without one uses its primary address."""
    clock_hz: int | None = None
    """The kernel's tick rate for the flow clock (kpr_consts.h, KPR_HZ): None finds
    it (kernel.clock_hz); 0 uses the nanosecond clock."""
    lb_algorithm: str = "random"
    """random or maglev, for Services without the annotation."""
    cgroup: Path | None = None
    """cgroup v2 directory for the socket programs (host traffic); None: not attached."""
    timeouts: loader.Timeouts = field(default_factory=loader.Timeouts)
    """Flow lifetimes (kube-proxy's conntrack.tcpEstablishedTimeout and
    tcpCloseWaitTimeout)."""
    takeover: bool = False
    """Take over the flows netfilter translates for kpr's frontends (a switch from a
    classic datapath; handover.Takeover). ``kpr run`` sets it and calls
    after_switch() after its first sync."""
    classic_rules: bool = False
    """A classic datapath's rules are in place at start (a switch to eBPF): until
    they are removed netfilter may open flows for kpr's frontends, so only a SYN
    opens a flow here meanwhile (KPR_SVC_F_SYN_ONLY); other new packets go on to
    those rules. Without them (a first start, a restart) nothing waits."""
    rollback_export: bool = False
    """On close(), leave the previous map layout's pins beside this one's, so that a
    rollback to the previous release keeps every flow (layouts.export_previous).
    ``kpr run`` sets it; tests that restart in place do not need it."""

    @property
    def pin_dir(self) -> Path:
        return self.pin_root / self.instance


def _unsupported(e: ServiceEntry) -> str:
    """Why this datapath cannot program an entry yet ("" when it can)."""
    if e.frontend.protocol == Protocol.SCTP:
        return "sctp"
    return ""


class EbpfDatapath:
    """tc programs + pinned maps."""

    name = "ebpf"

    def __init__(self, cfg: EbpfConfig) -> None:
        self.cfg = cfg
        self.bpf: loader.Loaded | None = None
        self.maps: ServiceMaps | None = None
        self.attacher: tc.TcAttacher | None = None
        self.prog_fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.unprogrammed: dict[Frontend, str] = {}
        """Frontends skipped, with the reason (exported as a metric)."""
        self.node_maps: nodenet.NodeMaps | None = None
        self.node: nodenet.NodeNet | None = None
        """The node facts last written to the maps."""
        self._cookie = 0
        self._hz = 0
        self._upgrade: layouts.Upgrade | None = None
        self._takeover: handover.Takeover | None = None
        """Flows netfilter translated when this datapath started (a switch from a
        classic datapath): seeded by the first full sync, taken by after_switch()."""

    # ----- protocol -------------------------------------------------------------------

    def probe(self) -> Probe:
        denied = kernel.bpf_usable()
        if denied:
            return Probe(False, denied)
        try:
            h = kernel.resolve_headers()
        except kernel.KernelHeadersError as e:
            return Probe(False, str(e))
        if not Path("/sys/kernel/btf/vmlinux").exists() and not Path("/proc/kallsyms").exists():
            return Probe(False, "no BPF support visible in this kernel")
        # found, not imported: importing bcc loads libbcc and LLVM (61 MB of RSS);
        # only the build child imports it
        if importlib.util.find_spec("bcc") is None:
            return Probe(False, "bcc's Python module is missing (Debian: python3-bpfcc)")
        return Probe(True, f"kernel headers from {h.how} ({h.path})")

    def start(self) -> None:
        """Compile, load, adopt pinned state, attach."""
        self.load()
        # until every interface has these programs, the ones they replace may see
        # some packets of a flow these open (kpr_maps.h, lb_state)
        self._coexist(True)
        self.refresh_node()
        if self.cfg.interfaces:
            self.attacher = tc.TcAttacher(self.cfg.interfaces, self.prog_fds["ingress"],
                                          self.prog_fds["egress"], self.cfg.instance,
                                          netns=self.cfg.netns, on_event=self.refresh_node)
            self.attacher.start()
        if self.cfg.cgroup is not None:
            try:
                sock.attach(self.cfg.pin_dir, self.cfg.cgroup, self.prog_fds)
            except OSError as e:
                raise DatapathError(f"attaching socket programs to cgroup {self.cfg.cgroup}: "
                                    f"{e}") from e
        if self._upgrade is not None:
            assert self.bpf is not None
            try:
                self._upgrade.finish(self.bpf.maps)
            except (OSError, MapOpError) as e:
                log.error("finishing the upgrade from layout v%d: %s (flows opened "
                          "during the upgrade may be re-balanced)", layouts.PREVIOUS, e)
            self._upgrade = None
        self._coexist(False)  # every interface has these programs now

    def load(self) -> None:
        """Compile and load the programs and maps, without attaching."""
        if self.bpf is not None:
            return
        hz = kernel.clock_hz() if self.cfg.clock_hz is None else self.cfg.clock_hz
        self._hz = hz
        kernel.ensure_bpffs()
        try:
            self._upgrade = layouts.Upgrade.prepare(self.cfg.pin_dir, self.cfg.sizes, hz)
        except layouts.LayoutError as e:
            raise DatapathError(str(e)) from e
        try:
            self.bpf = loader.load(self.cfg.pin_dir, self.cfg.sizes, programs=sock.PROGRAMS,
                                   hz=hz, timeouts=self.cfg.timeouts)
        except loader.CompileError as e:
            raise DatapathError(str(e)) from e
        self._takeover = handover.Takeover(
            hz, self.cfg.netns, guard=self.cfg.classic_rules) if self.cfg.takeover else None
        if self._upgrade is not None:
            try:
                self._upgrade.convert(self.bpf.maps)
            except (OSError, MapOpError) as e:
                log.error("converting the maps of layout v%d failed: %s; their flows are "
                          "not carried over", layouts.PREVIOUS, e)
        self.prog_fds = dict(self.bpf.prog_fds)
        self.maps = ServiceMaps(self.bpf, self.cfg.sizes.maglev_size)
        self.node_maps = nodenet.NodeMaps(self.bpf)
        if self.cfg.netns:
            self._cookie = in_netns(self.cfg.netns, nodenet.netns_cookie)
        else:
            self._cookie = nodenet.netns_cookie()
        log.info("eBPF programs loaded; maps pinned in %s", self.cfg.pin_dir)

    def refresh_node(self) -> None:
        """Read the node's addresses and write the node maps if they changed."""
        if self.node_maps is None:
            return
        try:
            with open_ipr(self.cfg.netns) as ipr:
                net = nodenet.discover(ipr, self.cfg.nodeport_addresses, self.cfg.cluster_cidrs,
                                       self.cfg.masquerade_all, self.cfg.masquerade_address,
                                       self._cookie)
            with self._lock:
                self.node_maps.write(net)
        except (MapOpError, OSError) as e:
            log.warning("eBPF datapath: updating node addresses failed: %s", e)
            return
        if net != self.node:
            log.info("node addresses %s; NodePorts on %s; masquerading as %s",
                     ",".join(map(str, net.addresses)) or "-",
                     ",".join(map(str, net.nodeport)) or "-",
                     ",".join(map(str, net.snat)) or "- (off)")
            self.node = net

    def _records(self, e: ServiceEntry) -> list[Record] | None:
        """The map records of an entry; None (and a recorded reason) for what this
        datapath cannot program yet, rather than programming it wrong."""
        reason = _unsupported(e)
        if reason:
            if self.unprogrammed.get(e.frontend) != reason:
                log.warning("eBPF datapath: %s (%s) not programmed: %s is not implemented "
                            "yet", e.frontend, e.name, reason)
            self.unprogrammed[e.frontend] = reason
            return None
        self.unprogrammed.pop(e.frontend, None)
        return records(e, self.cfg.lb_algorithm == "maglev")

    def _wanted(self, state: State, key: Key) -> bool:
        """Whether a full sync of ``state`` programs ``key`` (without building every
        record: a twin key is rare, and only it needs its entry's records)."""
        e = state.get(key[0])
        if e is None or _unsupported(e):
            return False
        return key[1] == SCOPE_EXTERNAL or any(
            r.key == key for r in records(e, self.cfg.lb_algorithm == "maglev"))

    def canonical(self, state: Iterable[ServiceEntry]) -> State:
        """The State ``dump()`` returns once ``state`` is programmed."""
        return State(canonical(e, self.cfg.lb_algorithm == "maglev") for e in state
                     if not _unsupported(e))

    def sync(self, state: State, diff: Diff | None) -> SyncResult:
        assert self.maps is not None, "start() first"
        if diff is None:
            self.refresh_node()
        with self._lock:
            try:
                if diff is None:
                    self.unprogrammed = {}
                    ops = self.maps.full_sync(
                        (r for e in state.values() for r in self._records(e) or ()),
                        functools.partial(self._wanted, state), self._seed_hook())
                else:
                    upserted: list[Record] = []
                    removed: list[Key] = []
                    for f in diff.removed:
                        self.unprogrammed.pop(f, None)
                        removed += [(f, sc) for sc in self.maps.scopes(f)]
                    for e in diff.upserted:
                        rs = self._records(e) or []
                        upserted += rs
                        keep = {r.scope for r in rs}
                        removed += [(e.frontend, sc) for sc in self.maps.scopes(e.frontend)
                                    if sc not in keep]
                    ops = self.maps.incremental_sync(upserted, removed)
            except (MapOpError, OSError, ValueError) as e:
                raise DatapathError(str(e)) from e
            return SyncResult(full=diff is None, ops=ops, frontends=self.maps.programmed())

    def _seed_hook(self) -> Callable[[Plan], None] | None:
        """While flows wait to be taken over from netfilter: a hook that writes them
        into conntrack before the services entries go in (handover.Takeover)."""
        t, maps, bpf = self._takeover, self.maps, self.bpf
        if t is None or maps is None or bpf is None:
            return None
        addrs = frozenset(self.node.addresses) if self.node is not None else frozenset()
        ct_map = BpfMap(bpf["conntrack"], "conntrack")

        def hook(plan: Plan) -> None:
            t.seed(maps, addrs, ct_map, plan)

        return hook

    def after_switch(self) -> None:
        """The previous datapath is removed (after the first sync): take over the
        flows netfilter translated for it (handover.Takeover.finish)."""
        t, self._takeover = self._takeover, None
        if t is None or self.bpf is None or self.maps is None:
            return
        addrs = frozenset(self.node.addresses) if self.node is not None else frozenset()
        with self._lock:
            t.finish(self.maps, addrs, {n: BpfMap(self.bpf[n], n) for n in (
                "conntrack", "revnat", "snat", "unsnat", "services")})

    def dump(self) -> State:
        assert self.maps is not None, "start() first"
        return self.maps.dump()

    def _coexist(self, on: bool) -> None:
        """Set or clear KPR_STATE_F_COEXIST: whether another build's programs may run
        beside these (an attach or a stop in progress; see kpr_maps.h, lb_state)."""
        if self.bpf is None:
            return
        try:
            loader.set_state(self.bpf.maps, STATE_F_COEXIST if on else 0)
        except OSError as e:
            log.warning("eBPF datapath: %s", e)

    def close(self) -> None:
        if self.attacher:
            self.attacher.stop()
        # the programs stay; whichever build starts next may not know half_open
        self._coexist(True)
        if self.cfg.rollback_export and self.bpf is not None:
            with self._lock:
                try:
                    layouts.export_previous(self.cfg.pin_dir, self.bpf.maps, self._hz)
                except (OSError, MapOpError) as e:
                    log.error("leaving layout v%d's maps for a rollback failed: %s",
                              layouts.PREVIOUS, e)

    def cleanup(self) -> None:
        if self.attacher:
            self.attacher.stop()
        cleanup(self.cfg.pin_dir, self.cfg.netns, keep_qdisc=False)
        if self.bpf is not None:
            self.bpf.close()
            self.bpf = None
            self.prog_fds = {}

    # ----- observability --------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters from the per-CPU stats map, summed over CPUs."""
        assert self.bpf is not None
        stats = BpfMap(self.bpf["stats"], "stats", batch=False)
        slot = (stats.value_size + 7) // 8 * 8
        cpus = kernel.possible_cpus()
        out: dict[str, int] = {}
        for i, name in enumerate(loader.stat_names()):
            raw = stats.lookup(struct.pack("=I", i), slot * cpus) or b""
            out[name] = sum(struct.unpack_from("=Q", raw, c * slot)[0]
                            for c in range(len(raw) // slot))
        return out

    def map_fill(self) -> dict[str, float]:
        assert self.maps is not None
        return self.maps.fill()


def cleanup(pin_dir: Path | None, netns: str | None = None, keep_qdisc: bool = True) -> int:
    """Remove kpr's tc filters in the namespace and the pin directory (idempotent);
    the clsact qdiscs too unless ``keep_qdisc`` (a datapath switch keeps them:
    tc.py's module docstring).

    With ``pin_dir=None`` every instance under the default pin root is removed."""
    removed = tc.detach_all(netns, keep_qdisc=keep_qdisc)
    target = pin_dir if pin_dir is not None else DEFAULT_PIN_ROOT
    if target.exists():
        shutil.rmtree(target)  # unlinking pins; maps die with their last user
        removed += 1
    return removed

"""The eBPF datapath: compile, pin, attach, program.

Lifecycle:

* ``start()`` compiles the programs (bcc), opens or creates the pinned maps,
  adopts whatever a previous kpr left in them, and attaches at tc ingress/egress on
  the links matching ``interfaces`` (atomic replace; see tc.py).
* ``sync()`` programs the service maps (maps.py).
* ``close()`` stops the link watcher and leaves everything in place: the filters keep
  the programs loaded and the programs keep the maps, so forwarding continues while
  kpr is down or restarting, as kube-proxy's rules do.
* ``cleanup()`` removes the filters, the clsact qdiscs left empty, and the pins.

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
from collections.abc import Iterable

from controller import kernel
from controller.datapaths.base import DatapathError, Probe, SyncResult
from controller.datapaths.ebpf import loader, nodenet, sock, tc
from controller.datapaths.ebpf.maps import (
    BpfMap,
    Key,
    MapOpError,
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

    def load(self) -> None:
        """Compile and load the programs and maps, without attaching."""
        if self.bpf is not None:
            return
        try:
            hz = kernel.clock_hz() if self.cfg.clock_hz is None else self.cfg.clock_hz
            self.bpf = loader.load(self.cfg.pin_dir, self.cfg.sizes, programs=sock.PROGRAMS,
                                   hz=hz, timeouts=self.cfg.timeouts)
        except loader.CompileError as e:
            raise DatapathError(str(e)) from e
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
                        functools.partial(self._wanted, state))
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

    def dump(self) -> State:
        assert self.maps is not None, "start() first"
        return self.maps.dump()

    def close(self) -> None:
        if self.attacher:
            self.attacher.stop()

    def cleanup(self) -> None:
        self.close()
        cleanup(self.cfg.pin_dir, self.cfg.netns)
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


def cleanup(pin_dir: Path | None, netns: str | None = None) -> int:
    """Remove kpr's tc filters in the namespace and the pin directory (idempotent).

    With ``pin_dir=None`` every instance under the default pin root is removed."""
    removed = tc.detach_all(netns)
    target = pin_dir if pin_dir is not None else DEFAULT_PIN_ROOT
    if target.exists():
        shutil.rmtree(target)  # unlinking pins; maps die with their last user
        removed += 1
    return removed

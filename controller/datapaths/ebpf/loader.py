"""Compile and load the BPF C in bpf/ with bcc.

bcc rewrites map method calls (``services.lookup(&k)``) only in its main source
buffer, not in included files (bcc 0.26), so the loader flattens the project's own
``#include "kpr_*.h"`` lines into one text, with ``#line`` markers that keep compiler
messages pointing at the real file and line. System includes are left to clang.

The compile runs in a process of its own (:mod:`controller.datapaths.ebpf.build`):
bcc and the LLVM 14 it links took 140 MB of the controller's RSS for good, a third
of its peak at 50,000 Services, for a step done once at start. The child loads the
programs, pins them in a staging directory and exits; this process opens the pinned
programs and maps by path (:func:`load`) and talks to them with bpf(2) alone
(controller.kernel), so it never loads libbcc. Cilium's agent likewise runs clang as
a separate process.

Maps are pinned under the instance's pin directory. A pinned map whose key size,
value size or capacity differs from what this build wants (a config change of map
sizes, or a layout change) is unpinned first, so it is recreated rather than reused
with the wrong shape.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller import kernel

log = logging.getLogger(__name__)

BPF_DIR = Path(os.environ.get("KPR_BPF_DIR") or Path(__file__).resolve().parents[3] / "bpf")
ENTRY = "kpr_tc.c"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_compile_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class MapSizes:
    """Capacities of the BPF maps (entries)."""

    services: int = 65536
    """Frontends (services)."""
    slots: int = 262144
    """Backend slots summed over all services."""
    backends: int = 131072
    """Distinct backend address:port pairs."""
    conntrack: int = 262144
    """Tracked flows (conntrack, revnat, snat and unsnat each; LRU)."""
    frag: int = 8192
    """Fragmented datagrams in flight (LRU)."""
    affinity: int = 65536
    """(service, client) pairs remembered for sessionAffinity ClientIP (LRU)."""
    half_open: int = 65536
    """Entries of half-open TCP flows (LRU; up to four per flow: conntrack and the
    reply side), apart from established ones so that a SYN flood evicts only its
    own kind."""
    maglev: int = 1024
    """Services using Maglev (one lookup table each)."""
    maglev_size: int = 16381
    """Entries of each Maglev table (a prime)."""
    source_ranges: int = 16384
    """loadBalancerSourceRanges entries over all services."""

    def defines(self) -> list[str]:
        return [f"-DKPR_MAX_SERVICES={self.services}", f"-DKPR_MAX_SLOTS={self.slots}",
                f"-DKPR_MAX_BACKENDS={self.backends}", f"-DKPR_MAX_CT={self.conntrack}",
                f"-DKPR_MAX_FRAG={self.frag}", f"-DKPR_MAX_AFFINITY={self.affinity}",
                f"-DKPR_MAX_MAGLEV={self.maglev}", f"-DKPR_MAGLEV_SIZE={self.maglev_size}",
                f"-DKPR_MAX_SRC_RANGES={self.source_ranges}",
                f"-DKPR_MAX_HALF_OPEN={self.half_open}"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Flow lifetimes of the programs' conntrack (compiled in; kpr_consts.h)."""

    tcp_established: int = 86400
    """Seconds an idle TCP flow keeps its backend: kube-proxy's
    conntrack.tcpEstablishedTimeout (24 h)."""
    tcp_close_wait: int = 3600
    """Seconds a TCP flow keeps its backend after the client's FIN (it may be half
    closed): kube-proxy's conntrack.tcpCloseWaitTimeout (1 h)."""

    def defines(self) -> list[str]:
        return [f"-DKPR_CT_TCP_SECS={self.tcp_established}",
                f"-DKPR_CT_CLOSE_WAIT_SECS={self.tcp_close_wait}"]


def flatten(name: str = ENTRY, bpf_dir: Path = BPF_DIR) -> str:
    """The entry file with local includes inlined once each (see module docstring)."""
    seen: set[str] = set()

    def expand(fname: str) -> list[str]:
        if fname in seen:
            return []
        seen.add(fname)
        out = [f'#line 1 "{fname}"\n']
        for lineno, line in enumerate((bpf_dir / fname).read_text().splitlines(True), 1):
            m = _INCLUDE.match(line)
            if m and (bpf_dir / m.group(1)).exists():
                out += expand(m.group(1))
                out.append(f'#line {lineno + 1} "{fname}"\n')
            else:
                out.append(line)
        return out

    return "".join(expand(name))


_DEFINE = re.compile(r"^#define (KPR_[A-Z0-9_]+) (0x[0-9a-fA-F]+|[0-9]+)\b", re.M)


def consts(bpf_dir: Path = BPF_DIR) -> dict[str, int]:
    """The integer #defines of kpr_consts.h (flags, scopes), by name without KPR_."""
    text = (bpf_dir / "kpr_consts.h").read_text()
    return {m.group(1)[4:]: int(m.group(2), 0) for m in _DEFINE.finditer(text)}


def stat_names(bpf_dir: Path = BPF_DIR) -> list[str]:
    """Names of enum kpr_stat in index order, read from kpr_consts.h."""
    text = (bpf_dir / "kpr_consts.h").read_text()
    body = text[text.index("enum kpr_stat"):]
    body = body[body.index("{") + 1: body.index("}")]
    names = re.findall(r"KPR_STAT_([A-Z0-9_]+)", body)
    return [n.lower() for n in names if n != "MAX"]


LAYOUT = "_v4"
"""Pin name suffix: kpr_maps.h's layout version (KPR_PIN)."""

# (pin file name, the MapSizes attribute that sets its capacity)
_PINNED: list[tuple[str, str]] = [(name + LAYOUT, attr) for name, attr in [
    ("services", "services"), ("backend_slots", "slots"), ("members", "slots"),
    ("backends", "backends"), ("conntrack", "conntrack"), ("revnat", "conntrack"),
    ("snat", "conntrack"), ("unsnat", "conntrack"), ("frags", "frag"),
    ("svc_names", "services"), ("affinity", "affinity"), ("maglev", "maglev"),
    ("src_ranges", "source_ranges"), ("cluster_ips", "services"),
    ("sock_revnat", "conntrack"), ("half_open", "half_open"),
]]


_EXTRA = {"backends" + LAYOUT: 1}
"""Entries a map has beyond its MapSizes capacity: the backends array's index 0,
which is never an id (a slot holding 0 finds a free entry)."""

def _unpin_mismatched(pin_dir: Path, sizes: MapSizes, bpf_dir: Path = BPF_DIR) -> None:
    # Pins of other layouts are layouts.py's: migrated, kept for a rollback, or
    # refused (a newer layout in use), before this runs.
    for fname, attr in _PINNED:
        path = pin_dir / fname
        info = kernel.pinned_map_info(path)
        want = getattr(sizes, attr) + _EXTRA.get(fname, 0)
        if info is not None and info.max_entries != want:
            log.warning("pinned map %s holds %d entries, config wants %d: recreating it",
                        path, info.max_entries, want)
            path.unlink()
    # A counter added to enum kpr_stat: the array grows (the counters start again;
    # a Prometheus rate() reads that as a counter reset). bcc 0.26 reuses a pin of
    # the wrong size without a word, and the new counter, past its end, would count
    # nothing.
    path = pin_dir / f"stats{LAYOUT}"
    info = kernel.pinned_map_info(path)
    if info is not None and info.max_entries != len(stat_names(bpf_dir)):
        log.warning("pinned map %s holds %d counters, the programs count %d: recreating it",
                    path, info.max_entries, len(stat_names(bpf_dir)))
        path.unlink()
    # The Maglev table size is the value size, not the capacity.
    path = pin_dir / f"maglev{LAYOUT}"
    info = kernel.pinned_map_info(path)
    if info is not None and info.value_size != 4 * sizes.maglev_size:
        log.warning("pinned map %s has Maglev tables of %d entries, config wants %d: "
                    "recreating it", path, info.value_size // 4, sizes.maglev_size)
        path.unlink()


def sizes_from_pins(pin_dir: Path) -> MapSizes | None:
    """The capacities of an existing pin directory's maps (None: nothing pinned).

    Readers such as ``kpr status`` open the maps with these, so they never recreate
    a running instance's maps."""
    found: dict[str, int] = {}
    for fname, attr in _PINNED:
        info = kernel.pinned_map_info(pin_dir / fname)
        if info is not None:
            found[attr] = info.max_entries - _EXTRA.get(fname, 0)
            if attr == "maglev":
                found["maglev_size"] = info.value_size // 4
    if "services" not in found:
        return None
    return MapSizes(**found)


@dataclass(frozen=True, slots=True)
class MapHandle:
    """An open pinned map."""

    fd: int
    """This process's descriptor for it."""
    key_size: int
    """Bytes per key."""
    value_size: int
    """Bytes per value (per CPU for per-CPU maps)."""
    max_entries: int
    """Capacity."""
    map_type: int
    """enum bpf_map_type."""


MAP_NAMES = ("services", "backend_slots", "backends", "members", "maglev", "conntrack",
             "revnat", "snat", "unsnat", "affinity", "src_ranges", "local_cidrs",
             "cluster_ips", "node_addrs", "node_config", "sock_revnat", "frags",
             "svc_names", "stats", "half_open")
"""Every map of kpr_maps.h, by its C name (pinned as name + LAYOUT)."""

STAGED_MAPS = ("ct_prev", "lb_state")
"""Maps of kpr_maps.h that are never pinned (each load has its own) but that the
controller writes: the build child pins them in the staging directory for load()
to open. ct_prev: the previous layout's conntrack during an upgrade or a rollback
export (layouts.py); lb_state: the load's KPR_STATE_F_* flags (set_state)."""

TC_PROGRAMS = ("ingress", "egress")
"""The tc programs: kpr_<name>, BPF_PROG_TYPE_SCHED_CLS."""


@dataclass
class Loaded:
    """The programs and maps of one pin directory, opened in this process."""

    prog_fds: dict[str, int]
    """Program name (ingress, egress, connect4, ...) -> fd."""
    maps: dict[str, MapHandle]
    """C name -> open map."""

    def __getitem__(self, name: str) -> MapHandle:
        return self.maps[name]

    def close(self) -> None:
        for fd in [*self.prog_fds.values(), *(m.fd for m in self.maps.values())]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.prog_fds, self.maps = {}, {}


def open_maps(pin_dir: Path) -> dict[str, MapHandle]:
    """Open every pinned map of a pin directory (raises OSError if one is missing)."""
    out: dict[str, MapHandle] = {}
    try:
        for name in MAP_NAMES:
            fd = kernel.obj_get(pin_dir / (name + LAYOUT))
            info = kernel.map_info(fd)
            out[name] = MapHandle(fd, info.key_size, info.value_size, info.max_entries,
                                  info.type)
    except OSError:
        for m in out.values():
            os.close(m.fd)
        raise
    return out


def set_state(maps: dict[str, MapHandle], flags: int) -> None:
    """Write a load's lb_state (KPR_STATE_F_*; see kpr_maps.h)."""
    import ctypes

    h = maps.get("lb_state")
    if h is None:
        return
    key, val = ctypes.c_uint32(0), ctypes.c_uint32(flags)
    if kernel.map_update_elem(h.fd, key, val) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"lb_state: update: {os.strerror(err)}")


class CompileError(RuntimeError):
    """The BPF C did not compile or load; the message ends with the compiler's."""


def load(pin_dir: Path, sizes: MapSizes, bpf_dir: Path = BPF_DIR,
         programs: tuple[tuple[str, int], ...] = (), hz: int = 0,
         timeouts: Timeouts = Timeouts()) -> Loaded:
    """Compile and load in a child process, then open what it pinned.

    ``programs``: the socket programs, (name, attach type) as in sock.PROGRAMS.
    ``hz``: the kernel's tick rate, for the jiffies clock (0: the nanosecond one;
    see KPR_HZ in kpr_consts.h)."""
    import json
    import secrets
    import subprocess
    import sys

    kernel.ensure_bpffs()
    pin_dir.mkdir(parents=True, exist_ok=True)
    # bpffs refuses names with a dot (bpf_lookup, every kernel)
    stage = pin_dir / f"staging_{os.getpid()}_{secrets.token_hex(3)}"
    stage.mkdir()
    try:
        root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ, KPR_BPF_DIR=str(bpf_dir),
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                              if p))
        with _compile_lock:
            p = subprocess.run(
                [sys.executable, "-m", "controller.datapaths.ebpf.build", "--pin-dir",
                 str(pin_dir), "--stage", str(stage), "--sizes",
                 json.dumps(dataclasses.asdict(sizes)), "--programs", json.dumps(programs),
                 "--hz", str(hz), "--timeouts", json.dumps(dataclasses.asdict(timeouts))],
                capture_output=True, text=True, env=env, timeout=600)
        for line in p.stderr.splitlines():
            if line.strip():
                log.warning("bpf build: %s", line)
        if p.returncode != 0:
            tail = "\n".join(p.stderr.strip().splitlines()[-20:])
            raise CompileError(f"compiling the BPF programs failed (exit {p.returncode}):\n"
                               f"{tail}")
        fds: dict[str, int] = {}
        maps: dict[str, MapHandle] = {}
        try:
            for name in (*TC_PROGRAMS, *(n for n, _ in programs)):
                fds[name] = kernel.obj_get(stage / name)
            maps = open_maps(pin_dir)
            for name in STAGED_MAPS:
                fd = kernel.obj_get(stage / name)
                info = kernel.map_info(fd)
                maps[name] = MapHandle(fd, info.key_size, info.value_size,
                                       info.max_entries, info.type)
        except OSError:
            for fd in [*fds.values(), *(m.fd for m in maps.values())]:
                os.close(fd)
            raise
        return Loaded(fds, maps)
    finally:
        for f in stage.iterdir():
            f.unlink()
        stage.rmdir()


def compile_program(pin_dir: Path, sizes: MapSizes, bpf_dir: Path = BPF_DIR,
                    hz: int = 0, timeouts: Timeouts = Timeouts()) -> Any:
    """Compile the programs and create/open the pinned maps. Returns a bcc.BPF.
    (The build child's step; see load().)"""
    kernel.ensure_bcc_headers()
    kernel.ensure_bpffs()
    pin_dir.mkdir(parents=True, exist_ok=True)
    _unpin_mismatched(pin_dir, sizes, bpf_dir)
    from bcc import BPF  # imported late: importing bcc is slow and needs root

    cflags = [f'-DKPR_PIN_DIR="{pin_dir}"', *sizes.defines(), *timeouts.defines(),
              f"-DKPR_HZ={hz}",
              "-Wno-unused-function"]
    with _compile_lock:  # bcc/LLVM state is process-global
        return BPF(text=flatten(ENTRY, bpf_dir), cflags=cflags)

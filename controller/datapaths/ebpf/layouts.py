"""Carrying flows across map layouts: upgrades from the previous layout, rollbacks to it.

The pins carry their layout in their names (``conntrack_v4``; see kpr_maps.h), and a
layout change means a changed struct. Without this module an upgrade would start on
new, empty maps and reset every flow, and a rollback would do the same the other way.
Instead each layout knows its predecessor's structs and converts in both directions:

* **Upgrade** (:class:`Upgrade`). When the running programs use the previous
  layout's maps, the maps whose structs did not change are linked under the new
  names before the compile, so bcc adopts the very same map objects (nothing is
  copied, and the running programs and the new ones share them). The maps whose
  structs changed (``CONVERTED``) are created new by bcc and filled from the old
  ones before the new programs attach. The old conntrack also goes into ct_prev's
  import slot (kpr_maps.h): a flow the old programs open after that copy is looked
  up there on its first packet through the new programs (kpr_ct_import), so the
  swap has no window; after it a second pass copies the rest and empties the slot. Backend ids carry over unchanged when
  they fit the new backends array; otherwise they are renumbered, and every map
  that holds one (``BY_ID``) is copied with the new numbers instead of linked.
* **Rollback** (:func:`export_previous`). An older kpr cannot know a newer layout,
  so on a graceful stop (SIGTERM: a DaemonSet rolling update, including ``kubectl
  rollout undo``) this kpr leaves the previous layout's pins beside its own: links
  to its own maps where the structs agree, and converted copies of the others. The
  exported conntrack is in ct_prev's export slot from before the copy, so every flow
  the programs open until the older kpr's programs replace them is written there
  too (kpr_ct_export). The older kpr then adopts them as its own, with every flow. A restart of this kpr
  finds those pins unused by any program and removes them.
* **A newer layout** than this kpr's, in use by running programs, is refused
  (:class:`LayoutError`): kpr exits and leaves the running programs, their filters
  and their maps alone.

Whether a layout is "in use" is read from the kernel: the ids of the maps that
loaded programs reference (controller.kernel.maps_in_use), against the id of the
pinned conntrack map of each layout. That stays right whichever of the two was
started last, and across an upgrade, a rollback and an upgrade again.

Clock: layout v3 stamps flows with bpf_ktime_get_coarse_ns; v4 with the programs'
flow clock (jiffies when the tick rate is known, see KPR_HZ). Timestamps are
converted by age, so a flow keeps the time it has left.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import re
import struct
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from controller import kernel
from controller.datapaths.ebpf import loader
from controller.datapaths.ebpf.maps import BpfMap

log = logging.getLogger(__name__)

CURRENT = int(loader.LAYOUT.removeprefix("_v"))
"""This build's layout version."""
PREVIOUS = CURRENT - 1
"""The layout this build upgrades from and exports for a rollback."""

LINKED = ("services", "revnat", "snat", "unsnat", "src_ranges", "local_cidrs",
          "cluster_ips", "node_addrs", "node_config", "sock_revnat", "frags", "svc_names")
"""Maps whose key and value are the same in both layouts and hold no backend id:
one map object serves both."""
BY_ID = ("backend_slots", "members", "maglev")
"""Maps of the same structs that hold backend ids: shared while the ids carry over
unchanged, copied with the new numbers when they do not."""
CONVERTED = ("backends", "conntrack", "affinity")
"""Maps whose value changed between the layouts (v4: the backends array with a
generation per occupant; conntrack and affinity keep that generation)."""
# stats: a per-CPU counter array; the counters start again (a Prometheus rate()
# reads that as a counter reset), as they do when a counter is added.

_BPF_MAP_TYPE_HASH = 1
_BPF_NOEXIST = 1
_PREV_IMPORT, _PREV_EXPORT = 0, 1         # KPR_PREV_* (ct_prev's slots)

# struct layouts, native order, as kpr_structs.h declares them
_BE3 = struct.Struct("=16sHBB")           # v3 struct kpr_backend
_BE4 = struct.Struct("=16sHBBI")          # v4: + gen
_CT = struct.Struct("=QII16sHHI")         # kpr_ct_value; v3's last word is padding
_AFF = struct.Struct("=QII")              # kpr_affinity_value; v3's last word is padding
_U32 = struct.Struct("=I")
_CT_F_CLOSING, _CT_F_RST = 0x1, 0x2       # KPR_CT_F_*
_BE_F_GONE = 0x1                          # KPR_BE_F_GONE
_V3_TCP_SECS = 21600                      # v3's established lifetime (6 h)
_NSEC = 1_000_000_000

_PIN = re.compile(r"([a-z0-9_]+)_v([0-9]+)")


class LayoutError(RuntimeError):
    """Running programs use a map layout this build cannot adopt."""


@dataclass(frozen=True, slots=True)
class Clock:
    """A flow clock (kpr_now): its ticks per second and its value now."""

    per_sec: int
    """Ticks per second: CONFIG_HZ for jiffies, 10^9 for nanoseconds."""
    now: int
    """The clock's current value."""

    @staticmethod
    def of(hz: int) -> Clock:
        """The programs' clock for ``hz`` (0: bpf_ktime_get_coarse_ns)."""
        if hz:
            j = kernel.jiffies()
            if j is not None:
                return Clock(hz, j)
            log.warning("jiffies unreadable (/proc/timer_list): migrated flows restart "
                        "their lifetimes")
            return Clock(hz, -1)
        return Clock(_NSEC, time.clock_gettime_ns(time.CLOCK_MONOTONIC))

    def convert(self, stamp: int, to: Clock) -> int:
        """A timestamp of this clock in ``to``, at the same age (never in the future)."""
        if self.now < 0 or to.now < 0:
            return max(to.now, 0)
        age = max(0, self.now - stamp) * to.per_sec // self.per_sec
        return max(0, to.now - age)


def _layout(name: str) -> tuple[str, int] | None:
    m = _PIN.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


def _pins(pin_dir: Path, version: int) -> dict[str, Path]:
    """Map name -> pin of one layout in a pin directory."""
    out: dict[str, Path] = {}
    for path in pin_dir.iterdir() if pin_dir.is_dir() else ():
        nv = _layout(path.name)
        if nv and nv[1] == version:
            out[nv[0]] = path
    return out


def _map_id(path: Path) -> int | None:
    info = kernel.pinned_map_info(path)
    return None if info is None else int(info.id)


def _open(path: Path, name: str) -> BpfMap:
    fd = kernel.obj_get(path)
    info = kernel.map_info(fd)
    return BpfMap(loader.MapHandle(fd, info.key_size, info.value_size, info.max_entries,
                                   info.type), name)


def _relink(src: Path, dst: Path) -> None:
    """Pin the map at ``src`` also at ``dst`` (replacing what ``dst`` held)."""
    fd = kernel.obj_get(src)
    try:
        dst.unlink(missing_ok=True)
        kernel.obj_pin(fd, dst)
    finally:
        os.close(fd)


@dataclass
class Upgrade:
    """A migration from the previous layout's pins; see the module docstring.

    ``prepare`` (before the compile), ``convert`` (after it, before the maps are
    adopted and the programs attach), ``finish`` (after the attach)."""

    pin_dir: Path
    """The instance's pin directory."""
    old: dict[str, Path]
    """The previous layout's pins, by map name."""
    ids: dict[int, int]
    """Old backend id -> new one."""
    identity: bool
    """Whether every id carries over unchanged (BY_ID maps are then shared)."""
    hz: int
    """The new programs' tick rate (0: the nanosecond clock; see KPR_HZ)."""
    clock: Clock = Clock(_NSEC, 0)
    """The new programs' clock, read at each pass."""
    copied: dict[str, set[bytes]] = field(default_factory=dict)
    """Keys of conntrack and affinity copied by ``convert``."""
    counts: dict[str, int] = field(default_factory=dict)
    """Entries carried per converted map (for the log and the tests)."""

    @staticmethod
    def prepare(pin_dir: Path, sizes: loader.MapSizes, hz: int) -> Upgrade | None:
        """Look at the pin directory; link what can be shared; None when there is
        nothing to migrate. Raises LayoutError for a newer layout in use."""
        if not pin_dir.is_dir():
            return None
        in_use = kernel.maps_in_use()
        versions = sorted({nv[1] for p in pin_dir.iterdir() if (nv := _layout(p.name))})
        for v in versions:
            if v == CURRENT or v == PREVIOUS:
                continue
            pins = _pins(pin_dir, v)
            if v > CURRENT and _map_id(pins.get("conntrack", pin_dir / "-")) in in_use:
                raise LayoutError(
                    f"the programs running from {pin_dir} use map layout v{v}, newer than "
                    f"this kpr's v{CURRENT}: refusing to adopt it; the running programs, "
                    f"their filters and maps are left as they are (run a kpr of layout "
                    f"v{v} or later here, or 'kpr cleanup' to start over, resetting flows)")
            log.warning("pinned maps of layout v%d in %s are not in use: removing them", v,
                        pin_dir)
            for path in pins.values():
                path.unlink()
        old = _pins(pin_dir, PREVIOUS)
        if not old:
            return None
        cur_ct = pin_dir / f"conntrack{loader.LAYOUT}"
        old_live = _map_id(old.get("conntrack", pin_dir / "-")) in in_use
        cur_live = _map_id(cur_ct) in in_use
        if cur_live or (cur_ct.exists() and not old_live):
            # A rollback export this kpr left at its last stop, never adopted.
            log.info("maps of layout v%d in %s are not in use (this layout's are): "
                     "removing them", PREVIOUS, pin_dir)
            for path in old.values():
                path.unlink()
            return None
        missing = [n for n in (*LINKED, *BY_ID, *CONVERTED) if n not in old]
        if missing:
            log.warning("layout v%d in %s lacks %s: not migrating; starting on new maps",
                        PREVIOUS, pin_dir, ", ".join(missing))
            return None
        # The running programs are the previous layout's: this layout's pins, if any,
        # are what it left before a rollback, and stale.
        for path in _pins(pin_dir, CURRENT).values():
            path.unlink()
        be = _open(old["backends"], "backends")
        try:
            old_ids = sorted(array("I", be.items_packed()[0]))
        finally:
            os.close(be.fd)
        identity = not old_ids or old_ids[-1] <= sizes.backends
        ids = {i: i for i in old_ids} if identity else {
            i: n for n, i in enumerate(old_ids, 1)}
        for name in (*LINKED, *(BY_ID if identity else ())):
            _relink(old[name], pin_dir / f"{name}{loader.LAYOUT}")
        log.info("upgrading %s from map layout v%d: %d maps shared, %d converted; %d "
                 "backend ids %s", pin_dir, PREVIOUS,
                 len(LINKED) + (len(BY_ID) if identity else 0),
                 len(CONVERTED) + (0 if identity else len(BY_ID)), len(ids),
                 "kept" if identity else "renumbered")
        return Upgrade(pin_dir, old, ids, identity, hz)

    def convert(self, maps: dict[str, loader.MapHandle]) -> None:
        """Fill this layout's converted maps from the old ones (the new programs are
        loaded, not attached)."""
        old_clock = Clock(_NSEC, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        self.clock = Clock.of(self.hz)
        new_be = BpfMap(maps["backends"], "backends")
        src = _open(self.old["backends"], "backends_v%d" % PREVIOUS)
        try:
            kb, vb = src.items_packed()
            keys, vals = [], []
            for n, oid in enumerate(array("I", kb)):
                addr, port, proto, flags = _BE3.unpack_from(vb, n * _BE3.size)
                keys.append(_U32.pack(self.ids[oid]))
                vals.append(_BE4.pack(addr, port, proto, flags, 1))
            new_be.update_packed(b"".join(keys), b"".join(vals))
            self.counts["backends"] = len(keys)
        finally:
            os.close(src.fd)
        if not self.identity:
            self._renumber(maps)
        for name in ("conntrack", "affinity"):
            self.copied[name] = self._copy_flows(name, maps[name], old_clock, set())
        if self.identity:
            # the new programs look up a flow they miss in the old table (kpr_ct_import):
            # one the old programs open until the swap is found from the first packet
            src = _open(self.old["conntrack"], "conntrack")
            try:
                _slot(maps, _PREV_IMPORT, src.fd)
            except OSError as e:
                log.warning("%s; flows opened during the swap are carried by the second "
                            "pass alone", e)
            finally:
                os.close(src.fd)

    def _renumber(self, maps: dict[str, loader.MapHandle]) -> None:
        ids = self.ids
        for name in BY_ID:
            src = _open(self.old[name], name)
            try:
                kb, vb = src.items_packed()
            finally:
                os.close(src.fd)
            if name == "backend_slots":    # value: an id (0: an unfilled slot)
                vb = array("I", (ids.get(i, 0) for i in array("I", vb))).tobytes()
            elif name == "members":        # key: (svc_id, id)
                k = array("I", kb)
                k[1::2] = array("I", (ids.get(i, 0) for i in k[1::2]))
                kb = k.tobytes()
            else:                          # maglev: a table of ids per service
                vb = array("I", (ids.get(i, 0) for i in array("I", vb))).tobytes()
            BpfMap(maps[name], name).update_packed(kb, vb)

    def _copy_flows(self, name: str, handle: loader.MapHandle, old_clock: Clock,
                    skip: set[bytes]) -> set[bytes]:
        """Copy conntrack or affinity entries (not in ``skip``); returns their keys."""
        src = _open(self.old[name], name)
        dst = BpfMap(handle, name)
        done: set[bytes] = set()
        keys: list[bytes] = []
        vals: list[bytes] = []
        try:
            ks, vs = src.key_size, src.value_size
            kb, vb = src.items_packed()
        finally:
            os.close(src.fd)
        for i in range(len(kb) // ks):
            k = kb[i * ks:(i + 1) * ks]
            if k in skip:
                continue
            if name == "conntrack":
                seen, oid, sid, saddr, sport, flags, _ = _CT.unpack_from(vb, i * vs)
                if oid not in self.ids or old_clock.now - seen > _V3_TCP_SECS * _NSEC:
                    continue  # no backend left to keep, or expired under v3 already
                # v3 marked FIN and RST alike, for its 10 s lifetime: keep that
                if flags & _CT_F_CLOSING:
                    flags |= _CT_F_RST
                v = _CT.pack(old_clock.convert(seen, self.clock), self.ids[oid], sid, saddr,
                             sport, flags, 1)
            else:
                used, oid, _ = _AFF.unpack_from(vb, i * vs)
                if oid not in self.ids:
                    continue
                v = _AFF.pack(old_clock.convert(used, self.clock), self.ids[oid], 1)
            keys.append(k)
            vals.append(v)
            done.add(k)
        if skip:  # the second pass: never overwrite what the new programs wrote
            for k, v in zip(keys, vals):
                if kernel.map_update_elem(dst.fd, ct.create_string_buffer(k, ks),
                                          ct.create_string_buffer(v, vs), _BPF_NOEXIST) \
                        != 0 and ct.get_errno() != errno.EEXIST:
                    log.warning("migrating %s: update failed: %s", name,
                                os.strerror(ct.get_errno()))
        else:
            dst.update_packed(b"".join(keys), b"".join(vals))
        self.counts[name] = self.counts.get(name, 0) + len(keys)
        return done

    def finish(self, maps: dict[str, loader.MapHandle]) -> None:
        """After the new programs attached: copy the flows the old ones opened since
        ``convert``, then remove the previous layout's pins."""
        old_clock = Clock(_NSEC, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        self.clock = Clock.of(self.hz)
        for name in ("conntrack", "affinity"):
            self._copy_flows(name, maps[name], old_clock, self.copied.get(name, set()))
        _slot(maps, _PREV_IMPORT, None)
        for path in self.old.values():
            path.unlink(missing_ok=True)
        log.info("upgrade from layout v%d done: %s carried; its pins removed", PREVIOUS,
                 ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items())))


def _slot(maps: dict[str, loader.MapHandle], slot: int, inner: int | None) -> None:
    """Put a map into ct_prev's slot (None: empty it); see kpr_maps.h."""
    outer = maps.get("ct_prev")
    if outer is None:
        return
    key = ct.c_uint32(slot)
    if inner is None:
        rc = kernel.map_delete_elem(outer.fd, key)
        if rc != 0 and ct.get_errno() != errno.ENOENT:
            raise OSError(ct.get_errno(), f"emptying ct_prev slot {slot}")
        return
    val = ct.c_uint32(inner)
    if kernel.map_update_elem(outer.fd, key, val) != 0:
        raise OSError(ct.get_errno(), f"filling ct_prev slot {slot}: "
                      f"{os.strerror(ct.get_errno())}")


def export_previous(pin_dir: Path, maps: dict[str, loader.MapHandle], hz: int) -> None:
    """Leave the previous layout's pins beside this one's, for a rollback (see the
    module docstring). Called on a graceful stop, with the programs still running.

    The previous layout's conntrack goes into ct_prev's export slot before this
    layout's is read: from then on the programs write every flow they open into it
    too, until the older kpr's programs, adopting it, replace them. So no flow
    opened in between (that kpr's start takes seconds) is lost. Affinity entries
    made in between are not carried (a client may change backend once)."""
    t0 = time.monotonic()
    cur = {n: pin_dir / f"{n}{loader.LAYOUT}" for n in (*LINKED, *BY_ID)}
    for name, path in cur.items():
        _relink(path, pin_dir / f"{name}_v{PREVIOUS}")
    clock = Clock.of(hz)
    old_clock = Clock(_NSEC, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    # backends: the array's live entries, as a hash by id
    be = BpfMap(maps["backends"], "backends")
    live: dict[int, int] = {}     # id -> generation
    keys, vals = [], []
    for kraw, vraw, n in be._batches():
        for j in range(n):
            addr, port, proto, flags, gen = _BE4.unpack_from(vraw, j * _BE4.size)
            if proto and not flags & _BE_F_GONE:
                bid = _U32.unpack_from(kraw, j * 4)[0]
                live[bid] = gen
                keys.append(_U32.pack(bid))
                vals.append(_BE3.pack(addr, port, proto, 0))
    counts = {"backends": len(keys)}
    _publish("backends", (_BPF_MAP_TYPE_HASH, 4, _BE3.size, be.max_entries - 1, 0),
             b"".join(keys), b"".join(vals), pin_dir)
    for name, fmt in (("conntrack", _CT), ("affinity", _AFF)):
        src = BpfMap(maps[name], name)
        info = kernel.map_info(src.fd)
        spec = (int(info.type), src.key_size, src.value_size, src.max_entries,
                int(info.map_flags))
        # conntrack goes into ct_prev's slot: with its BTF (kernel.map_create_like)
        fd = (kernel.map_create_like(src.fd, src.max_entries, name) if name == "conntrack"
              else kernel.map_create(*spec, name))
        try:
            if name == "conntrack":
                try:
                    _slot(maps, _PREV_EXPORT, fd)
                except OSError as e:
                    log.warning("%s; flows opened before the older kpr takes over are "
                                "not carried", e)
            kb, vb = src.items_packed()
            ks, vs = src.key_size, src.value_size
            keys, vals = [], []
            for i in range(len(kb) // ks):
                if name == "conntrack":
                    seen, bid, sid, saddr, sport, flags, gen = _CT.unpack_from(vb, i * vs)
                    if live.get(bid) != gen:
                        continue  # its backend left (v3 would re-balance it anyway)
                    v = _CT.pack(clock.convert(seen, old_clock), bid, sid, saddr, sport,
                                 flags & _CT_F_CLOSING, 0)
                else:
                    used, bid, gen = _AFF.unpack_from(vb, i * vs)
                    if live.get(bid) != gen:
                        continue
                    v = _AFF.pack(clock.convert(used, old_clock), bid, 0)
                keys.append(kb[i * ks:(i + 1) * ks])
                vals.append(v)
            counts[name] = len(keys)
            _publish(name, spec, b"".join(keys), b"".join(vals), pin_dir, fd)
        finally:
            os.close(fd)
    log.info("left layout v%d's maps beside v%d's for a rollback: %d backends, %d flows, "
             "%d affinities (%.0f ms); new flows are written there too until the older "
             "kpr takes over", PREVIOUS, CURRENT, counts["backends"], counts["conntrack"],
             counts["affinity"], (time.monotonic() - t0) * 1000)


def _publish(name: str, spec: tuple[int, int, int, int, int], kb: bytes, vb: bytes,
             pin_dir: Path, fd: int | None = None) -> None:
    """Fill a map of the previous layout (created from ``spec`` unless ``fd``) and
    pin it under that layout's name."""
    mtype, ks, vs, cap, flags = spec
    own = fd is None
    if fd is None:
        fd = kernel.map_create(mtype, ks, vs, cap, flags, name)
    try:
        BpfMap(loader.MapHandle(fd, ks, vs, cap, mtype), name).update_packed(kb, vb)
        path = pin_dir / f"{name}_v{PREVIOUS}"
        path.unlink(missing_ok=True)
        kernel.obj_pin(fd, path)
    finally:
        if own:
            os.close(fd)

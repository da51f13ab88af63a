"""Programming the eBPF service maps: shadow, plan, ordered batch apply.

The writer keeps a shadow of what it believes the kernel holds (frontend -> service id
and slot list; backend address -> backend id with a reference count). A sync turns
the changed frontends into a :class:`Plan` of element writes and deletes, then
applies it in the order that keeps every packet consistent:

1. write new backends        (a slot never points at a missing backend)
2. write slots               (slots [0, count) exist before count grows)
3. write service values      (count grows last / shrinks first)
4. delete removed services
5. delete slots past count   (nothing reads them any more)
6. delete unreferenced backends

Each phase is one batch syscall per map (BPF_MAP_UPDATE_BATCH / DELETE_BATCH, kernel
5.6+), built from packed bytes rather than per-element ctypes objects.

Ids are reused across restarts (read back from the pinned maps, as Cilium's
reconciler does) and never recycled soon after release: they grow monotonically, so a
conntrack entry that names a deleted backend id finds nothing rather than another
backend.

A full sync first rebuilds the shadow from the kernel (adopting a previous process's
state and finding drift), then plans every frontend and prunes orphaned slots,
backends and names. On any failure the shadow is no longer trusted: the caller must
do a full sync next.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from controller.model import Backend, Frontend, Protocol, ServiceEntry, State

_BE = sys.byteorder  # __be32 fields are declared as host-order c_uint

_SVC_KEY = struct.Struct("=4sHBB")  # vip (network order bytes), port (be16), proto, scope
_SVC_VAL = struct.Struct("=IHHHHI")  # svc_id, count, local_count, flags, pad, affinity
_SLOT_KEY = struct.Struct("=II")
_U32 = struct.Struct("=I")
_BACKEND = struct.Struct("=4sHBB")  # addr, port (be16), proto, flags
_NAME_LEN = 96

MAP_NAMES = ("services4", "backend_slots", "backends4", "svc_names")
"""The maps this writer owns (conntrack maps are the programs')."""


class MapOpError(RuntimeError):
    """A batch map operation failed (map full, ...)."""

    def __init__(self, map_name: str, op: str, err: int, done: int, total: int) -> None:
        self.map_name = map_name
        self.errno = err
        reason = "map full" if err == errno.E2BIG else os.strerror(err)
        super().__init__(f"{op} on BPF map {map_name} failed after {done}/{total} "
                         f"elements: {reason}")


@dataclass(slots=True)
class _Svc:
    svc_id: int
    backend_ids: tuple[int, ...]
    name: str


@dataclass(slots=True)
class Plan:
    """Element operations of one sync, by phase."""

    backend_write: dict[int, bytes] = field(default_factory=dict)
    slot_write: dict[tuple[int, int], int] = field(default_factory=dict)
    svc_write: dict[Frontend, tuple[int, int]] = field(default_factory=dict)
    name_write: dict[int, str] = field(default_factory=dict)
    svc_delete: list[Frontend] = field(default_factory=list)
    name_delete: list[int] = field(default_factory=list)
    slot_delete: list[tuple[int, int]] = field(default_factory=list)
    backend_delete: list[int] = field(default_factory=list)

    def ops(self) -> int:
        return (len(self.backend_write) + len(self.slot_write) + len(self.svc_write)
                + len(self.name_write) + len(self.svc_delete) + len(self.name_delete)
                + len(self.slot_delete) + len(self.backend_delete))


def _ip4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if ip.version != 4:
        raise ValueError(f"{ip}: the eBPF datapath programs IPv4 only so far")
    return ip.packed


def pack_svc_key(f: Frontend, scope: int = 0) -> bytes:
    return _SVC_KEY.pack(_ip4(f.ip), socket.htons(f.port), int(f.protocol), scope)


def unpack_svc_key(raw: bytes) -> tuple[Frontend, int]:
    addr, port, proto, scope = _SVC_KEY.unpack(raw)
    return Frontend(ipaddress.IPv4Address(addr), socket.ntohs(port), Protocol(proto)), scope


def pack_backend(b: Backend, proto: Protocol) -> bytes:
    return _BACKEND.pack(_ip4(b.ip), socket.htons(b.port), int(proto), 0)


def unpack_backend(raw: bytes) -> tuple[Backend, Protocol]:
    addr, port, proto, _flags = _BACKEND.unpack(raw)
    return Backend(ipaddress.IPv4Address(addr), socket.ntohs(port)), Protocol(proto)


class BpfMap:
    """Batch access to one bcc table by raw bytes."""

    CHUNK = 16384

    def __init__(self, table: Any, name: str) -> None:
        from bcc import libbcc  # late import: see loader

        self._lib = libbcc.lib
        self.table = table
        self.name = name
        self.fd: int = table.map_fd
        self.key_size = ct.sizeof(table.Key)
        self.value_size = ct.sizeof(table.Leaf)
        self.max_entries: int = table.max_entries

    def update(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        items = list(items)
        for i in range(0, len(items), self.CHUNK):
            part = items[i:i + self.CHUNK]
            n = len(part)
            keys = ct.create_string_buffer(b"".join(k for k, _ in part), n * self.key_size)
            vals = ct.create_string_buffer(b"".join(v for _, v in part), n * self.value_size)
            cnt = ct.c_uint32(n)
            if self._lib.bpf_update_batch(self.fd, keys, vals, ct.byref(cnt)) != 0:
                raise MapOpError(self.name, "update", ct.get_errno(), i + cnt.value, len(items))
        return len(items)

    def delete(self, keys_in: Iterable[bytes]) -> int:
        keys_l = list(keys_in)
        for i in range(0, len(keys_l), self.CHUNK):
            part = keys_l[i:i + self.CHUNK]
            n = len(part)
            keys = ct.create_string_buffer(b"".join(part), n * self.key_size)
            cnt = ct.c_uint32(n)
            if self._lib.bpf_delete_batch(self.fd, keys, ct.byref(cnt)) != 0:
                err = ct.get_errno()
                if err != errno.ENOENT:
                    raise MapOpError(self.name, "delete", err, i + cnt.value, len(keys_l))
                # A key already gone (drift): delete the rest one by one.
                for k in part[cnt.value:]:
                    kb = ct.create_string_buffer(k, self.key_size)
                    if self._lib.bpf_delete_elem(self.fd, kb) != 0 and \
                            ct.get_errno() != errno.ENOENT:
                        raise MapOpError(self.name, "delete", ct.get_errno(), i, len(keys_l))
        return len(keys_l)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs, by BPF_MAP_LOOKUP_BATCH in bounded chunks.

        (bcc 0.26's items_lookup_batch passes one variable as both out_batch and
        count, and allocates max_entries at once; this does neither.)"""
        chunk = 4096
        keys = ct.create_string_buffer(chunk * self.key_size)
        vals = ct.create_string_buffer(chunk * self.value_size)
        in_batch = ct.c_uint32(0)
        out_batch = ct.c_uint32(0)
        first = True
        while True:
            cnt = ct.c_uint32(chunk)
            ret = self._lib.bpf_lookup_batch(self.fd, None if first else ct.byref(in_batch),
                                             ct.byref(out_batch), keys, vals, ct.byref(cnt))
            err = ct.get_errno() if ret != 0 else 0
            if ret != 0 and err != errno.ENOENT:
                raise MapOpError(self.name, "lookup", err, 0, 0)
            kraw, vraw = keys.raw, vals.raw
            for j in range(cnt.value):
                yield (kraw[j * self.key_size:(j + 1) * self.key_size],
                       vraw[j * self.value_size:(j + 1) * self.value_size])
            if ret != 0:  # ENOENT: no more elements
                return
            in_batch.value = out_batch.value
            first = False

    def count(self) -> int:
        return sum(1 for _ in self.items())


class ServiceMaps:
    """Shadow + planner + applier for the service maps of one pin directory."""

    def __init__(self, bpf: Any) -> None:
        self.services = BpfMap(bpf["services4"], "services4")
        self.slots = BpfMap(bpf["backend_slots"], "backend_slots")
        self.backends = BpfMap(bpf["backends4"], "backends4")
        self.names = BpfMap(bpf["svc_names"], "svc_names")
        self._svc: dict[Frontend, _Svc] = {}
        self._be_ids: dict[tuple[Backend, Protocol], int] = {}
        self._be_refs: dict[int, int] = {}
        self._be_key_by_id: dict[int, tuple[Backend, Protocol]] = {}
        self._next_svc_id = 1
        self._next_be_id = 1
        self._svc_ids_used: set[int] = set()
        self._slot_total = 0  # sum of len(backend_ids): fill() in O(1) per scrape

    # ----- reading the kernel ---------------------------------------------------------

    def read_kernel(self) -> tuple[dict[Frontend, _Svc], dict[int, tuple[Backend, Protocol]],
                                   list[tuple[int, int]], list[int]]:
        """(services, backends by id, orphan slot keys, orphan name ids) as pinned."""
        backends = {_U32.unpack(k)[0]: unpack_backend(v) for k, v in self.backends.items()}
        slots: dict[int, dict[int, int]] = {}
        for k, v in self.slots.items():
            sid, slot = _SLOT_KEY.unpack(k)
            slots.setdefault(sid, {})[slot] = _U32.unpack(v)[0]
        names = {_U32.unpack(k)[0]: v.split(b"\0", 1)[0].decode(errors="replace")
                 for k, v in self.names.items()}
        svcs: dict[Frontend, _Svc] = {}
        for k, v in self.services.items():
            frontend, scope = unpack_svc_key(k)
            if scope != 0:
                continue
            sid, count = _SVC_VAL.unpack(v)[:2]
            own = slots.get(sid, {})
            ids = tuple(own.get(i, 0) for i in range(count))
            svcs[frontend] = _Svc(sid, ids, names.get(sid, ""))
        live = {s.svc_id: len(s.backend_ids) for s in svcs.values()}
        orphan_slots = [(sid, slot) for sid, m in slots.items() for slot in m
                        if slot >= live.get(sid, 0)]
        orphan_names = [sid for sid in names if sid not in live]
        return svcs, backends, orphan_slots, orphan_names

    def adopt_kernel(self) -> Plan:
        """Rebuild the shadow from the kernel; returns a plan pruning orphans."""
        svcs, backends, orphan_slots, orphan_names = self.read_kernel()
        self._svc = svcs
        self._slot_total = sum(len(s.backend_ids) for s in svcs.values())
        self._svc_ids_used = {s.svc_id for s in svcs.values()}
        self._be_key_by_id = dict(backends)
        self._be_ids = {}
        for bid, key in sorted(backends.items()):
            self._be_ids.setdefault(key, bid)  # a duplicate id is pruned below
        self._be_refs = {bid: 0 for bid in backends}
        for s in svcs.values():
            for bid in s.backend_ids:
                if bid in self._be_refs:
                    self._be_refs[bid] += 1
        self._next_svc_id = max(self._svc_ids_used, default=0) + 1
        self._next_be_id = max(backends, default=0) + 1
        plan = Plan(slot_delete=orphan_slots, name_delete=orphan_names)
        for bid, refs in self._be_refs.items():
            if refs == 0:
                plan.backend_delete.append(bid)
        for bid in plan.backend_delete:
            self._release_backend(bid)
        return plan

    def dump(self) -> State:
        """The State the kernel holds now (read from the maps, not the shadow)."""
        svcs, backends, _, _ = self.read_kernel()
        entries = []
        for f, s in svcs.items():
            bes = [backends[b][0] for b in s.backend_ids if b in backends]
            entries.append(ServiceEntry.make(f, bes, s.name))
        return State(entries)

    # ----- planning -------------------------------------------------------------------

    def _alloc_svc_id(self) -> int:
        while self._next_svc_id in self._svc_ids_used or self._next_svc_id == 0:
            self._next_svc_id = (self._next_svc_id + 1) & 0xFFFFFFFF
        sid = self._next_svc_id
        self._next_svc_id = (sid + 1) & 0xFFFFFFFF
        self._svc_ids_used.add(sid)
        return sid

    def _ref_backend(self, b: Backend, proto: Protocol, plan: Plan) -> int:
        key = (Backend(b.ip, b.port), proto)
        bid = self._be_ids.get(key)
        if bid is None:
            while self._next_be_id in self._be_refs or self._next_be_id == 0:
                self._next_be_id = (self._next_be_id + 1) & 0xFFFFFFFF
            bid = self._next_be_id
            self._next_be_id = (bid + 1) & 0xFFFFFFFF
            self._be_ids[key] = bid
            self._be_key_by_id[bid] = key
            self._be_refs[bid] = 0
            plan.backend_write[bid] = pack_backend(b, proto)
        self._be_refs[bid] += 1
        return bid

    def _release_backend(self, bid: int) -> None:
        key = self._be_key_by_id.pop(bid, None)
        if key is not None and self._be_ids.get(key) == bid:
            del self._be_ids[key]
        self._be_refs.pop(bid, None)

    def plan(self, changes: Iterable[tuple[Frontend, ServiceEntry | None]],
             plan: Plan | None = None) -> Plan:
        """Plan the changes and update the shadow as if they were applied."""
        plan = plan or Plan()
        unrefs: list[int] = []
        for f, entry in changes:
            old = self._svc.get(f)
            if entry is None:
                if old is None:
                    continue
                plan.svc_delete.append(f)
                plan.name_delete.append(old.svc_id)
                plan.slot_delete += [(old.svc_id, i) for i in range(len(old.backend_ids))]
                unrefs += old.backend_ids
                self._svc_ids_used.discard(old.svc_id)
                self._slot_total -= len(old.backend_ids)
                del self._svc[f]
                continue
            ids = tuple(self._ref_backend(b, f.protocol, plan) for b in entry.backends)
            if old is None:
                svc = _Svc(self._alloc_svc_id(), ids, entry.name)
                old_ids: tuple[int, ...] = ()
            else:
                svc = _Svc(old.svc_id, ids, entry.name)
                old_ids = old.backend_ids
                unrefs += old_ids
            sid = svc.svc_id
            for i, bid in enumerate(ids):
                if i >= len(old_ids) or old_ids[i] != bid:
                    plan.slot_write[(sid, i)] = bid
            plan.slot_delete += [(sid, i) for i in range(len(ids), len(old_ids))]
            if old is None or len(ids) != len(old_ids):
                plan.svc_write[f] = (sid, len(ids))
            if old is None or old.name != entry.name:
                plan.name_write[sid] = entry.name
            self._slot_total += len(ids) - len(old_ids)
            self._svc[f] = svc
        # Release after all references are taken, so that a backend moving between
        # services within one sync keeps its id.
        for bid in unrefs:
            if bid not in self._be_refs:
                continue
            self._be_refs[bid] -= 1
            if self._be_refs[bid] <= 0:
                plan.backend_delete.append(bid)
                self._release_backend(bid)
        return plan

    # ----- applying -------------------------------------------------------------------

    def apply(self, plan: Plan) -> int:
        """Write the plan to the kernel in the consistent order; returns ops done."""
        self.backends.update((_U32.pack(bid), v) for bid, v in plan.backend_write.items())
        self.slots.update((_SLOT_KEY.pack(sid, slot), _U32.pack(bid))
                          for (sid, slot), bid in plan.slot_write.items())
        self.services.update((pack_svc_key(f), _SVC_VAL.pack(sid, count, 0, 0, 0, 0))
                             for f, (sid, count) in plan.svc_write.items())
        self.names.update((_U32.pack(sid), name.encode()[: _NAME_LEN - 1].ljust(_NAME_LEN, b"\0"))
                          for sid, name in plan.name_write.items())
        self.services.delete(pack_svc_key(f) for f in plan.svc_delete)
        self.names.delete(_U32.pack(sid) for sid in plan.name_delete)
        self.slots.delete(_SLOT_KEY.pack(sid, slot) for sid, slot in plan.slot_delete)
        self.backends.delete(_U32.pack(bid) for bid in plan.backend_delete)
        return plan.ops()

    # ----- entry points ---------------------------------------------------------------

    def full_sync(self, state: State) -> int:
        plan = self.adopt_kernel()
        frontends = set(self._svc) | set(state)
        self.plan(((f, state.get(f)) for f in sorted(frontends)), plan)
        return self.apply(plan)

    def incremental_sync(self, upserted: Iterable[ServiceEntry],
                         removed: Iterable[Frontend]) -> int:
        changes: list[tuple[Frontend, ServiceEntry | None]] = [(f, None) for f in removed]
        changes += [(e.frontend, e) for e in upserted]
        return self.apply(self.plan(changes))

    def programmed(self) -> int:
        """Frontends programmed now (from the shadow)."""
        return len(self._svc)

    def fill(self) -> dict[str, float]:
        """Fill ratio per owned map, from the shadow (cheap; for metrics)."""
        return {"services4": len(self._svc) / self.services.max_entries,
                "backend_slots": self._slot_total / self.slots.max_entries,
                "backends4": len(self._be_refs) / self.backends.max_entries}

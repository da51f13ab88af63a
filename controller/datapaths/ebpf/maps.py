"""Programming the eBPF service maps: records, shadow, plan, ordered batch apply.

A :class:`ServiceEntry` becomes one or two :class:`Record`\\ s, one per services
key: the frontend itself and, for an external frontend with Local policy, its
in-cluster twin (scope INTERNAL) holding the cluster-wide backends. ClusterIPs also
get a VIP marker (in cluster_ips) that makes their undefined ports REJECT.

Both families share every map: an address is 16 bytes, an IPv4 one in its
IPv4-mapped form ::ffff:a.b.c.d (bpf/kpr_structs.h); :func:`pack_addr` and
:func:`unpack_addr` are the only place that knows.

The writer keeps a shadow of what it believes the kernel holds (record -> service id,
slot list, value; backend address -> backend id with a reference count; VIP marker
reference counts; source ranges and Maglev tables per service id). A sync turns the
changed frontends into a :class:`Plan` of element writes and deletes, then applies
it in the order that keeps every packet consistent:

1. write new backends         (a slot never points at a missing backend)
2. write slots, members, Maglev tables, source ranges
                              (all in place before a service value points at them)
3. write service values, names and VIP markers (count grows last / shrinks first)
4. delete removed services and VIP markers
5. delete names, ranges, tables, members and slots nobody reads any more
6. delete unreferenced backends

Hash-map phases are one batch syscall per map (BPF_MAP_UPDATE_BATCH /
DELETE_BATCH, kernel 5.6+), built from packed bytes rather than per-element ctypes
objects; LPM tries have no batch operations (kernel 6.18) and are written per element.

Ids are reused across restarts (read back from the pinned maps, as Cilium's
reconciler does). Service ids grow monotonically. Backend ids index the backends
array (an array lookup is inlined into the program, a hash lookup is not), so they
are recycled, the longest-free first, each new occupant with a generation above
every earlier one: a conntrack or affinity entry holds (id, generation), and one
naming a released backend finds another generation rather than another backend.
A released id is reused only after the plan that frees it is applied.

A full sync first rebuilds the shadow from the kernel (adopting a previous process's
state and finding drift) and repairs the kernel to match it: orphaned slots, members,
backends, names, ranges, tables and markers are pruned, and what a programmed service
misses is restored. Then it plans and applies every record in chunks (bounded
memory), and last deletes the backends nobody references any more. On any failure
the shadow is no longer trusted: the caller must do a full sync next.
"""

from __future__ import annotations

import ctypes as ct
import errno
import hashlib
import ipaddress
import os
import socket
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

from controller import kernel
from controller.datapaths.ebpf import loader
from controller.model import (
    Backend,
    IPAddress,
    IPNetwork,
    Frontend,
    FrontendKind,
    Protocol,
    ServiceEntry,
    ServiceFlag,
    State,
)

C = loader.consts()
SCOPE_EXTERNAL, SCOPE_INTERNAL = C["SCOPE_EXTERNAL"], C["SCOPE_INTERNAL"]
F_EXTERNAL, F_LOCAL, F_AFFINITY = C["SVC_F_EXTERNAL"], C["SVC_F_LOCAL"], C["SVC_F_AFFINITY"]
F_SRC_RANGES, F_DROP_EMPTY, F_MAGLEV = (C["SVC_F_SRC_RANGES"], C["SVC_F_DROP_EMPTY"],
                                        C["SVC_F_MAGLEV"])
F_INTERNAL = C["SVC_F_INTERNAL"]

_SVC_KEY = struct.Struct("=16sHBB")  # vip (16 bytes, see pack_addr), port (be16), proto, scope
_SVC_VAL = struct.Struct("=IHHIB3x")  # svc_id, count, flags, affinity, kind
_PAIR = struct.Struct("=II")  # slot key (svc_id, slot), member key (svc_id, backend id)
_U32 = struct.Struct("=I")
_U8 = struct.Struct("=B")
_BACKEND = struct.Struct("=16sHBB")  # addr, port (be16), proto, flags
_RANGE_KEY = struct.Struct("=II16s")  # prefixlen, svc_id, addr
_V4MAPPED = bytes(10) + b"\xff\xff"
_NAME_LEN = 96
_ONE = _U8.pack(1)
assert array("I").itemsize == 4  # the maps' __u32 keys and values


def _u32s(values: Iterable[int]) -> bytes:
    """__u32s end to end in native order."""
    return array("I", values).tobytes()

FULL_SYNC_CHUNK = 4096
"""Keys planned and applied together by a full sync (see ServiceMaps.full_sync)."""

Key = tuple[Frontend, int]
"""A services key: frontend and scope."""

MAP_NAMES = ("services", "backend_slots", "members", "backends", "svc_names",
             "src_ranges", "maglev", "cluster_ips")
"""The maps this writer owns (conntrack and affinity maps are the programs')."""


class MapOpError(RuntimeError):
    """A map operation failed (map full, ...)."""

    def __init__(self, map_name: str, op: str, err: int, done: int, total: int) -> None:
        self.map_name = map_name
        self.errno = err
        reason = "map full" if err == errno.E2BIG else os.strerror(err)
        super().__init__(f"{op} on BPF map {map_name} failed after {done}/{total} "
                         f"elements: {reason}")


# ----- records ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    """One services entry, as the programs see it."""

    frontend: Frontend
    """Address (0.0.0.0 or :: for a NodePort), port, protocol."""
    scope: int
    """KPR_SCOPE_*."""
    backends: tuple[Backend, ...] = ()
    """Backends for new flows, sorted (their flags are not programmed; entry_of
    drops them)."""
    flags: int = 0
    """KPR_SVC_F_*."""
    kind: FrontendKind = FrontendKind.CLUSTER_IP
    """Where the frontend comes from (stored for `kpr status` and dumps)."""
    affinity_timeout: int = 0
    """Seconds, with KPR_SVC_F_AFFINITY."""
    source_ranges: tuple[IPNetwork, ...] = ()
    """loadBalancerSourceRanges of the frontend's family, with KPR_SVC_F_SRC_RANGES."""
    name: str = ""
    """namespace/name:port."""
    draining: tuple[Backend, ...] = ()
    """Backends that keep their flows but take no new one (ServiceEntry.draining):
    slots [count, count + len(draining)), outside every new-flow choice and out of
    members (affinity), so their backend ids and generations stay put."""

    @property
    def key(self) -> Key:
        return (self.frontend, self.scope)


# ServiceFlag bits as ints: enum.Flag's operators run in Python (CPython 3.11), five
# of them per entry were a tenth of a 50,000-Service full sync.
_LOCAL_POLICY, _AFFINITY, _HAS_ENDPOINTS, _MAGLEV, _RANDOM = (
    f.value for f in (ServiceFlag.LOCAL_POLICY, ServiceFlag.AFFINITY,
                      ServiceFlag.HAS_ENDPOINTS, ServiceFlag.MAGLEV, ServiceFlag.RANDOM))


def records(e: ServiceEntry, maglev_default: bool = False) -> list[Record]:
    """The services records of one entry (a TCP/UDP frontend of either family)."""
    ef = e.flags.value
    external = e.kind != FrontendKind.CLUSTER_IP
    flags = F_EXTERNAL if external else 0
    if ef & _AFFINITY:
        flags |= F_AFFINITY
    if ef & _MAGLEV or (maglev_default and not ef & _RANDOM):
        flags |= F_MAGLEV
    # Ranges of the other family do not apply, and if none is of this family the
    # frontend is open, as kube-proxy's per-family proxiers read the field.
    ranges: tuple[IPNetwork, ...] = ()
    if e.source_ranges:
        ranges = tuple(n for n in e.source_ranges if n.version == e.frontend.ip.version)
        if ranges:
            flags |= F_SRC_RANGES
    aff = e.affinity_timeout if flags & F_AFFINITY else 0
    dr = e.draining
    if not ef & _LOCAL_POLICY:
        return [Record(e.frontend, SCOPE_EXTERNAL, e.backends, flags, e.kind, aff, ranges,
                       e.name, dr)]
    # Local: no local backend while the Service has endpoints elsewhere drops
    # (kube-proxy's "has no local endpoints" DROP); no endpoints at all rejects.
    primary = flags | F_LOCAL | (F_DROP_EMPTY if ef & _HAS_ENDPOINTS else 0)
    if not external:
        return [Record(e.frontend, SCOPE_EXTERNAL, e.backends, primary, e.kind, aff, ranges,
                       e.name, dr)]
    cluster = tuple(sorted({Backend(b.ip, b.port) for b in e.cluster_backends}))
    # the draining backends ride on the primary record: a flow finds its backend
    # by id, whichever record keeps the id alive
    return [Record(e.frontend, SCOPE_EXTERNAL, e.backends, primary | F_INTERNAL, e.kind, aff,
                   ranges, e.name, dr),
            Record(e.frontend, SCOPE_INTERNAL, cluster, flags, e.kind, aff, ranges, e.name)]


def entry_of(primary: Record, twin: Record | None) -> ServiceEntry:
    """The canonical ServiceEntry a record pair programs (inverse of ``records`` up to
    what the datapath does not keep: backend flags, healthCheckNodePort)."""
    f = primary.flags
    flags = ServiceFlag.NONE
    if f & F_LOCAL:
        flags |= ServiceFlag.LOCAL_POLICY
        if f & F_DROP_EMPTY:
            flags |= ServiceFlag.HAS_ENDPOINTS
    if f & F_AFFINITY:
        flags |= ServiceFlag.AFFINITY
    if f & F_MAGLEV:
        flags |= ServiceFlag.MAGLEV
    if not f & F_LOCAL and primary.backends:
        flags |= ServiceFlag.HAS_ENDPOINTS
    kw: dict[str, Any] = {}
    if twin is not None:
        kw["cluster_backends"] = twin.backends
    if primary.source_ranges:
        kw["source_ranges"] = primary.source_ranges
    if primary.draining:
        kw["draining"] = primary.draining
    # backend flags are not programmed: what the kernel holds has none
    return ServiceEntry.make(primary.frontend, (Backend(b.ip, b.port) for b in primary.backends),
                             primary.name,
                             kind=primary.kind, flags=flags,
                             affinity_timeout=primary.affinity_timeout, **kw)


def canonical(e: ServiceEntry, maglev_default: bool = False) -> ServiceEntry:
    """What ``dump()`` returns for an entry once programmed."""
    recs = records(e, maglev_default)
    return entry_of(recs[0], recs[1] if len(recs) > 1 else None)


# ----- Maglev ----------------------------------------------------------------------------

def _maglev_perm(name: str, m: int) -> tuple[int, int]:
    h = hashlib.blake2b(name.encode(), digest_size=16).digest()
    offset = int.from_bytes(h[:8], "little") % m
    skip = int.from_bytes(h[8:], "little") % (m - 1) + 1
    return offset, skip


def maglev_table(names: list[str], m: int) -> list[int]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016, pseudocode 1): entry i holds
    the index into ``names`` of the backend serving hash i. Every node computes the
    same table from the same backend names ("ip:port"), whatever their order of
    arrival; removing one of n backends moves about 1/n of the entries."""
    n = len(names)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: names[i])
    perms = [_maglev_perm(names[i], m) for i in order]
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for j in range(n):
            offset, skip = perms[j]
            c = (offset + nxt[j] * skip) % m
            while entry[c] >= 0:
                nxt[j] += 1
                c = (offset + nxt[j] * skip) % m
            entry[c] = order[j]
            nxt[j] += 1
            filled += 1
            if filled == m:
                return entry


# ----- raw map access --------------------------------------------------------------------

def pack_addr(ip: IPAddress) -> bytes:
    """union kpr_addr: an IPv6 address as is, an IPv4 one as ::ffff:a.b.c.d."""
    return _V4MAPPED + ip.packed if ip.version == 4 else ip.packed


def unpack_addr(raw: bytes) -> IPAddress:
    if raw[:12] == _V4MAPPED:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def lpm_prefix(net: IPNetwork) -> int:
    """A network's prefix length over the 128 bits of union kpr_addr."""
    return net.prefixlen + (96 if net.version == 4 else 0)


def lpm_network(addr: bytes, plen: int) -> IPNetwork:
    """Inverse of (pack_addr(net.network_address), lpm_prefix(net))."""
    ip = unpack_addr(addr)
    return ipaddress.ip_network((ip, plen - 96 if ip.version == 4 else plen))


def pack_svc_key(f: Frontend, scope: int = SCOPE_EXTERNAL) -> bytes:
    return _SVC_KEY.pack(pack_addr(f.ip), socket.htons(f.port), int(f.protocol), scope)


def unpack_svc_key(raw: bytes) -> tuple[Frontend, int]:
    addr, port, proto, scope = _SVC_KEY.unpack(raw)
    return Frontend(unpack_addr(addr), socket.ntohs(port), Protocol(proto)), scope


def pack_backend(b: Backend, proto: Protocol) -> bytes:
    return _BACKEND.pack(pack_addr(b.ip), socket.htons(b.port), int(proto), 0)


def unpack_backend(raw: bytes) -> tuple[Backend, Protocol]:
    """A backend from a backends value (its generation, if there, ignored)."""
    addr, port, proto, _flags = _BACKEND.unpack_from(raw)
    return Backend(unpack_addr(addr), socket.ntohs(port)), Protocol(proto)


def pack_range(sid: int, net: IPNetwork) -> bytes:
    return _RANGE_KEY.pack(32 + lpm_prefix(net), sid, pack_addr(net.network_address))


class BpfMap:
    """Access to one map by raw bytes, through bpf(2) (controller.kernel): batches
    where the map type has them, element by element where it does not (LPM tries)."""

    BUFFER = 1 << 22  # bytes of keys+values per batch syscall

    def __init__(self, handle: loader.MapHandle, name: str, batch: bool = True) -> None:
        self.name = name
        self.fd: int = handle.fd
        self.key_size: int = handle.key_size
        self.value_size: int = handle.value_size
        self.max_entries: int = handle.max_entries
        self.batch = batch
        self.chunk = max(1, min(16384, self.BUFFER // (self.key_size + self.value_size)))

    def update_packed(self, keys: bytes, vals: bytes) -> int:
        """Update from keys and values already laid end to end (what the batch
        syscall takes): no per-element Python object on the way."""
        n = len(keys) // self.key_size
        assert len(keys) == n * self.key_size and len(vals) == n * self.value_size
        if not self.batch:
            for i in range(n):
                k = keys[i * self.key_size:(i + 1) * self.key_size]
                v = vals[i * self.value_size:(i + 1) * self.value_size]
                if kernel.map_update_elem(self.fd, ct.create_string_buffer(k, self.key_size),
                                          ct.create_string_buffer(v, self.value_size)) != 0:
                    raise MapOpError(self.name, "update", ct.get_errno(), i, n)
            return n
        for i in range(0, n, self.chunk):
            m = min(self.chunk, n - i)
            kb = ct.create_string_buffer(keys[i * self.key_size:(i + m) * self.key_size],
                                         m * self.key_size)
            vb = ct.create_string_buffer(vals[i * self.value_size:(i + m) * self.value_size],
                                         m * self.value_size)
            cnt = ct.c_uint32(m)
            if kernel.map_batch(kernel.BPF_MAP_UPDATE_BATCH, self.fd, kb, vb, cnt) != 0:
                raise MapOpError(self.name, "update", ct.get_errno(), i + cnt.value, n)
        return n

    def delete_packed(self, keys: bytes) -> int:
        """Delete keys laid end to end (see update_packed)."""
        ks = self.key_size
        blob = keys
        n = len(blob) // ks
        assert len(blob) == n * ks
        if not self.batch:
            for i in range(n):
                self._delete_one(blob[i * ks:(i + 1) * ks], i, n)
            return n
        for i in range(0, n, self.chunk):
            m = min(self.chunk, n - i)
            kb = ct.create_string_buffer(blob[i * ks:(i + m) * ks], m * ks)
            cnt = ct.c_uint32(m)
            if kernel.map_batch(kernel.BPF_MAP_DELETE_BATCH, self.fd, kb, None, cnt) != 0:
                err = ct.get_errno()
                if err != errno.ENOENT:
                    raise MapOpError(self.name, "delete", err, i + cnt.value, n)
                # A key already gone (drift): delete the rest one by one.
                for j in range(i + cnt.value, i + m):
                    self._delete_one(blob[j * ks:(j + 1) * ks], i, n)
        return n

    def update(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        items = list(items)
        return self.update_packed(b"".join(k for k, _ in items), b"".join(v for _, v in items))

    def _delete_one(self, k: bytes, done: int, total: int) -> None:
        kb = ct.create_string_buffer(k, self.key_size)
        if kernel.map_delete_elem(self.fd, kb) != 0 and ct.get_errno() != errno.ENOENT:
            raise MapOpError(self.name, "delete", ct.get_errno(), done, total)

    def delete(self, keys: Iterable[bytes]) -> int:
        return self.delete_packed(b"".join(keys))

    def keys(self) -> Iterator[bytes]:
        """All keys, by BPF_MAP_GET_NEXT_KEY (every map type has it)."""
        cur = ct.create_string_buffer(self.key_size)
        nxt = ct.create_string_buffer(self.key_size)
        first = True
        while kernel.map_get_next_key(self.fd, None if first else cur, nxt) == 0:
            yield nxt.raw
            ct.memmove(cur, nxt, self.key_size)
            first = False

    def items_packed(self) -> tuple[bytes, bytes]:
        """Every key and every value, each laid end to end in the same order (the
        batch syscalls' layout): parsed in bulk with array('I'), not per element."""
        ks, vs = self.key_size, self.value_size
        if not self.batch:
            pairs = list(self.items())
            return b"".join(k for k, _ in pairs), b"".join(v for _, v in pairs)
        kparts: list[bytes] = []
        vparts: list[bytes] = []
        for kraw, vraw, n in self._batches():
            kparts.append(kraw[:n * ks])
            vparts.append(vraw[:n * vs])
        return b"".join(kparts), b"".join(vparts)

    def _batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        """BPF_MAP_LOOKUP_BATCH chunks: (keys, values, how many of them are filled)."""
        chunk = min(self.chunk, 4096)
        keys = ct.create_string_buffer(chunk * self.key_size)
        vals = ct.create_string_buffer(chunk * self.value_size)
        in_batch = ct.c_uint32(0)
        out_batch = ct.c_uint32(0)
        first = True
        while True:
            cnt = ct.c_uint32(chunk)
            ret = kernel.map_batch(kernel.BPF_MAP_LOOKUP_BATCH, self.fd, keys, vals, cnt,
                                   None if first else in_batch, out_batch)
            err = ct.get_errno() if ret != 0 else 0
            if ret != 0 and err != errno.ENOENT:
                raise MapOpError(self.name, "lookup", err, 0, 0)
            yield keys.raw, vals.raw, cnt.value
            if ret != 0:  # ENOENT: no more elements
                return
            in_batch.value = out_batch.value
            first = False

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs, by BPF_MAP_LOOKUP_BATCH in bounded chunks.

        (bcc 0.26's items_lookup_batch passes one variable as both out_batch and
        count, and allocates max_entries at once; this does neither.)"""
        if not self.batch:
            val = ct.create_string_buffer(self.value_size)
            for k in self.keys():
                if kernel.map_lookup_elem(self.fd, ct.create_string_buffer(k, self.key_size),
                                          val) == 0:
                    yield k, val.raw
            return
        for kraw, vraw, n in self._batches():
            for j in range(n):
                yield (kraw[j * self.key_size:(j + 1) * self.key_size],
                       vraw[j * self.value_size:(j + 1) * self.value_size])

    def count(self) -> int:
        return sum(1 for _ in self.keys())

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        """One element's value (None when absent). ``value_size``: a per-CPU map's
        value is one slot per possible CPU, each rounded up to 8 bytes."""
        val = ct.create_string_buffer(value_size or self.value_size)
        if kernel.map_lookup_elem(self.fd, ct.create_string_buffer(key, self.key_size),
                                  val) != 0:
            return None
        return val.raw

    def clear(self) -> int:
        """Delete every element (collecting the keys first: deleting while walking
        restarts the walk on hash maps)."""
        return self.delete(list(self.keys()))


# ----- shadow and plan -------------------------------------------------------------------

@dataclass(slots=True)
class _Svc:
    """The shadow of one services key."""

    svc_id: int
    """Its id (slots, members, names, ranges and tables are keyed by it)."""
    backends: tuple[int, ...]
    """The backend of each slot (its map value as an int, see _bkey), in slot
    order: the key of ServiceMaps._be, where its id is. ``_STALE`` marks a slot read
    back pointing at a backend that is missing or a duplicate, so that the next plan
    rewrites it."""
    flags: int
    """KPR_SVC_F_* as written."""
    affinity: int
    """Affinity timeout as written."""
    kind: int
    """FrontendKind as written."""
    name: str
    """namespace/name:port (svc_names)."""
    ranges: tuple[IPNetwork, ...] = ()
    """Source ranges written for it."""
    maglev: bool = False
    """A Maglev table is written for the current backends."""
    count: int = -1
    """Slots [0, count) take new flows (the services value's count); the rest of
    ``backends`` are draining. -1: all of them (no draining slot)."""

    @property
    def active(self) -> tuple[int, ...]:
        """The backend keys of the slots that take new flows."""
        return self.backends if self.count < 0 else self.backends[:self.count]

    @property
    def n_active(self) -> int:
        return len(self.backends) if self.count < 0 else self.count

    @property
    def value(self) -> tuple[int, int, int]:
        """The services value but for id and count. (Three fields rather than a
        tuple: the ints are small and shared, a tuple was 3 MB at 50,000.)"""
        return (self.flags, self.affinity, self.kind)


_STALE = 0
"""A slot the next plan must rewrite (see _Svc.backends); never a backend key (a
backend's protocol byte is never 0)."""


def _bkey(b: Backend, proto: Protocol) -> int:
    """A backend's map value as a big-endian int: the shadow's backend key. An
    int of 20 bytes with an IPv4-mapped address is 40 B where the bytes are 56, at
    200,000 backends 3 MB less; it hashes as cheaply."""
    return int.from_bytes(pack_backend(b, proto), "big")


def _bval(key: int) -> bytes:
    """The map value of a backend key (inverse of _bkey)."""
    return key.to_bytes(_BACKEND.size, "big")

_BE_PROTO = 18
"""Offset of the protocol byte in a backends value (kpr_backend.proto)."""
_BE_FLAGS = 19
"""Offset of the flags byte (kpr_backend.flags)."""
BE_F_GONE = C["BE_F_GONE"]
"""kpr_backend.flags: released; kept addressable for the TCP flows bound to it."""

_REF = 1 << 32
"""One reference, in ServiceMaps._be's id | references << 32 encoding."""
_ID = _REF - 1


class _Ids:
    """Monotonic __u32 ids, never 0, skipping ids in use once the counter wraps.

    Ids grow so that a conntrack entry naming a released id finds nothing rather than
    the id's next owner. Until the counter wraps (after 2^32 allocations) every id
    above it is free, so no set of ids in use is kept: one cost 3.4 MB per 50,000
    services. At a wrap, the ids then in use are collected once; ids taken after
    that are behind the counter until the next wrap."""

    __slots__ = ("next", "_used", "_in_use")

    def __init__(self, in_use: Callable[[], Iterable[int]]) -> None:
        self.next = 1
        self._used: set[int] | None = None
        self._in_use = in_use

    def start_above(self, top: int) -> None:
        """Every id in use is at most ``top``."""
        self.next = (top + 1) & _ID
        self._used = None

    def take(self) -> int:
        while True:
            i = self.next
            self.next = (i + 1) & _ID
            if i == 0:
                self._used = set(self._in_use())
            elif self._used is None or i not in self._used:
                return i


class _BackendIds:
    """Backend ids (indexes 1 .. capacity - 1 of the backends array, whose index 0
    is never an id) and their generations.

    Fresh ids are taken in order until the array's end, then released ones, the
    longest-free first (a FIFO in an array('I'): a deque of ints cost 36 B per id),
    so an id waits as long as it can before its next owner. Every id taken gets a
    new generation, above every generation the array holds (``reset``), so no
    conntrack entry ever names the new occupant. ``give`` returns ids once the
    plan that tombstones them is applied: a plan writes its new backends before it
    tombstones its released ones, so an id reused within one plan would be wiped."""

    __slots__ = ("capacity", "next", "free", "head", "gen")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.next = 1
        self.free = array("I")
        self.head = 0
        self.gen = 0

    def reset(self, top: int, free: Iterable[int], gen: int) -> None:
        """After reading the array back: every id in use is at most ``top``, ``free``
        are the ones below it not in use, and ``gen`` the highest generation any
        entry (live or tombstone) holds."""
        self.next = top + 1
        self.free = array("I", free)
        self.head = 0
        self.gen = gen

    def take(self) -> tuple[int, int]:
        """A free id and its new generation; MapOpError when the array is full."""
        if self.next < self.capacity:
            i = self.next
            self.next += 1
        elif self.head < len(self.free):
            i = self.free[self.head]
            self.head += 1
            if self.head >= 4096 and self.head * 2 >= len(self.free):
                del self.free[: self.head]  # drop the consumed front now and then
                self.head = 0
        else:
            raise MapOpError("backends", "allocating an id", errno.E2BIG, 0, 1)
        self.gen = (self.gen + 1) & _ID or 1
        return i, self.gen

    def give(self, ids: Iterable[int]) -> None:
        self.free.extend(ids)


@dataclass(slots=True)
class Plan:
    """Element operations of one sync, by phase."""

    backend_write: dict[int, bytes] = field(default_factory=dict)
    slot_write: dict[tuple[int, int], int] = field(default_factory=dict)
    member_write: set[tuple[int, int]] = field(default_factory=set)
    maglev_write: dict[int, bytes] = field(default_factory=dict)
    range_write: set[tuple[int, IPNetwork]] = field(default_factory=set)
    svc_write: dict[Key, bytes] = field(default_factory=dict)
    name_write: dict[int, str] = field(default_factory=dict)
    vip_write: set[IPAddress] = field(default_factory=set)
    svc_delete: list[Key] = field(default_factory=list)
    vip_delete: set[IPAddress] = field(default_factory=set)
    name_delete: list[int] = field(default_factory=list)
    range_delete: set[tuple[int, IPNetwork]] = field(default_factory=set)
    maglev_delete: set[int] = field(default_factory=set)
    member_delete: set[tuple[int, int]] = field(default_factory=set)
    slot_delete: list[tuple[int, int]] = field(default_factory=list)
    backend_delete: dict[int, int] = field(default_factory=dict)
    """Released backend id -> its backend key: written as a gone entry (see apply)."""

    def ops(self) -> int:
        return sum(len(getattr(self, f)) for f in self.__dataclass_fields__)


class ServiceMaps:
    """Shadow + planner + applier for the service maps of one pin directory."""

    def __init__(self, bpf: loader.Loaded, maglev_size: int) -> None:
        self.services = BpfMap(bpf["services"], "services")
        self.slots = BpfMap(bpf["backend_slots"], "backend_slots")
        self.members = BpfMap(bpf["members"], "members")
        self.backends = BpfMap(bpf["backends"], "backends")
        self.names = BpfMap(bpf["svc_names"], "svc_names")
        self.vips = BpfMap(bpf["cluster_ips"], "cluster_ips")
        self.ranges = BpfMap(bpf["src_ranges"], "src_ranges", batch=False)
        self.maglev = BpfMap(bpf["maglev"], "maglev")
        self.maglev_size = maglev_size
        self._svc: dict[Key, _Svc] = {}
        self._vips: dict[IPAddress, int] = {}  # ClusterIP -> records using it
        # Backends are keyed by their packed map value (address, port, protocol) as
        # an int (_bkey): it hashes once and cheaply, where (Backend, Protocol)
        # tuples rehashed the ipaddress objects (hash(hex(int)) in CPython 3.11) at
        # every use, which was a third of a 50,000-Service full sync.
        # One dict, key -> id | references << 32: three (key -> id, id -> references,
        # id -> key) held 30 MB at 200,000 backends. Services hold backend keys, so
        # nothing needs id -> key.
        self._be: dict[int, int] = {}
        self._svc_ids = _Ids(lambda: (s.svc_id for s in self._svc.values()))
        self._be_ids = _BackendIds(self.backends.max_entries)
        self._slot_total = 0  # sum of len(backends): fill() in O(1) per scrape
        self._external = 0  # keys of SCOPE_EXTERNAL: programmed() in O(1) per sync
        self._adopted_tables: dict[int, bytes] = {}  # read back, not yet compared

    # ----- reading the kernel ---------------------------------------------------------

    def _read(self) -> tuple[dict[Key, tuple[int, int, tuple[int, int, int]]],
                             set[IPAddress], dict[int, dict[int, int]],
                             dict[int, bytes], dict[int, str],
                             dict[int, list[IPNetwork]], set[tuple[int, int]],
                             dict[int, bytes], int]:
        # Bulk reads (one batch syscall per 4,096 elements, parsed with array('I')):
        # walking keys one get-next-key syscall each made a restart's full sync at
        # 50,000 Services spend 2.8 s here.
        svcs: dict[Key, tuple[int, int, tuple[int, int, int]]] = {}
        kb, _ = self.vips.items_packed()
        vips = {unpack_addr(kb[i:i + 16]) for i in range(0, len(kb), self.vips.key_size)}
        kb, vb = self.services.items_packed()
        ks, vs = self.services.key_size, self.services.value_size
        for i in range(len(kb) // ks):
            f, scope = unpack_svc_key(kb[i * ks:(i + 1) * ks])
            sid, count, flags, aff, kind = _SVC_VAL.unpack_from(vb, i * vs)
            svcs[(f, scope)] = (sid, count, (flags, aff, kind))
        slots: dict[int, dict[int, int]] = {}
        kb, vb = self.slots.items_packed()
        pairs = array("I", kb)
        for sid, slot, bid in zip(pairs[0::2], pairs[1::2], array("I", vb)):
            slots.setdefault(sid, {})[slot] = bid
        backends, gen = self._read_backends()
        kb, vb = self.names.items_packed()
        ns = self.names.value_size
        names = dict(zip(array("I", kb), (
            vb[i:i + ns].split(b"\0", 1)[0].decode(errors="replace")
            for i in range(0, len(vb), ns))))
        ranges: dict[int, list[IPNetwork]] = {}
        for k in self.ranges.keys():
            plen, sid, addr = _RANGE_KEY.unpack(k)
            ranges.setdefault(sid, []).append(lpm_network(addr, plen - 32))
        pairs = array("I", self.members.items_packed()[0])
        members = set(zip(pairs[0::2], pairs[1::2]))
        tables = {_U32.unpack(k)[0]: v for k, v in self.maglev.items()}
        return svcs, vips, slots, backends, names, ranges, members, tables, gen

    def _read_backends(self) -> tuple[dict[int, bytes], int]:
        """The live backends (id -> packed value without its generation) and the
        highest generation of any entry, live or tombstone."""
        bs = self.backends.value_size
        w = bs // 4  # the generation is a value's last word
        live: dict[int, bytes] = {}
        gen = 0
        # batch by batch: an array reads back whole (every index), and joining it
        # first cost 10 MB of transient at 200,000 backends
        for kb, vb, n in self.backends._batches():
            for bid, i in zip(array("I", kb[:4 * n]), range(0, n * bs, bs)):
                # a free entry's protocol byte is 0; a gone one is free too
                if vb[i + _BE_PROTO] and not vb[i + _BE_FLAGS] & BE_F_GONE:
                    live[bid] = vb[i:i + _BACKEND.size]
            gen = max(gen, max(array("I", vb[:n * bs])[w - 1::w], default=0))
        return live, gen

    def adopt_kernel(self) -> Plan:
        """Rebuild the shadow from the kernel; returns a plan that prunes orphans and
        restores what programmed services miss (apply it before any change). Maglev
        tables are kept for comparison: the plan rewrites only those that differ."""
        raw, vips, slots, backends, names, ranges, members, tables, gen = self._read()
        plan = Plan()
        self._be = {}
        bkeys = {bid: int.from_bytes(v, "big") for bid, v in backends.items()}
        for bid, k in sorted(bkeys.items()):
            self._be.setdefault(k, bid)  # a duplicate id is pruned below
        self._svc = {}
        for key, (sid, count, value) in raw.items():
            own = slots.get(sid, {})
            keys: list[int] = []
            for i in range(count):
                bid = own.get(i, 0)
                k = bkeys.get(bid, _STALE)
                if k and self._be[k] & _ID == bid:
                    self._be[k] += _REF
                else:  # no slot, no backend, or a duplicate id: rewrite it
                    k = _STALE
                keys.append(k)
            # draining slots follow the count; one whose backend is missing is
            # dropped (the next plan writes the draining set anew anyway)
            i = count
            while i in own and i < count + self.slots.max_entries:
                k = bkeys.get(own[i], _STALE)
                if not (k and self._be[k] & _ID == own[i]):
                    break
                self._be[k] += _REF
                keys.append(k)
                i += 1
            self._svc[key] = _Svc(sid, tuple(keys), *value, names.get(sid, ""),
                                  tuple(sorted(ranges.get(sid, []))), maglev=False,
                                  count=count if len(keys) > count else -1)
        live = {s.svc_id: s for s in self._svc.values()}
        self._slot_total = sum(len(s.backends) for s in self._svc.values())
        self._external = sum(1 for _, scope in self._svc if scope == SCOPE_EXTERNAL)
        # New ids start above every id any map mentions: an orphan's slots, members
        # or name must not meet a new service.
        self._svc_ids.start_above(max(chain(live, slots, names, ranges, tables,
                                            (sid for sid, _ in members)), default=0))
        top = max(backends, default=0)
        self._be_ids.reset(top, (i for i in range(1, top + 1) if i not in backends),
                           gen)
        # prune what no live service uses; restore what a live one misses
        plan.slot_delete = [(sid, slot) for sid, m in slots.items() for slot in m
                            if sid not in live or slot >= len(live[sid].backends)]
        plan.name_delete = [sid for sid in names if sid not in live]
        want_members = {(s.svc_id, self._be[k] & _ID) for s in live.values()
                        for k in s.active if k}
        plan.member_delete = members - want_members
        plan.member_write = want_members - members
        plan.range_delete = {(sid, n) for sid, ns in ranges.items() if sid not in live
                             for n in ns}
        plan.maglev_delete = {sid for sid in tables if sid not in live}
        self._adopted_tables = {sid: t for sid, t in tables.items() if sid in live}
        self._vips = {}
        for (f, scope), s in self._svc.items():
            if scope == SCOPE_EXTERNAL and s.kind == FrontendKind.CLUSTER_IP:
                self._vips[f.ip] = self._vips.get(f.ip, 0) + 1
        plan.vip_delete = vips - set(self._vips)
        plan.vip_write = set(self._vips) - vips
        for bid, key in bkeys.items():
            v = self._be.get(key)
            if v is None or v & _ID != bid or v < _REF:  # a duplicate, or unreferenced
                plan.backend_delete[bid] = key
        for key in [k for k, v in self._be.items() if v < _REF]:
            del self._be[key]
        return plan

    def dump(self) -> State:
        """The State the kernel holds now (read from the maps, not the shadow), in the
        canonical form of :func:`canonical`."""
        raw, _vips, slots, packed, names, ranges, _m, _t, _g = self._read()
        backends = {bid: unpack_backend(v) for bid, v in packed.items()}
        recs: dict[Key, Record] = {}
        for (f, scope), (sid, count, (flags, aff, kind)) in raw.items():
            own = slots.get(sid, {})
            bes = tuple(backends[own[i]][0] for i in range(count)
                        if own.get(i) in backends)
            dr: list[Backend] = []
            i = count
            while own.get(i) in backends:
                dr.append(backends[own[i]][0])
                i += 1
            recs[(f, scope)] = Record(f, scope, bes, flags, FrontendKind(kind), aff,
                                      tuple(sorted(ranges.get(sid, []))), names.get(sid, ""),
                                      tuple(sorted(dr)))
        return State(entry_of(r, recs.get((f, SCOPE_INTERNAL)))
                     for (f, scope), r in recs.items() if scope == SCOPE_EXTERNAL)

    # ----- planning -------------------------------------------------------------------

    def _ref_backend(self, key: int, plan: Plan) -> int:
        """Take a reference on a backend (written if new); returns its id."""
        v = self._be.get(key)
        if v is None:
            v, gen = self._be_ids.take()
            plan.backend_write[v] = _bval(key) + _U32.pack(gen)
        self._be[key] = v + _REF
        return v & _ID

    def _id(self, key: int) -> int:
        """The id of a referenced backend; 0 for _STALE."""
        v = self._be.get(key)
        return 0 if v is None else v & _ID

    def backends_in_kernel(self) -> int:
        """Live entries of the backends array, read from the kernel (tests)."""
        return len(self._read_backends()[0])

    def backend_ids(self) -> dict[bytes, int]:
        """Packed backend -> id, from the shadow (tests and debugging)."""
        return {_bval(k): v & _ID for k, v in self._be.items()}

    def _vip_ref(self, r: Record | _Svc, key: Key, delta: int, plan: Plan) -> None:
        if key[1] != SCOPE_EXTERNAL or r.kind != FrontendKind.CLUSTER_IP:
            return
        ip = key[0].ip
        n = self._vips.get(ip, 0) + delta
        if n <= 0:
            self._vips.pop(ip, None)
            plan.vip_delete.add(ip)
            plan.vip_write.discard(ip)
        else:
            if ip not in self._vips:
                plan.vip_write.add(ip)
                plan.vip_delete.discard(ip)
            self._vips[ip] = n

    def _maglev_bytes(self, keys: tuple[int, ...], ids: tuple[int, ...]) -> bytes:
        table = maglev_table([str(unpack_backend(_bval(k))[0]) for k in keys],
                             self.maglev_size)
        return struct.pack(f"={self.maglev_size}I", *(ids[i] for i in table))

    def plan(self, changes: Iterable[tuple[Key, Record | None]],
             plan: Plan | None = None, unrefs: list[int] | None = None) -> Plan:
        """Plan the changes and update the shadow as if they were applied.

        With ``unrefs`` the backend references the changes drop (backend keys)
        are appended there rather than released: the caller releases them
        (``release``) once every chunk of a larger change has taken its
        references."""
        plan = plan or Plan()
        deferred = unrefs is not None
        unrefs = unrefs if unrefs is not None else []
        for key, rec in changes:
            old = self._svc.get(key)
            if rec is None:
                if old is None:
                    continue
                sid = old.svc_id
                plan.svc_delete.append(key)
                plan.name_delete.append(sid)
                plan.slot_delete += [(sid, i) for i in range(len(old.backends))]
                plan.member_delete |= {(sid, self._id(k)) for k in old.active
                                       if k}
                plan.range_delete |= {(sid, n) for n in old.ranges}
                if old.maglev or old.flags & F_MAGLEV:
                    plan.maglev_delete.add(sid)
                unrefs += old.backends
                self._slot_total -= len(old.backends)
                self._vip_ref(old, key, -1, plan)
                del self._svc[key]
                self._external -= key[1] == SCOPE_EXTERNAL
                continue
            proto = key[0].protocol
            keys = tuple([_bkey(b, proto) for b in rec.backends])
            n = len(keys)
            count = -1
            if rec.draining:  # slots past the count: kept, never chosen
                keys += tuple([_bkey(b, proto) for b in rec.draining])
                count = n
            ids = tuple([self._ref_backend(k, plan) for k in keys])
            act_keys, act_ids = (keys, ids) if count < 0 else (keys[:n], ids[:n])
            value = (rec.flags, rec.affinity_timeout, int(rec.kind))
            if old is None:
                sid = self._svc_ids.take()
                self._vip_ref(rec, key, +1, plan)
                self._external += key[1] == SCOPE_EXTERNAL
                # a new key: everything is written, no set arithmetic (full syncs
                # from empty add 50,000 of these)
                for i, bid in enumerate(ids):
                    plan.slot_write[(sid, i)] = bid
                plan.member_write.update([(sid, b) for b in act_ids])
                if rec.source_ranges:
                    plan.range_write.update([(sid, r) for r in rec.source_ranges])
                maglev = bool(rec.flags & F_MAGLEV) and bool(act_ids)
                if maglev:
                    table = self._maglev_bytes(act_keys, act_ids)
                    if self._adopted_tables.pop(sid, None) != table:
                        plan.maglev_write[sid] = table
                plan.svc_write[key] = _SVC_VAL.pack(sid, n, *value)
                plan.name_write[sid] = rec.name
                self._slot_total += len(ids)
                self._svc[key] = _Svc(sid, keys, *value, rec.name, rec.source_ranges, maglev,
                                      count)
                continue
            sid = old.svc_id
            old_keys, old_ranges, old_maglev = old.backends, old.ranges, old.maglev
            old_ids = {self._id(k) for k in old.active if k}
            unrefs += old_keys
            if old.kind != rec.kind:  # e.g. an address moving from clusterIP to LB
                self._vip_ref(old, key, -1, plan)
                self._vip_ref(rec, key, +1, plan)
            for i, k in enumerate(keys):
                if i >= len(old_keys) or old_keys[i] != k:
                    plan.slot_write[(sid, i)] = ids[i]
            plan.slot_delete += [(sid, i) for i in range(len(keys), len(old_keys))]
            plan.member_write |= {(sid, b) for b in set(act_ids) - old_ids}
            plan.member_delete |= {(sid, b) for b in old_ids - set(act_ids)}
            plan.range_write |= {(sid, n) for n in set(rec.source_ranges) - set(old_ranges)}
            plan.range_delete |= {(sid, n) for n in set(old_ranges) - set(rec.source_ranges)}
            maglev = bool(rec.flags & F_MAGLEV) and bool(act_ids)
            if maglev and (not old_maglev or act_keys != old.active):
                table = self._maglev_bytes(act_keys, act_ids)
                if self._adopted_tables.pop(sid, None) != table:
                    plan.maglev_write[sid] = table
            elif old_maglev and not maglev:
                plan.maglev_delete.add(sid)
            if n != old.n_active or value != old.value:
                plan.svc_write[key] = _SVC_VAL.pack(sid, n, *value)
            if old.name != rec.name:
                plan.name_write[sid] = rec.name
            self._slot_total += len(keys) - len(old_keys)
            self._svc[key] = _Svc(sid, keys, *value, rec.name, rec.source_ranges, maglev,
                                  count)
        if not deferred:
            self.release(unrefs, plan)
        return plan

    def release(self, unrefs: Iterable[int], plan: Plan) -> None:
        """Drop backend references; a backend nobody references is deleted. Called
        after all references of a sync are taken, so that a backend moving between
        services within one sync keeps its id."""
        for key in unrefs:
            v = self._be.get(key)
            if v is None:  # _STALE
                continue
            v -= _REF
            if v < _REF:
                del self._be[key]
                plan.backend_delete[v] = key
            else:
                self._be[key] = v

    # ----- applying -------------------------------------------------------------------

    def apply(self, plan: Plan, before_services: Callable[[Plan], None] | None = None) -> int:
        """Write the plan to the kernel in the consistent order; returns ops done.
        ``before_services`` runs once the backends, slots and tables are written and
        before the services entries that make the programs use them (handover.py
        seeds conntrack there).

        Integer keys and values are laid out with array('I') (native order, as the
        maps' "=" structs) straight from the plan's dicts and sets: building a
        (key, value) pair of bytes per element cost a quarter of a full sync."""
        bw, sw, mw = plan.backend_write, plan.slot_write, plan.member_write
        self.backends.update_packed(_u32s(bw), b"".join(bw.values()))
        self.slots.update_packed(_u32s(chain.from_iterable(sw)), _u32s(sw.values()))
        self.members.update_packed(_u32s(chain.from_iterable(mw)), _ONE * len(mw))
        self.maglev.update_packed(_u32s(plan.maglev_write),
                                  b"".join(plan.maglev_write.values()))
        self.ranges.update((pack_range(sid, n), _ONE) for sid, n in plan.range_write)
        if before_services is not None:
            before_services(plan)
        self.services.update_packed(b"".join(pack_svc_key(*key) for key in plan.svc_write),
                                    b"".join(plan.svc_write.values()))
        self.vips.update_packed(b"".join(map(pack_addr, plan.vip_write)),
                                _ONE * len(plan.vip_write))
        self.names.update_packed(_u32s(plan.name_write), b"".join(
            name.encode()[: _NAME_LEN - 1].ljust(_NAME_LEN, b"\0")
            for name in plan.name_write.values()))
        self.services.delete_packed(b"".join(pack_svc_key(*key) for key in plan.svc_delete))
        self.vips.delete_packed(b"".join(map(pack_addr, plan.vip_delete)))
        self.names.delete_packed(_u32s(plan.name_delete))
        self.ranges.delete(pack_range(sid, n) for sid, n in plan.range_delete)
        self.maglev.delete_packed(_u32s(plan.maglev_delete))
        self.members.delete_packed(_u32s(chain.from_iterable(plan.member_delete)))
        self.slots.delete_packed(_u32s(chain.from_iterable(plan.slot_delete)))
        # A released backend stays addressable, flagged gone, with its generation,
        # until its id is taken again (the longest-free id first, after every fresh
        # one): the TCP flows bound to it keep going there, as netfilter's conntrack
        # keeps a removed endpoint's NAT (kube-proxy's TCP behaviour), while new
        # flows, affinity and datagram flows no longer use it. Its generation stays
        # the one it was issued, so the highest generation read back after a restart
        # still bounds every generation issued.
        bd = plan.backend_delete
        self.backends.update_packed(_u32s(bd), b"".join(map(self._gone, bd, bd.values())))
        self._be_ids.give(bd)
        return plan.ops()

    def _gone(self, bid: int, key: int) -> bytes:
        """The gone entry for released id ``bid`` (backend key ``key``): the value
        the kernel holds, with its generation, flagged gone. (The shadow keeps no
        generations: one more int per backend. A release is rare next to a packet,
        and a partial sync releases a handful.)"""
        cur = self.backends.lookup(_U32.pack(bid))
        if cur is None or not cur[_BE_PROTO] or cur[:_BE_FLAGS] != _bval(key)[:_BE_FLAGS]:
            # free already, or not the backend the shadow released: a plain
            # tombstone with the newest generation (no flow can be bound to it)
            return bytes(_BACKEND.size) + _U32.pack(self._be_ids.gen)
        return cur[:_BE_FLAGS] + bytes([cur[_BE_FLAGS] | BE_F_GONE]) + cur[_BE_FLAGS + 1:]

    # ----- entry points ---------------------------------------------------------------

    def full_sync(self, recs: Iterable[Record],
                  wanted: Callable[[Key], bool] | None = None,
                  before_services: Callable[[Plan], None] | None = None) -> int:
        """Program exactly ``recs``: adopt what the kernel holds, write what differs,
        prune the rest.

        The changes are planned and applied ``FULL_SYNC_CHUNK`` keys at a time. One
        plan for 50,000 Services held 400,000 slot and member tuples at once, and its
        transient set the controller's peak memory. Each chunk is consistent on its
        own, as a partial sync is. Backend releases wait for the last chunk, so that
        a backend moving between services keeps its id. ``wanted`` says whether a
        key is among ``recs``; with it, ``recs`` is consumed once, a chunk at a
        time, and never held whole (without it, it is collected first).

        ``adopt_kernel``'s repairs go first: they make the kernel match the adopted
        shadow, which the chunks are planned against. They delete only what no
        programmed service reads (orphans) and restore what one misses."""
        ops = self.apply(self.adopt_kernel())
        if wanted is None:
            recs = list(recs)
            wanted = {r.key for r in recs}.__contains__
        # removals first (they free map space), then the wanted records in the
        # State's order (sorting 50,000 keys by address cost a tenth of the sync and
        # bought nothing)
        changes = chain([(k, None) for k in self._svc if not wanted(k)],
                        ((r.key, r) for r in recs))
        unrefs: list[int] = []
        while chunk := list(islice(changes, FULL_SYNC_CHUNK)):
            ops += self.apply(self.plan(chunk, unrefs=unrefs), before_services)
        last = Plan()
        self.release(unrefs, last)
        # a table read back whose service no longer uses Maglev
        last.maglev_delete |= set(self._adopted_tables)
        self._adopted_tables = {}
        return ops + self.apply(last)

    def incremental_sync(self, upserted: Iterable[Record], removed: Iterable[Key]) -> int:
        changes: list[tuple[Key, Record | None]] = [(k, None) for k in removed]
        changes += [(r.key, r) for r in upserted]
        return self.apply(self.plan(changes))

    def binding(self, f: Frontend, b: Backend) -> tuple[int, int, int] | None:
        """What a conntrack entry of a flow from frontend ``f`` to backend ``b`` holds,
        (svc_id, backend id, generation), when both are programmed (planned and
        written: a flow handed over from netfilter, handover.py); else None."""
        s = self._svc.get((f, SCOPE_EXTERNAL))
        v = self._be.get(_bkey(b, f.protocol))
        if s is None or v is None:
            return None
        bid = v & _ID
        raw = self.backends.lookup(_U32.pack(bid))
        if raw is None or not raw[_BE_PROTO]:
            return None
        return s.svc_id, bid, _U32.unpack_from(raw, _BACKEND.size)[0]

    def programmed(self) -> int:
        """Frontends programmed now (from the shadow; twins not counted). A counter
        kept by plan(): counting the shadow made every partial sync O(n)."""
        return self._external

    def scopes(self, f: Frontend) -> list[int]:
        """The scopes programmed for a frontend (from the shadow)."""
        return [s for s in (SCOPE_EXTERNAL, SCOPE_INTERNAL) if (f, s) in self._svc]

    def fill(self) -> dict[str, float]:
        """Fill ratio per owned map, from the shadow (cheap; for metrics)."""
        return {"services": len(self._svc) / self.services.max_entries,
                "backend_slots": self._slot_total / self.slots.max_entries,
                "backends": len(self._be) / (self.backends.max_entries - 1)}

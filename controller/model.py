"""The desired forwarding state of one node, independent of any datapath.

A :class:`State` maps each :class:`Frontend` (address, port, protocol) to the
:class:`ServiceEntry` that says where new flows to it go. Datapaths receive a whole
State plus, for incremental syncs, the :class:`Diff` from the previous one; they never
see Kubernetes objects. Everything here is immutable and hashable, so states can be
compared, diffed and used as dictionary keys without copies.

Backends are kept in a canonical order (sorted), so two States built from the same
objects in any order compare equal, and ``datapath.dump()`` (read from the kernel)
can be compared with the State the controller wanted.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(enum.IntEnum):
    """L4 protocols a Service port may use; values are IP protocol numbers."""

    TCP = 6
    UDP = 17
    SCTP = 132


class BackendFlag(enum.Flag):
    """Facts about an endpoint that matter to the datapath."""

    NONE = 0
    LOCAL = enum.auto()
    """The endpoint runs on this node."""
    TERMINATING = enum.auto()
    """The endpoint is shutting down (used only when no ready endpoint exists)."""


class FrontendKind(enum.IntEnum):
    """Which Service field a frontend comes from; decides its traffic policy."""

    CLUSTER_IP = 0
    """spec.clusterIPs: internal traffic, internalTrafficPolicy applies."""
    EXTERNAL_IP = 1
    """spec.externalIPs: external traffic, externalTrafficPolicy applies."""
    LOAD_BALANCER = 2
    """status.loadBalancer.ingress[].ip: external; loadBalancerSourceRanges apply."""
    NODE_PORT = 3
    """spec.ports[].nodePort on every node address (the frontend's address is the
    unspecified address of its family, 0.0.0.0 or ::; the datapath expands it to the
    configured nodePortAddresses)."""


class ServiceFlag(enum.Flag):
    """Per-frontend behaviour the datapath must implement."""

    NONE = 0
    LOCAL_POLICY = enum.auto()
    """The frontend's traffic policy is Local: ``backends`` are this node's endpoints
    only, and with none the traffic is dropped, never sent to another node."""
    AFFINITY = enum.auto()
    """sessionAffinity ClientIP: a client keeps its backend for affinity_timeout s."""
    HAS_ENDPOINTS = enum.auto()
    """The Service has usable endpoints somewhere in the cluster. With LOCAL_POLICY
    and no local backend, kube-proxy drops; with no endpoints at all it REJECTs."""
    MAGLEV = enum.auto()
    """Annotation kpr.dev/lb-algorithm: maglev. New flows are placed by Maglev
    consistent hashing of their 5-tuple, so every node picks the same backend and a
    backend change moves few flows."""
    RANDOM = enum.auto()
    """Annotation kpr.dev/lb-algorithm: random, overriding a Maglev default. Neither
    flag: the datapath's configured default."""


@dataclass(frozen=True, slots=True)
class Frontend:
    """An address and port on which a Service accepts traffic."""

    ip: IPAddress
    """The service address (ClusterIP, external IP, ...)."""
    port: int
    """The service port, 1-65535."""
    protocol: Protocol
    """The L4 protocol."""

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}/{self.protocol.name}"

    def sort_key(self) -> tuple[int, int, int, int]:
        """IPv4 before IPv6 (ipaddress refuses to compare across families)."""
        return (self.ip.version, int(self.ip), self.port, int(self.protocol))

    def __lt__(self, other: Frontend) -> bool:
        return self.sort_key() < other.sort_key()


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """One endpoint address and port that serves a frontend."""

    ip: IPAddress
    """The endpoint address (a pod IP, or a node IP for host-network pods)."""
    port: int
    """The endpoint (target) port, 1-65535."""
    flags: BackendFlag = field(default=BackendFlag.NONE, compare=False)
    """Datapath-relevant facts; not part of identity or ordering (ServiceEntry
    compares them separately, so a flag change is still a change)."""

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """Where new flows to one frontend go."""

    frontend: Frontend
    """The address/port/protocol this entry serves."""
    backends: tuple[Backend, ...]
    """Backends for new flows, sorted; empty means "no endpoints"."""
    name: str = ""
    """Human-readable origin, ``namespace/service:port-name``; informational."""
    kind: FrontendKind = FrontendKind.CLUSTER_IP
    """Where the frontend comes from."""
    flags: ServiceFlag = ServiceFlag.NONE
    """Policy and affinity flags."""
    affinity_timeout: int = 0
    """ClientIP session affinity timeout in seconds (with ServiceFlag.AFFINITY)."""
    source_ranges: tuple[IPNetwork, ...] = ()
    """loadBalancerSourceRanges of a LOAD_BALANCER frontend (sorted); empty: any."""
    cluster_backends: tuple[Backend, ...] = ()
    """For an external frontend with Local policy: the cluster-wide backends that
    traffic from inside the cluster uses instead (kube-proxy's short-circuit of
    pod -> external IP traffic); empty otherwise."""
    health_check_node_port: int = 0
    """spec.healthCheckNodePort of an externalTrafficPolicy Local LoadBalancer."""
    backend_flags: tuple[BackendFlag, ...] = ()
    """The flags of ``backends``, position by position; kept apart so that a flag
    change (an endpoint starts terminating) is a change of the entry."""
    draining: tuple[Backend, ...] = ()
    """Endpoints still in the slice and serving that take no new flow (terminating
    while ready ones exist, or left out by topology), sorted, never in ``backends``
    or ``cluster_backends``. Flows already on them keep them, as kube-proxy's
    conntrack keeps them: a datapath with its own flow table keeps these backends
    addressable, and the classic ones keep their UDP conntrack entries."""

    @staticmethod
    def make(frontend: Frontend, backends: Iterable[Backend], name: str = "",
             **kw: object) -> ServiceEntry:
        """Build an entry with backends deduplicated and in canonical order.

        A backend listed twice keeps the union of its flags."""
        merged: dict[Backend, BackendFlag] = {}
        for b in backends:
            merged[b] = merged.get(b, BackendFlag.NONE) | b.flags
        ordered = sorted(merged)
        bes = tuple(Backend(b.ip, b.port, merged[b]) for b in ordered)
        if "cluster_backends" in kw:
            kw["cluster_backends"] = tuple(sorted(set(kw["cluster_backends"])))  # type: ignore[call-overload]
        if kw.get("draining"):
            used = set(ordered)
            used.update(kw.get("cluster_backends", ()))  # type: ignore[arg-type]
            kw["draining"] = tuple(sorted({Backend(b.ip, b.port)
                                           for b in kw["draining"]  # type: ignore[attr-defined]
                                           if b not in used}))
        else:
            kw.pop("draining", None)  # the shared empty default
        if "source_ranges" in kw:
            kw["source_ranges"] = tuple(sorted(set(kw["source_ranges"]),  # type: ignore[call-overload]
                                               key=lambda n: (n.version, n)))
        return ServiceEntry(frontend, bes, name,
                            backend_flags=_shared_flags(tuple(merged[b] for b in ordered)),
                            **kw)  # type: ignore[arg-type]

    def local_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.flags & BackendFlag.LOCAL)


H = TypeVar("H", bound=Hashable)


class Interner(Generic[H]):
    """One shared instance per distinct immutable value, for values that many objects
    repeat (port lists, endpoint facts, flag tuples). Each was one object per
    Service or endpoint before, several MB apiece at 50,000 Services.

    Bounded: past ``limit`` distinct values new ones are returned unshared, so a
    stream of unique values (NodePorts) cannot grow it without end. A race between
    threads at worst leaves one value unshared."""

    __slots__ = ("_seen", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._seen: dict[H, H] = {}
        self._limit = limit

    def __call__(self, value: H) -> H:
        shared = self._seen.get(value)
        if shared is not None:
            return shared
        if len(self._seen) < self._limit:
            self._seen[value] = value
        return value


_shared_flags: Interner[tuple[BackendFlag, ...]] = Interner()
"""Most entries' flags are all NONE (a tuple per entry was 4.4 MB at 50,000)."""


class State(Mapping[Frontend, ServiceEntry]):
    """An immutable mapping Frontend -> ServiceEntry."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[ServiceEntry] = ()) -> None:
        self._entries: dict[Frontend, ServiceEntry] = {}
        for e in entries:
            if e.frontend in self._entries and self._entries[e.frontend] != e:
                # Two Services claiming one frontend (the API server prevents it; a
                # file cannot): keep the lexically smallest name, so the result does
                # not depend on the order of the entries.
                if e.name >= self._entries[e.frontend].name:
                    continue
            self._entries[e.frontend] = e

    @classmethod
    def wrap(cls, entries: dict[Frontend, ServiceEntry]) -> State:
        """A State over ``entries`` without copying (the caller must not change the
        dict while the State is in use)."""
        s = cls.__new__(cls)
        s._entries = entries
        return s

    def __getitem__(self, key: Frontend) -> ServiceEntry:
        return self._entries[key]

    def __iter__(self) -> Iterator[Frontend]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, State):
            return self._entries == other._entries
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._entries.items()))

    def __repr__(self) -> str:
        return f"State({len(self)} frontends)"

    def entries(self) -> list[ServiceEntry]:
        """Entries in frontend order."""
        return [self._entries[f] for f in sorted(self._entries)]

    def backend_count(self) -> int:
        return sum(len(e.backends) for e in self._entries.values())


@dataclass(frozen=True, slots=True)
class Diff:
    """What changed between two States."""

    upserted: tuple[ServiceEntry, ...] = ()
    """Entries that are new or whose content changed."""
    removed: tuple[Frontend, ...] = ()
    """Frontends that no longer exist."""

    def __bool__(self) -> bool:
        return bool(self.upserted or self.removed)

    def __len__(self) -> int:
        return len(self.upserted) + len(self.removed)

    @staticmethod
    def between(old: Mapping[Frontend, ServiceEntry], new: Mapping[Frontend, ServiceEntry],
                only: Iterable[Frontend] | None = None) -> Diff:
        """The diff from ``old`` to ``new``.

        ``only`` restricts the comparison to the given frontends: the sync loop
        passes the frontends of the Services that changed, so one change among
        50,000 Services costs work proportional to that Service.
        """
        keys: Iterable[Frontend] = (set(old) | set(new)) if only is None else set(only)
        upserted: list[ServiceEntry] = []
        removed: list[Frontend] = []
        for f in sorted(keys):
            n = new.get(f)
            if n is None:
                if f in old:
                    removed.append(f)
            elif old.get(f) != n:
                upserted.append(n)
        return Diff(tuple(upserted), tuple(removed))

    def apply(self, old: Mapping[Frontend, ServiceEntry]) -> State:
        """``old`` with this diff applied (for tests and the property check)."""
        d = dict(old)
        for f in self.removed:
            d.pop(f, None)
        for e in self.upserted:
            d[e.frontend] = e
        return State(d.values())

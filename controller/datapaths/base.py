"""The one protocol every datapath implements.

``sync(state, diff)`` with ``diff=None`` is a full sync: the datapath reads back what
the kernel holds, writes what is missing or different, and removes what is not
wanted (so it also repairs drift and adopts state left by a previous process). With
a Diff it applies only that change. A full sync and a series of incremental syncs
that reach the same State leave the kernel in the same state.

``dump()`` reads the kernel, never the controller's memory: ``kpr status`` and the
tests use it to see what is really programmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import ipaddress
from typing import Any

from controller.model import Backend, Diff, FrontendKind, ServiceEntry, ServiceFlag, State


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a datapath can run on this machine."""

    ok: bool
    """True when it can."""
    reason: str
    """Why not (or what was found), for logs and ``datapath: auto``."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did."""

    full: bool
    """A full (True) or incremental sync."""
    ops: int
    """Kernel objects written or deleted (map elements, rules)."""
    frontends: int
    """Frontends programmed after the sync."""


class DatapathError(RuntimeError):
    """A sync failed; the next sync must be a full one."""


class Datapath(Protocol):
    """A forwarding implementation."""

    name: str

    def probe(self) -> Probe: ...

    def start(self) -> None:
        """Load programs / create tables and attach; adopt existing kernel state."""

    def sync(self, state: State, diff: Diff | None) -> SyncResult: ...

    def dump(self) -> State: ...

    def cleanup(self) -> None:
        """Remove everything this datapath ever installed; idempotent."""

    def close(self) -> None:
        """Stop background work; leave the kernel state in place."""


def canonical_entry(e: ServiceEntry, name: str, flags_kept: ServiceFlag,
                    collapse_ranges: bool) -> ServiceEntry:
    """What a rule-based writer (nftables, iptables, IPVS) reads back for an entry:
    only the flags it implements, backends without flags, the cluster-wide
    backends of an external Local frontend, and the source ranges of the
    frontend's family when a frontend chain exists (merged where the kernel merges
    prefixes). ``name``: the Service name as the writer stores it."""
    v = e.frontend.ip.version
    local_ext = e.kind != FrontendKind.CLUSTER_IP and e.flags & ServiceFlag.LOCAL_POLICY
    kw: dict[str, Any] = {}
    if local_ext and e.cluster_backends:
        kw["cluster_backends"] = tuple(Backend(b.ip, b.port) for b in e.cluster_backends)
    if e.kind == FrontendKind.LOAD_BALANCER:
        ranges = [n for n in e.source_ranges if n.version == v]
        if ranges and (e.backends or kw):
            kw["source_ranges"] = tuple(ipaddress.collapse_addresses(ranges)  # type: ignore[arg-type]
                                        if collapse_ranges else ranges)
    flags = e.flags & flags_kept
    return ServiceEntry.make(
        e.frontend, (Backend(b.ip, b.port) for b in e.backends), name, kind=e.kind,
        flags=flags, affinity_timeout=e.affinity_timeout if flags & ServiceFlag.AFFINITY else 0,
        **kw)

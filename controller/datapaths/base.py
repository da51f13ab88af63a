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

from controller.model import Diff, State


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

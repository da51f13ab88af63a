"""Change tracking: object events in, (State, changed frontends) out.

Modelled on kube-proxy's ServiceChangeTracker/EndpointsChangeTracker: sources report
object updates at any rate; the tracker keeps the current objects and the set of
Services touched since the last sync. :meth:`ChangeTracker.apply` re-translates only
those Services, drops the ones whose entries did not change (no-op updates), and
returns the frontends that did change, which drive the partial sync. Work per sync is
proportional to what changed, not to the number of Services.

Thread-safe: sources call the update methods from their own threads, the sync loop
calls :meth:`apply`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

from controller.model import Frontend, ServiceEntry, State
from controller.objects import EndpointSlice, ObjectKey, Service
from controller.translate import NodeInfo, translate_service


@dataclass(frozen=True, slots=True)
class Applied:
    """Result of one :meth:`ChangeTracker.apply`."""

    state: State
    """The whole desired state after the changes."""
    changed: frozenset[Frontend]
    """Frontends whose entry was added, changed or removed."""
    services_changed: int
    """Services whose entries changed (no-op updates excluded)."""


class ChangeTracker:
    """Current objects plus the Services touched since the last apply."""

    def __init__(self, node: NodeInfo | None = None) -> None:
        self._node = node or NodeInfo()
        self._lock = threading.Lock()
        self._services: dict[ObjectKey, Service] = {}
        self._slices: dict[ObjectKey, EndpointSlice] = {}
        self._slices_by_service: dict[ObjectKey, dict[ObjectKey, EndpointSlice]] = (
            defaultdict(dict))
        self._pending: set[ObjectKey] = set()
        self._entries: dict[ObjectKey, tuple[ServiceEntry, ...]] = {}
        # frontend -> {service key: entry}; normally one owner per frontend
        self._owners: dict[Frontend, dict[ObjectKey, ServiceEntry]] = defaultdict(dict)
        self._state: dict[Frontend, ServiceEntry] = {}

    # ----- updates from sources -------------------------------------------------------

    def update_service(self, key: ObjectKey, svc: Service | None) -> bool:
        """Set (or with None, delete) a Service. Returns False for a no-op."""
        with self._lock:
            old = self._services.get(key)
            if old == svc:
                return False
            if svc is None:
                del self._services[key]
            else:
                self._services[key] = svc
            self._pending.add(key)
            return True

    def update_slice(self, key: ObjectKey, sl: EndpointSlice | None) -> bool:
        """Set (or with None, delete) an EndpointSlice. Returns False for a no-op."""
        with self._lock:
            old = self._slices.get(key)
            if old == sl:
                return False
            if old is not None:
                self._slices_by_service[old.service].pop(key, None)
                self._pending.add(old.service)
            if sl is None:
                del self._slices[key]
            else:
                self._slices[key] = sl
                self._slices_by_service[sl.service][key] = sl
                self._pending.add(sl.service)
            return True

    def pending(self) -> int:
        """Number of Services touched since the last apply."""
        with self._lock:
            return len(self._pending)

    def counts(self) -> tuple[int, int]:
        """(Services, EndpointSlices) currently known."""
        with self._lock:
            return len(self._services), len(self._slices)

    # ----- consumed by the sync loop --------------------------------------------------

    def apply(self) -> Applied:
        """Translate the touched Services and return the new State."""
        with self._lock:
            pending, self._pending = self._pending, set()
            changed: set[Frontend] = set()
            services_changed = 0
            for key in pending:
                svc = self._services.get(key)
                new = (translate_service(svc, self._slices_by_service.get(key, {}).values(),
                                         self._node) if svc is not None else ())
                old = self._entries.get(key, ())
                if old == new:
                    continue  # a no-op change, dropped
                services_changed += 1
                if new:
                    self._entries[key] = new
                else:
                    self._entries.pop(key, None)
                for e in old:
                    self._owners[e.frontend].pop(key, None)
                    changed.add(e.frontend)
                for e in new:
                    self._owners[e.frontend][key] = e
                    changed.add(e.frontend)
            for f in changed:
                owners = self._owners.get(f)
                if not owners:
                    self._owners.pop(f, None)
                    self._state.pop(f, None)
                else:
                    # Two Services claiming one frontend (possible from files): the
                    # lexically first Service wins, whatever the order of events.
                    self._state[f] = owners[min(owners, key=lambda k: (k.namespace, k.name))]
            return Applied(State(self._state.values()), frozenset(changed), services_changed)

"""Change tracking: object events in, per-sync diffs out.

Modelled on kube-proxy's ServiceChangeTracker / EndpointsChangeTracker:

* Sources report object updates at any rate, from their own threads. For every object
  touched since the last sync the tracker keeps ``(previous, current)``: ``previous``
  is what the last sync saw. An update that brings an object back to ``previous``
  (add then delete, or a flap) removes the pending change, so it neither counts as
  pending nor causes a sync.
* :meth:`ChangeTracker.apply` re-translates only the Services with pending changes,
  compares their entries with the ones it holds, and returns the :class:`Diff` of the
  frontends that really changed. Nothing in it walks all Services, so one change
  among 50,000 costs work proportional to that Service (``work`` counts the steps,
  and a test holds it to that).
* :meth:`ChangeTracker.view` is the whole desired State without a copy, valid until
  the next apply; full syncs read it, and only they walk every entry.

Everything else the sync loop reports is kept incrementally too: the number of
service ports with a Local policy but no local endpoint (a kube-proxy metric) and the
trigger times of endpoint changes (for the network-programming latency).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from controller.alloc import bulk_allocation
from controller.model import Diff, Frontend, ServiceEntry, State
from controller.objects import EndpointSlice, ObjectKey, Service
from controller.translate import NodeInfo, no_local_endpoints, translate_service

T = TypeVar("T")
K = TypeVar("K")


class KeySets(Generic[K]):
    """``dict[K, set[ObjectKey]]`` that stores a lone member bare.

    Nearly every Service has one EndpointSlice, and nearly every frontend one
    owning Service: a set or dict per key cost 13 MB each way at 50,000 Services."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[K, ObjectKey | set[ObjectKey]] = {}

    def add(self, k: K, member: ObjectKey) -> None:
        cur = self._d.get(k)
        if cur is None:
            self._d[k] = member
        elif isinstance(cur, set):
            cur.add(member)
        elif cur != member:
            self._d[k] = {cur, member}

    def discard(self, k: K, member: ObjectKey) -> None:
        cur = self._d.get(k)
        if isinstance(cur, set):
            cur.discard(member)
            if len(cur) == 1:
                self._d[k] = next(iter(cur))
        elif cur == member:
            del self._d[k]

    def get(self, k: K) -> tuple[ObjectKey, ...]:
        cur = self._d.get(k)
        if cur is None:
            return ()
        return tuple(cur) if isinstance(cur, set) else (cur,)


@dataclass(slots=True)
class Change(Generic[T]):
    """One pending object change."""

    previous: T | None
    """The object as the last sync saw it (None: it did not exist)."""
    current: T | None
    """The object now (None: deleted)."""


@dataclass(frozen=True, slots=True)
class Applied:
    """Result of one :meth:`ChangeTracker.apply`."""

    diff: Diff
    """Entries added or changed, frontends removed."""
    services_changed: int
    """Services whose entries changed (no-op updates excluded)."""
    trigger_times: tuple[float, ...] = ()
    """Unix times of the endpoint changes this sync programs (annotation
    endpoints.kubernetes.io/last-change-trigger-time), for the latency metric."""


@dataclass(slots=True)
class Counters:
    """Monotonic counters and gauges the metrics layer reads."""

    service_changes_total: int = 0
    """Service updates received that were not no-ops."""
    endpoint_changes_total: int = 0
    """EndpointSlice updates received that were not no-ops."""
    no_local_internal: int = 0
    """Service ports with internalTrafficPolicy Local and no local endpoint."""
    no_local_external: int = 0
    """Service ports with externalTrafficPolicy Local and no local endpoint."""
    work: int = 0
    """Steps of apply(): Services translated plus entries compared. Used by tests to
    show that one change costs work proportional to one Service."""


class ChangeTracker:
    """Current objects plus the pending changes since the last apply."""

    def __init__(self, node: NodeInfo | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._node = node or NodeInfo()
        self._clock = clock
        self._lock = threading.Lock()
        self.started = self._clock()
        self._services: dict[ObjectKey, Service] = {}
        self._slices: dict[ObjectKey, EndpointSlice] = {}
        self._slices_by_service: KeySets[ObjectKey] = KeySets()  # service -> slice keys
        self._svc_changes: dict[ObjectKey, Change[Service]] = {}
        self._slice_changes: dict[ObjectKey, Change[EndpointSlice]] = {}
        self._retranslate: set[ObjectKey] = set()  # node changes: every Service
        self._triggers: dict[ObjectKey, list[float]] = defaultdict(list)
        # Service -> its entries; a lone entry is stored bare (most Services have
        # one port, and a 1-tuple each was 2.8 MB at 50,000): see _entries_of
        self._entries: dict[ObjectKey, ServiceEntry | tuple[ServiceEntry, ...]] = {}
        self._no_local: dict[ObjectKey, tuple[int, int]] = {}
        # frontend -> keys of the Services with an entry for it; normally one
        self._owners: KeySets[Frontend] = KeySets()
        self._state: dict[Frontend, ServiceEntry] = {}
        self.counters = Counters()

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
            ch = self._svc_changes.get(key)
            if ch is None:
                self._svc_changes[key] = Change(old, svc)
            elif ch.previous == svc:
                del self._svc_changes[key]  # back where the last sync saw it
            else:
                ch.current = svc
            self.counters.service_changes_total += 1
            return True

    def update_slice(self, key: ObjectKey, sl: EndpointSlice | None) -> bool:
        """Set (or with None, delete) an EndpointSlice. Returns False for a no-op."""
        with self._lock:
            old = self._slices.get(key)
            if old == sl:
                return False
            if old is not None:
                self._slices_by_service.discard(old.service, key)
            if sl is None:
                del self._slices[key]
            else:
                self._slices[key] = sl
                self._slices_by_service.add(sl.service, key)
                if sl.trigger_time is not None and sl.trigger_time > self.started:
                    self._triggers[sl.service].append(sl.trigger_time)
            ch = self._slice_changes.get(key)
            if ch is None:
                self._slice_changes[key] = Change(old, sl)
            elif ch.previous == sl:
                del self._slice_changes[key]
            else:
                ch.current = sl
            self.counters.endpoint_changes_total += 1
            return True

    def set_node(self, node: NodeInfo) -> bool:
        """The node's facts changed (name, zone): every Service is re-translated."""
        with self._lock:
            if node == self._node:
                return False
            self._node = node
            self._retranslate = set(self._services) | set(self._entries)
            return True

    @property
    def node(self) -> NodeInfo:
        return self._node

    def pending(self) -> tuple[int, int]:
        """(Service changes, EndpointSlice changes) not yet applied."""
        with self._lock:
            return len(self._svc_changes), len(self._slice_changes)

    def counts(self) -> tuple[int, int]:
        """(Services, EndpointSlices) currently known."""
        with self._lock:
            return len(self._services), len(self._slices)

    def known(self) -> tuple[set[ObjectKey], set[ObjectKey]]:
        """Keys of the Services and EndpointSlices held (sources diff relists with it)."""
        with self._lock:
            return set(self._services), set(self._slices)

    # ----- consumed by the sync loop --------------------------------------------------

    def apply(self) -> Applied:
        """Translate the Services with pending changes; return what changed."""
        with self._lock:
            if len(self._svc_changes) + len(self._slice_changes) + len(self._retranslate) \
                    > 1000:
                with bulk_allocation():
                    return self._apply_locked()
            return self._apply_locked()

    def _apply_locked(self) -> Applied:
        touched: set[ObjectKey] = set(self._svc_changes) | self._retranslate
        for ch in self._slice_changes.values():
            for sl in (ch.previous, ch.current):
                if sl is not None:
                    touched.add(sl.service)
        self._svc_changes.clear()
        self._slice_changes.clear()
        self._retranslate = set()
        triggers: list[float] = []
        changed: set[Frontend] = set()
        services_changed = 0
        c = self.counters
        for key in touched:
            svc = self._services.get(key)
            c.work += 1
            new = (translate_service(svc, [self._slices[k] for k in
                                           self._slices_by_service.get(key)],
                                     self._node) if svc is not None else ())
            old = self._entries_of(key)
            triggers += self._triggers.pop(key, ())
            if old == new:
                continue  # a no-op change, dropped
            services_changed += 1
            if new:
                self._entries[key] = new[0] if len(new) == 1 else new
            else:
                self._entries.pop(key, None)
            oi, oe = self._no_local.pop(key, (0, 0))
            ni, ne = no_local_endpoints(new)
            if ni or ne:
                self._no_local[key] = (ni, ne)
            c.no_local_internal += ni - oi
            c.no_local_external += ne - oe
            for e in old:
                self._owners.discard(e.frontend, key)
                changed.add(e.frontend)
            for e in new:
                self._owners.add(e.frontend, key)
                changed.add(e.frontend)
        upserted: list[ServiceEntry] = []
        removed: list[Frontend] = []
        for f in sorted(changed):
            c.work += 1
            owners = self._owners.get(f)
            before = self._state.get(f)
            if not owners:
                if self._state.pop(f, None) is not None:
                    removed.append(f)
                continue
            # Two Services claiming one frontend (possible from files): the
            # lexically first Service wins, whatever the order of events.
            win = min(owners, key=lambda k: (k.namespace, k.name))
            now = next(e for e in self._entries_of(win) if e.frontend == f)
            self._state[f] = now
            if now != before:
                upserted.append(now)
        return Applied(Diff(tuple(upserted), tuple(removed)), services_changed,
                       tuple(triggers))

    def _entries_of(self, key: ObjectKey) -> tuple[ServiceEntry, ...]:
        v = self._entries.get(key, ())
        return (v,) if isinstance(v, ServiceEntry) else v

    def state(self) -> State:
        """A snapshot of the whole desired State (O(N)), for a caller that keeps it
        past the next apply() (tests)."""
        with self._lock:
            return State(self._state.values())

    def view(self) -> State:
        """The desired State without copying: valid only until the next apply().
        Every sync passes it (apply() runs in the sync loop only), so none pays for
        a snapshot: a copy of 50,000 entries was 2.5 MB at the full sync's peak."""
        return State.wrap(self._state)


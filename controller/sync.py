"""The sync loop: coalesce changes, rate-limit, retry, full vs partial syncs.

:class:`BoundedFrequencyRunner` follows kube-proxy's runner (pkg/util/async):
``request()`` asks for a run; runs are at least ``min_interval`` apart (changes that
arrive meanwhile coalesce into one run), at most ``max_interval`` apart (a periodic
full resync), and a failed run is retried after ``retry_interval``, doubling up to
``max_interval``. The decision logic is a pure function of an injectable clock, so it
is unit-tested without sleeping.

:class:`Proxier` is the function the runner runs: it takes the tracker's changes,
diffs them into the datapath, and makes the next sync a full one after any failure
(the shadow of the kernel can no longer be trusted) or when the periodic resync is due.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from controller.datapaths.base import Datapath, SyncResult
from controller.model import Diff, State
from controller.tracker import ChangeTracker

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class BoundedFrequencyRunner:
    """Runs ``fn`` on request, no more often than min_interval, at least every
    max_interval, retrying failures with exponential backoff."""

    def __init__(self, fn: Callable[[], bool], min_interval: float, max_interval: float,
                 retry_interval: float = 1.0, clock: Clock = time.monotonic) -> None:
        if min_interval < 0 or max_interval <= 0 or min_interval > max_interval:
            raise ValueError("need 0 <= min_interval <= max_interval, max_interval > 0")
        self.fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_interval = retry_interval
        self.clock = clock
        self._cond = threading.Condition()
        self._requested = False
        self._last_run: float | None = None
        self._retry_at: float | None = None
        self._backoff = retry_interval
        self._stopped = False

    def request(self) -> None:
        """Ask for a run as soon as min_interval allows."""
        with self._cond:
            self._requested = True
            self._cond.notify()

    def next_run(self, now: float) -> float:
        """When the next run is due (<= now: run now). Pure; for tests too."""
        if self._last_run is None:
            return now
        due = self._last_run + self.max_interval
        if self._requested:
            due = min(due, self._last_run + self.min_interval)
        if self._retry_at is not None:
            due = min(due, max(self._retry_at, self._last_run + self.min_interval))
        return due

    def run_once(self) -> bool:
        """Run fn now and record the outcome (used by loop() and tests)."""
        with self._cond:
            self._requested = False
            self._last_run = self.clock()
        try:
            ok = self.fn()
        except Exception:
            log.exception("sync failed")
            ok = False
        with self._cond:
            if ok:
                self._retry_at = None
                self._backoff = self.retry_interval
            else:
                self._retry_at = self.clock() + self._backoff
                self._backoff = min(self._backoff * 2, self.max_interval)
        return ok

    def loop(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set (or stop() is called)."""
        while not stop.is_set():
            with self._cond:
                if self._stopped:
                    return
                wait = self.next_run(self.clock()) - self.clock()
                if wait > 0:
                    self._cond.wait(min(wait, 0.5))
                    continue
            self.run_once()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()


class SyncObserver(Protocol):
    """What the Proxier reports (metrics.py implements it; tests may record it)."""

    def synced(self, full: bool, duration: float, result: SyncResult | None,
               trigger_times: tuple[float, ...]) -> None:
        """A sync succeeded (result None: nothing to change)."""

    def failed(self, error: Exception) -> None:
        """A sync failed; the next one is full."""


class _NoObserver:
    def synced(self, full: bool, duration: float, result: SyncResult | None,
               trigger_times: tuple[float, ...]) -> None:
        pass

    def failed(self, error: Exception) -> None:
        pass


@dataclass(slots=True)
class SyncStats:
    """Counters kept by the Proxier."""

    syncs: int = 0
    """Successful syncs that changed the datapath."""
    full_syncs: int = 0
    """Of those, full ones."""
    failures: int = 0
    """Failed syncs."""
    last_ops: int = 0
    """Kernel/tool operations of the last sync."""
    last_duration: float = 0.0
    """Seconds the last sync took."""
    last_success: float = 0.0
    """Wall time of the last successful sync (no-op syncs included)."""


class Proxier:
    """Tracker changes -> datapath syncs.

    A partial sync hands the datapath the tracker's diff (work proportional to the
    change). A full sync hands it the whole State and lets it reconcile the kernel
    against it; it runs first, after any failure (the datapath's shadow of the
    kernel can no longer be trusted), and every ``full_sync_interval`` seconds
    (kube-proxy: FullSyncPeriod, 1 h)."""

    def __init__(self, datapath: Datapath, tracker: ChangeTracker,
                 full_sync_interval: float = 3600.0, clock: Clock = time.monotonic,
                 observer: SyncObserver | None = None,
                 listeners: list[Callable[[Diff | None, State], None]] | None = None) -> None:
        self.datapath = datapath
        self.listeners = listeners or []
        """Called after each successful sync that changed something, with the diff
        (None for a full sync) and the State: the healthCheckNodePort servers."""
        self.tracker = tracker
        self.full_sync_interval = full_sync_interval
        self.clock = clock
        self.observer: SyncObserver = observer or _NoObserver()
        self.needs_full = True
        self._last_full = 0.0
        self._triggers: tuple[float, ...] = ()
        self.stats = SyncStats()

    def full_sync_done(self) -> None:
        """Record a full sync done outside sync() (the cold-start benchmark times the
        translate and program phases separately)."""
        self.needs_full = False
        self._last_full = self.clock()

    def sync(self) -> bool:
        """One sync; True on success."""
        applied = self.tracker.apply()
        self._triggers += applied.trigger_times
        now = self.clock()
        full = self.needs_full or now - self._last_full >= self.full_sync_interval
        t0 = time.perf_counter()
        if not full and not applied.diff:
            self.stats.last_success = time.time()
            self.observer.synced(False, time.perf_counter() - t0, None, self._triggers)
            self._triggers = ()
            return True
        try:
            # the tracker's own dict, not a copy: apply() runs only here, and a
            # copy of 50,000 entries was 2.5 MB at the full sync's memory peak
            state = self.tracker.view()
            diff = None if full else applied.diff
            result = self.datapath.sync(state, diff)
        except Exception as e:
            self.needs_full = True
            self.stats.failures += 1
            log.error("%s sync failed, next sync is a full one: %s", self.datapath.name, e)
            self.observer.failed(e)
            return False
        dt = time.perf_counter() - t0
        self.needs_full = False
        if full:
            self._last_full = now
            self.stats.full_syncs += 1
        self.stats.syncs += 1
        self.stats.last_ops = result.ops
        self.stats.last_duration = dt
        self.stats.last_success = time.time()
        log.info("%s %s sync: %d frontends, %d changed, %d kernel ops, %.1f ms",
                 self.datapath.name, "full" if full else "partial", result.frontends,
                 len(applied.diff), result.ops, dt * 1000)
        self.observer.synced(full, dt, result, self._triggers)
        self._triggers = ()
        for listener in self.listeners:
            try:
                listener(diff, state)
            except Exception:  # noqa: BLE001 - a listener must not fail the sync
                log.exception("sync listener failed")
        return True

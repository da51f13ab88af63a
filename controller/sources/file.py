"""``--source file:PATH``: Services and EndpointSlices from YAML or JSON files.

PATH is a file or a directory of ``*.yaml``, ``*.yml`` and ``*.json`` files, holding
objects exactly as ``kubectl get -o yaml|json`` prints them: single objects,
multi-document YAML, or ``List`` (also ``ServiceList``, ``EndpointSliceList``) objects
with ``items``. Other kinds are ignored.

The source polls a cheap signature of PATH (inode, mtime, size of every file) and
re-reads everything when it changes; an atomic rename over a file changes its inode,
so it counts as a change even within one mtime tick. Each reload is compared object
by object with the previous one, so the tracker sees only real changes.

A file replaced whole (a new inode: the atomic rename kubectl-style tools and
ConfigMap mounts do) is read at once. A file written in place, or new in a
directory, may be half written: it is read once its signature held for one poll
interval. Found in the VM, where emulation widens the moment between an in-place
writer's truncate and its write: a manifest read there as empty removed every
Service, and the unparsable rest then "kept" nothing (32 of 32 flows reset).

Errors never harm what is programmed:
* a file that cannot be read or parsed keeps every object of the previous reload;
* an object that fails validation is reported by name and field, and its last valid
  version (if any) stays programmed; every other object is applied.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.objects import (
    EndpointSlice,
    ObjectError,
    ObjectKey,
    Service,
    object_ref,
    parse_service,
    parse_slice,
)
from controller.tracker import ChangeTracker

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SourceError(Exception):
    """The source as a whole could not be read (nothing was changed)."""


@dataclass
class Snapshot:
    """Everything one reload produced."""

    services: dict[ObjectKey, Service] = field(default_factory=dict)
    """Valid Services by key."""
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    """Valid EndpointSlices by key."""
    invalid: dict[tuple[str, ObjectKey], ObjectError] = field(default_factory=dict)
    """Objects that failed validation, by (kind, key) when the key was readable."""
    errors: list[str] = field(default_factory=list)
    """Every validation message, in file order."""


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file()
                      and not p.name.startswith("."))
    return [path]


def signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Cheap fingerprint of PATH's content; changes when any file is rewritten."""
    sig = []
    for p in _files(path):
        st = p.stat()
        sig.append((p.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def replaced_whole(old: tuple[tuple[str, int, int, int], ...] | None,
                   new: tuple[tuple[str, int, int, int], ...]) -> bool:
    """Is every file that differs between two signatures gone or replaced by a new
    inode (so complete), none written in place or new (maybe half written)?"""
    if old is None:
        return True  # the first read: nothing programmed to protect yet
    before = {name: (ino, rest) for name, ino, *rest in old}
    for name, ino, *rest in new:
        prev = before.get(name)
        if prev is None or (prev[0] == ino and prev[1] != rest):
            return False
    return True


def _documents(p: Path) -> Iterator[Any]:
    text = p.read_text()
    if p.suffix == ".json":
        yield json.loads(text)
    else:
        yield from yaml.load_all(text, Loader=_YAML_LOADER)


def _objects(doc: Any) -> Iterator[tuple[str, Any]]:
    """(kind, object) pairs of one document, unpacking Lists."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind", "")
    if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
        item_kind = kind[:-4] if kind != "List" else ""
        for item in doc.get("items") or []:
            if isinstance(item, dict):
                yield (item.get("kind") or item_kind), item
        return
    yield kind, doc


def load(path: Path) -> Snapshot:
    """Read and validate everything under PATH. Raises SourceError on a file error."""
    snap = Snapshot()
    try:
        files = _files(path)
        docs = [(p, d) for p in files for d in _documents(p)]
    except (OSError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: {e}") from e
    for p, doc in docs:
        for kind, obj in _objects(doc):
            if kind == "Service":
                parse, bucket, kname = parse_service, snap.services, "Service"
            elif kind == "EndpointSlice":
                parse, bucket, kname = parse_slice, snap.slices, "EndpointSlice"
            else:
                continue
            try:
                parsed = parse(obj)
            except ObjectError as e:
                snap.errors.append(f"{p.name}: {e}")
                ns, _, name = object_ref(obj).partition("/")
                snap.invalid[(kname, ObjectKey(ns, name))] = e
                continue
            bucket[parsed.key] = parsed  # type: ignore[index]
    return snap


class FileSource:
    """Polls PATH and feeds object changes into a ChangeTracker."""

    def __init__(self, path: Path, tracker: ChangeTracker, interval: float = 1.0,
                 on_change: Callable[[], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.tracker = tracker
        self.interval = interval
        self.on_change = on_change or (lambda: None)
        self.on_error = on_error or (lambda msg: None)
        self._sig: tuple[tuple[str, int, int, int], ...] | None = None
        self._pending: tuple[tuple[str, int, int, int], ...] | None = None
        """A signature written in place, seen once: read if the next poll sees it."""
        self._services: dict[ObjectKey, Service] = {}
        self._slices: dict[ObjectKey, EndpointSlice] = {}
        self.synced = threading.Event()
        """Set after the first successful load (like an informer's HasSynced)."""

    def poll(self) -> bool:
        """Reload if PATH changed. Returns True when objects changed."""
        try:
            sig = signature(self.path)
        except OSError as e:
            self._error(f"{self.path}: {e}")
            return False
        if sig == self._sig:
            self._pending = None
            return False
        if not replaced_whole(self._sig, sig) and sig != self._pending:
            self._pending = sig  # maybe half written: read it if it holds
            return False
        self._pending = None
        try:
            snap = load(self.path)
        except SourceError as e:
            self._error(f"cannot read source, keeping what is programmed: {e}")
            return False
        self._sig = sig
        for msg in snap.errors:
            self._error(f"invalid object skipped: {msg}")
        # An invalid object keeps its last valid version.
        for (kind, key) in snap.invalid:
            if kind == "Service" and key in self._services and key not in snap.services:
                snap.services[key] = self._services[key]
            if kind == "EndpointSlice" and key in self._slices and key not in snap.slices:
                snap.slices[key] = self._slices[key]
        changed = False
        for key in self._services.keys() - snap.services.keys():
            changed |= self.tracker.update_service(key, None)
        for key, svc in snap.services.items():
            changed |= self.tracker.update_service(key, svc)
        for key in self._slices.keys() - snap.slices.keys():
            changed |= self.tracker.update_slice(key, None)
        for key, sl in snap.slices.items():
            changed |= self.tracker.update_slice(key, sl)
        self._services, self._slices = snap.services, snap.slices
        log.info("source %s: %d services, %d endpointslices%s", self.path,
                 len(snap.services), len(snap.slices),
                 f", {len(snap.errors)} invalid" if snap.errors else "")
        self.synced.set()
        if changed:
            self.on_change()
        return changed

    def _error(self, msg: str) -> None:
        log.error("%s", msg)
        self.on_error(msg)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            self.poll()
            stop.wait(self.interval)


def file_source_path(spec: str) -> Path:
    """``file:PATH`` -> Path."""
    if not spec.startswith("file:") or len(spec) <= 5:
        raise ValueError(f"--source: expected file:PATH or kube, got {spec!r}")
    return Path(os.path.expanduser(spec[5:]))

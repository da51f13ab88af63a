"""Attaching the programs at tc clsact ingress/egress, and following new links.

Filters sit at a fixed priority and handle, named ``kpr/<instance>/<direction>``, and
are installed with ``replace``: a restarted or upgraded kpr swaps its new program in
atomically, with no moment where a link has no program (the new program uses the
same pinned maps, so flows and services carry over).

Links are chosen by ``--interfaces``: comma-separated names and shell globs. A
netlink listener on RTMGRP_LINK triggers a rescan whenever a link appears or changes,
so pods created after start-up (new veths) get the programs within milliseconds; a
slow periodic rescan backs it up in case a notification is lost (ENOBUFS).

Cleanup removes only filters whose name starts with ``kpr/``. The clsact qdisc
stays unless everything is being removed (``kpr cleanup``, cleanupOnExit), and then
only when no filter of anyone else's is left on it.

Why the qdisc stays, and why every mode keeps one (:class:`TcAttacher` with no
programs): grafting or deleting an ingress/clsact qdisc goes through
qdisc_graft(), which calls dev_deactivate() on a running device (6.1 and 6.18
alike): its transmit queues point at noop_qdisc for an RCU grace period, and
every packet the link sends meanwhile is dropped. Measured here: 392 clsact
add/del on a veth under a 14,000/s ping lost 79 replies (0 without them). A
dropped SYN or SYN-ACK costs a new connection its 1 s retransmission. Filters
are added and replaced on an existing qdisc without that (tc_new_tfilter grafts
nothing). So a datapath switch never adds or removes a qdisc under traffic: the
classic modes hold an empty clsact on the same links, created as a link appears
(before its pod has traffic), and switching away from eBPF leaves it.
"""

from __future__ import annotations

import fnmatch
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from controller.netns import open_ipr, setns_thread

log = logging.getLogger(__name__)

INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
PRIO = 1
HANDLE = 1
NAME_PREFIX = "kpr/"
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


def parse_patterns(spec: str) -> list[str]:
    """``"hc,hb*,eth0x"`` -> ``["hc", "hb*", "eth0x"]``; rejects empty items."""
    pats = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in pats):
        raise ValueError(f"--interfaces: expected comma-separated names or globs, got {spec!r}")
    return pats


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class Attachment:
    """One kpr filter found on a link."""

    ifname: str
    """Link name."""
    direction: str
    """ingress or egress."""
    name: str
    """Filter name (kpr/<instance>/<direction>)."""


def _bpf_filters(ipr: IPRoute, index: int, parent: int) -> list[Any]:
    try:
        msgs = ipr.get_filters(index=index, parent=parent)
    except NetlinkError:
        return []
    # pyroute2 returns the chain header too; real bpf filters carry options.
    return [m for m in msgs if m.get_attr("TCA_OPTIONS") is not None]


def _filter_name(msg: Any) -> str:
    return msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or ""


def list_attachments(netns: str | None = None) -> list[Attachment]:
    """Every kpr filter on every link of the namespace (read from the kernel)."""
    out = []
    with open_ipr(netns) as ipr:
        for link in ipr.get_links():
            ifname = link.get_attr("IFLA_IFNAME")
            for parent, direction in ((INGRESS, "ingress"), (EGRESS, "egress")):
                for f in _bpf_filters(ipr, link["index"], parent):
                    name = _filter_name(f)
                    if name.startswith(NAME_PREFIX):
                        out.append(Attachment(ifname, direction, name))
    return out


def detach_all(netns: str | None = None, prefix: str = NAME_PREFIX,
               keep_qdisc: bool = True) -> int:
    """Remove kpr filters (by name prefix) from every link; with ``keep_qdisc``
    false, also the clsact qdiscs left empty (see the module docstring: deleting
    one drops what the link sends for a moment)."""
    removed = 0
    with open_ipr(netns) as ipr:
        for link in ipr.get_links():
            idx = link["index"]
            has_clsact = any(q.get_attr("TCA_KIND") == "clsact"
                             for q in ipr.get_qdiscs(index=idx))
            if not has_clsact:
                continue
            others = 0
            for parent in (INGRESS, EGRESS):
                for f in _bpf_filters(ipr, idx, parent):
                    if _filter_name(f).startswith(prefix):
                        try:
                            ipr.tc("del-filter", "bpf", index=idx, handle=f["handle"],
                                   prio=f["info"] >> 16, parent=parent)
                            removed += 1
                        except NetlinkError as e:
                            log.warning("removing filter on %s: %s",
                                        link.get_attr("IFLA_IFNAME"), e)
                    else:
                        others += 1
            if not keep_qdisc and others == 0 and not _bpf_filters(ipr, idx, INGRESS) \
                    and not _bpf_filters(ipr, idx, EGRESS):
                try:
                    ipr.tc("del", "clsact", index=idx)
                except NetlinkError as e:
                    log.debug("clsact on %s: %s", link.get_attr("IFLA_IFNAME"), e)
    return removed


class TcAttacher:
    """Keeps the programs attached to every link matching the patterns; with
    ``ingress_fd`` and ``egress_fd`` None (a classic mode), only the clsact qdisc
    that a later switch to eBPF attaches to (see the module docstring)."""

    def __init__(self, patterns: list[str], ingress_fd: int | None, egress_fd: int | None,
                 instance: str,
                 netns: str | None = None, rescan_interval: float = 30.0,
                 on_attach: Callable[[str], None] | None = None,
                 on_event: Callable[[], None] | None = None) -> None:
        self.patterns = patterns
        self.fds = {INGRESS: ingress_fd, EGRESS: egress_fd}
        self.instance = instance
        self.netns = netns
        self.rescan_interval = rescan_interval
        self.on_attach = on_attach or (lambda ifname: None)
        self.on_event = on_event or (lambda: None)
        """Called after every rescan (a link or address changed, or the timer)."""
        self.attached: dict[int, str] = {}  # ifindex -> ifname
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _attach(self, ipr: IPRoute, index: int, ifname: str) -> None:
        try:
            ipr.tc("add", "clsact", index=index)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: someone (maybe us, earlier) created it
                raise
        for parent, direction in ((INGRESS, "ingress"), (EGRESS, "egress")):
            fd = self.fds[parent]
            if fd is None:
                continue
            ipr.tc("replace-filter", "bpf", index=index, handle=HANDLE, prio=PRIO,
                   fd=fd, name=f"{NAME_PREFIX}{self.instance}/{direction}",
                   parent=parent, classid=1, direct_action=True)

    def rescan(self) -> list[str]:
        """Attach to matching links not attached yet; forget removed links."""
        new: list[str] = []
        with self._lock, open_ipr(self.netns) as ipr:
            present: dict[int, str] = {}
            for link in ipr.get_links():
                present[link["index"]] = link.get_attr("IFLA_IFNAME")
            for idx in list(self.attached):
                if present.get(idx) != self.attached[idx]:
                    del self.attached[idx]
            for idx, name in sorted(present.items()):
                if idx in self.attached or not matches(name, self.patterns):
                    continue
                try:
                    self._attach(ipr, idx, name)
                except NetlinkError as e:
                    # A link can vanish between listing and attaching (pod deleted).
                    self.errors += 1
                    log.warning("attaching to %s failed: %s", name, e)
                    continue
                self.attached[idx] = name
                new.append(name)
        for name in new:
            if self.fds[INGRESS] is None:
                log.info("holding a clsact qdisc on %s (for a lossless switch to eBPF)", name)
            else:
                log.info("attached tc programs to %s", name)
            self.on_attach(name)
        return new

    def start(self) -> None:
        """Attach now, then keep following link events in a thread."""
        self.rescan()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(ready,),
                                        name="kpr-linkwatch", daemon=True)
        self._thread.start()
        ready.wait(5)
        self.rescan()  # links created between the first scan and the subscription

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def _watch(self, ready: threading.Event) -> None:
        if self.netns:
            setns_thread(self.netns)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            ready.set()
            last = time.monotonic()
            while not self._stop.is_set():
                r, _, _ = select.select([sock], [], [], 0.5)
                if r:
                    try:
                        while sock.recv(65536, socket.MSG_DONTWAIT):
                            pass
                    except BlockingIOError:
                        pass
                    except OSError as e:  # ENOBUFS: events lost, rescan covers them
                        log.debug("link events: %s", e)
                if r or time.monotonic() - last >= self.rescan_interval:
                    last = time.monotonic()
                    self.rescan()
                    self.on_event()
        except Exception:  # never let the watcher die silently
            log.exception("link watcher failed; relying on periodic rescans")
        finally:
            sock.close()
            ready.set()

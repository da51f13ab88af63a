"""Network namespaces by name (``ip netns`` files under /run/netns), for every
datapath, the node watcher, the testbed and the tests.

``setns(CLONE_NEWNET)`` moves only the calling thread, so work in another namespace
runs in a thread of its own (``in_netns``) and the rest of the process stays put.
"""

from __future__ import annotations

import ctypes as ct
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from pyroute2 import IPRoute

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


@contextmanager
def open_ipr(netns: str | None) -> Iterator[IPRoute]:
    """An rtnetlink socket in the named namespace (None: the process's own)."""
    sock = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield sock
    finally:
        sock.close()


def setns_thread(netns: str) -> None:
    """Move the calling thread (only) into a named network namespace."""
    libc = ct.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ct.get_errno()
            raise OSError(e, f"setns({netns}): {os.strerror(e)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Run ``fn(*args)`` in a fresh thread inside namespace ``ns``; return its result."""
    fut: Future[T] = Future()

    def target() -> None:
        try:
            setns_thread(ns)
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    threading.Thread(target=target, daemon=True).start()
    return fut.result(timeout)

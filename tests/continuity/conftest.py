"""Fixtures of the continuity suite: a node with three backends behind one Service,
long-lived connections and new ones, and kpr run as the DaemonSet runs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.testbed import Testbed, probe, service_obj, slice_obj, wait_until, write_objects
from tests.conftest import TEST_PIN_ROOT
from tests.continuity.harness import Kpr

VIP = "10.96.0.10"
BACKENDS = ("a", "b", "c")
PORTS = [("http", 80, "TCP"), ("dns", 80, "UDP")]
"""The Service: TCP and UDP on port 80."""
TARGETS = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]


@pytest.fixture
def kpr(testbed: Testbed, tmp_path: Path) -> Iterator[Kpr]:
    tb = testbed
    for n in BACKENDS:
        tb.add_pod(n)
        tb.serve(n, 8080)
    tb.add_pod("client")
    manifest = tmp_path / "svc.yaml"
    write_objects(str(manifest), [
        service_obj("web", VIP, PORTS),
        slice_obj("web", [tb.pods[n].ip for n in BACKENDS], TARGETS)])
    k = Kpr(tb, manifest, f"ct-{tb.prefix}", TEST_PIN_ROOT, tmp_path / "kpr.log")
    try:
        yield k
    finally:
        k.reap()
        k.cleanup()


def serving(k: Kpr) -> bool:
    return isinstance(probe(k.tb.pods["client"].ns, VIP, 80, timeout=0.5), tuple)


def wait_serving(k: Kpr) -> None:
    wait_until(lambda: serving(k), timeout=60)

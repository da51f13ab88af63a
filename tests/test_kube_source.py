"""The kube source against the fake API server, through the official client.

Protocol behaviour: paged lists, watch events, bookmarks, 410 Gone relists that
drop nothing, dropped connections, error answers and a server restart, invalid
objects, the Node's zone, Events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.fakeapi import FakeApiServer
from controller.objects import ObjectKey
from controller.sources.kube import KubeSource, api_client
from controller.testbed import service_obj, slice_obj, wait_until
from controller.tracker import ChangeTracker
from controller.translate import NodeInfo

PORTS = [("http", 80, "TCP")]
TPORTS = [("http", 8080, "TCP")]


class Recorder:
    """SourceObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.relists: list[tuple[str, str]] = []
        self.invalid: list[str] = []

    def source_error(self, resource: str, reason: str) -> None:
        self.errors.append((resource, reason))

    def relist(self, resource: str, reason: str) -> None:
        self.relists.append((resource, reason))

    def invalid_object(self, kind: str) -> None:
        self.invalid.append(kind)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.2).start()
    try:
        yield srv
    finally:
        srv.stop()


class Harness:
    def __init__(self, api: FakeApiServer, tmp: Path, node: str = "node-1",
                 **kw: Any) -> None:
        cfg = tmp / "kubeconfig"
        cfg.write_text(yaml.safe_dump(api.kubeconfig()))
        self.tracker = ChangeTracker(NodeInfo(name=node))
        self.obs = Recorder()
        self.nodes: list[Any] = []
        self.stop = threading.Event()

        def on_node(n: Any) -> None:
            self.nodes.append(n)
            if n is not None:
                self.tracker.set_node(NodeInfo(name=node, zone=n.zone))

        self.source = KubeSource(api_client(str(cfg)), self.tracker, node, on_node=on_node,
                                 observer=self.obs, **kw)
        self.source.start(self.stop)
        assert self.source.wait_synced(self.stop, timeout=10)

    def close(self) -> None:
        self.stop.set()
        self.source.interrupt()

    def frontends(self) -> dict[str, list[str]]:
        self.tracker.apply()
        return {str(f.ip): [str(b) for b in e.backends] for f, e in self.tracker.state().items()}


@pytest.fixture
def harness(api: FakeApiServer, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        h = Harness(api, tmp_path, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def web(i: int, *eps: str) -> list[dict[str, Any]]:
    return [service_obj(f"web{i}", f"10.96.0.{i}", PORTS),
            slice_obj(f"web{i}", list(eps), TPORTS)]


def test_paged_list_then_watch(api: FakeApiServer, harness: Callable[..., Harness]) -> None:
    for i in range(1, 6):
        api.apply_many(web(i, f"10.244.0.{i}"))
    h = harness(page_size=2)
    assert len(h.frontends()) == 5
    pages = [r for r in api.requests if r.startswith("GET /api/v1/services?") and "limit=2" in r]
    assert len(pages) == 3 and sum("continue=" in r for r in pages) == 2
    api.apply(slice_obj("web1", ["10.244.0.1", "10.244.0.9"], TPORTS))
    wait_until(lambda: len(h.frontends().get("10.96.0.1", [])) == 2, timeout=10)
    api.delete("Service", "web2")
    wait_until(lambda: "10.96.0.2" not in h.frontends(), timeout=10)


def test_bookmarks_advance_a_quiet_watch(api: FakeApiServer,
                                         harness: Callable[..., Harness]) -> None:
    api.apply_many(web(1, "10.244.0.1"))
    h = harness()
    services = h.source.reflectors[0]
    before = int(services.resource_version or 0)
    for i in range(5):  # changes to another resource only
        api.apply({"kind": "Node", "apiVersion": "v1", "metadata": {"name": f"other-{i}"}})
    wait_until(lambda: int(services.resource_version or 0) >= api.resource_version,
               timeout=10)
    assert int(services.resource_version or 0) > before
    assert any("allowWatchBookmarks=true" in r for r in api.requests)


def test_gone_relists_and_drops_nothing_programmed(api: FakeApiServer,
                                                   harness: Callable[..., Harness]) -> None:
    for i in range(1, 4):
        api.apply_many(web(i, f"10.244.0.{i}"))
    h = harness()
    assert len(h.frontends()) == 3
    # While the API server is down, objects change and history is compacted: the
    # reconnecting watches get 410 Gone.
    port = api.port
    api.stop()
    api.delete("Service", "web3")
    api.apply(slice_obj("web1", ["10.244.0.7"], TPORTS))
    api.compact()
    api.port = port
    api.start()
    # The relist is counted before it lists: wait for its two changes to arrive too
    # (web3's deletion, web1's new slice).
    wait_until(lambda: ("services", "gone") in h.obs.relists
               and ("endpointslices", "gone") in h.obs.relists
               and h.tracker.pending() == (1, 1), timeout=10)
    applied = h.tracker.apply()
    # Exactly what changed, nothing else: web2 was never removed and re-added.
    assert sorted(str(f.ip) for f in applied.diff.removed) == ["10.96.0.3"]
    assert [str(e.frontend.ip) for e in applied.diff.upserted] == ["10.96.0.1"]
    assert h.frontends()["10.96.0.1"] == ["10.244.0.7:8080"]


def test_errors_are_counted_and_retried(api: FakeApiServer, tmp_path: Path,
                                        harness: Callable[..., Harness]) -> None:
    api.apply_many(web(1, "10.244.0.1"))
    api.fail_next("/api/v1/services", 500, count=2)
    h = harness()
    assert h.obs.errors.count(("services", "error")) == 2
    # The API server goes away: nothing programmed is lost, and when it is back
    # on the same port, the watches resume and a change made meanwhile arrives.
    port = api.port
    api.stop()
    time.sleep(0.5)
    assert h.frontends() == {"10.96.0.1": ["10.244.0.1:8080"]}
    api.apply(slice_obj("web1", ["10.244.0.2"], TPORTS))
    api.port = port
    api.start()
    wait_until(lambda: h.frontends().get("10.96.0.1") == ["10.244.0.2:8080"], timeout=20)
    assert any(reason == "connection" for _, reason in h.obs.errors)


def test_invalid_object_keeps_its_last_valid_version(api: FakeApiServer,
                                                     harness: Callable[..., Harness]) -> None:
    api.apply_many(web(1, "10.244.0.1"))
    h = harness()
    bad = service_obj("web1", "10.96.0.1", [("http", 0, "TCP")])
    api.apply(bad)
    api.apply_many(web(2, "10.244.0.2"))
    wait_until(lambda: "10.96.0.2" in h.frontends(), timeout=10)
    assert h.frontends()["10.96.0.1"] == ["10.244.0.1:8080"]
    assert h.obs.invalid == ["Service"]
    # an invalid object in a relist does not delete the last good version either
    api.compact()
    api.drop_watches()
    wait_until(lambda: ("services", "gone") in h.obs.relists, timeout=10)
    assert h.frontends()["10.96.0.1"] == ["10.244.0.1:8080"]


def test_node_zone_feeds_topology_hints(api: FakeApiServer,
                                        harness: Callable[..., Harness]) -> None:
    sl = slice_obj("web1", ["10.244.0.1", "10.244.0.2"], TPORTS)
    sl["endpoints"][0]["hints"] = {"forZones": [{"name": "zone-a"}]}
    sl["endpoints"][1]["hints"] = {"forZones": [{"name": "zone-b"}]}
    api.apply_many([service_obj("web1", "10.96.0.1", PORTS), sl])
    api.apply({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-1"}})
    h = harness()
    assert len(h.frontends()["10.96.0.1"]) == 2  # no zone label: no topology
    api.apply({"kind": "Node", "apiVersion": "v1", "metadata": {
        "name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-b"}}})
    wait_until(lambda: h.frontends()["10.96.0.1"] == ["10.244.0.2:8080"], timeout=10)
    # the field selector keeps other nodes out
    assert all("fieldSelector=metadata.name%3Dnode-1" in r
               for r in api.requests if r.startswith("GET /api/v1/nodes"))


def test_start_event_is_posted(api: FakeApiServer, harness: Callable[..., Harness]) -> None:
    h = harness()
    h.source.post_event("Starting", "Starting kpr.")
    [ev] = api.events
    assert ev["reason"] == "Starting" and ev["involvedObject"]["kind"] == "Node"
    assert ev["involvedObject"]["name"] == "node-1"


def test_relist_by_resync_period(api: FakeApiServer, harness: Callable[..., Harness]) -> None:
    api.apply_many(web(1, "10.244.0.1"))
    h = harness(resync_period=0.5)
    wait_until(lambda: ("services", "resync") in h.obs.relists, timeout=10)
    assert h.frontends() == {"10.96.0.1": ["10.244.0.1:8080"]}


def test_one_watch_event_is_one_service_of_work(api: FakeApiServer,
                                                harness: Callable[..., Harness]) -> None:
    """Tracker work per change is proportional to the changed Service (the 50,000
    version on real maps is in test_scale.py)."""
    api.apply_many([o for i in range(1, 201) for o in web(i, f"10.244.0.{i % 250}")])
    h = harness()
    h.tracker.apply()
    work = h.tracker.counters.work
    api.apply(slice_obj("web7", ["10.244.1.7"], TPORTS))
    wait_until(lambda: h.tracker.pending() == (0, 1), timeout=10)
    a = h.tracker.apply()
    assert h.tracker.counters.work - work == 2  # one Service translated, one entry compared
    assert [str(e.frontend) for e in a.diff.upserted] == ["10.96.0.7:80/TCP"]
    assert ObjectKey("default", "web7") in h.tracker.known()[0]


def test_master_flag_without_kubeconfig(api: FakeApiServer) -> None:
    """--master alone is enough (no kubeconfig, not in a cluster)."""
    api.apply_many(web(1, "10.244.0.1"))
    t = ChangeTracker()
    stop = threading.Event()
    src = KubeSource(api_client(master=api.url), t, "")
    src.start(stop)
    try:
        assert src.wait_synced(stop, timeout=10) and t.counts() == (1, 1)
    finally:
        stop.set()
        src.interrupt()

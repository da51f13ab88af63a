"""Unit tests of the pure logic: model and diff, object validation, translation,
change tracking, the file source, the bounded-frequency runner, header resolution."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller import kernel
from controller.model import Backend, BackendFlag, Diff, Frontend, Protocol, ServiceEntry, State
from controller.objects import ObjectError, ObjectKey, parse_service, parse_slice
from controller.sources.file import FileSource, load
from controller.sync import BoundedFrequencyRunner
from controller.testbed import service_obj, slice_obj, write_objects
from controller.tracker import ChangeTracker
from controller.translate import NodeInfo, translate_service

IP = ipaddress.ip_address


def fe(ip: str = "10.96.0.1", port: int = 80, proto: Protocol = Protocol.TCP) -> Frontend:
    return Frontend(IP(ip), port, proto)


def be(ip: str, port: int = 8080) -> Backend:
    return Backend(IP(ip), port)


# ----- model ---------------------------------------------------------------------------

def test_entries_are_canonical_whatever_the_order() -> None:
    a = ServiceEntry.make(fe(), [be("10.0.0.2"), be("10.0.0.1"), be("10.0.0.2")])
    b = ServiceEntry.make(fe(), [be("10.0.0.1"), be("10.0.0.2")])
    assert a == b and a.backends == (be("10.0.0.1"), be("10.0.0.2"))
    assert State([a]) == State([b])


def test_diff_between_and_apply() -> None:
    old = State([ServiceEntry.make(fe(port=80), [be("10.0.0.1")]),
                 ServiceEntry.make(fe(port=81), [be("10.0.0.1")]),
                 ServiceEntry.make(fe(port=82), [])])
    new = State([ServiceEntry.make(fe(port=80), [be("10.0.0.1")]),
                 ServiceEntry.make(fe(port=81), [be("10.0.0.2")]),
                 ServiceEntry.make(fe(port=83), [be("10.0.0.3")])])
    d = Diff.between(old, new)
    assert [e.frontend.port for e in d.upserted] == [81, 83]
    assert [f.port for f in d.removed] == [82]
    assert d.apply(old) == new
    assert not Diff.between(new, new)
    # restricted to some frontends, it ignores the others
    assert Diff.between(old, new, only=[fe(port=82)]) == Diff((), (fe(port=82),))


# ----- objects ---------------------------------------------------------------------------

def test_service_parses_like_kubectl_prints_it() -> None:
    s = parse_service(service_obj("web", "10.96.0.10", [("http", 80, "TCP"), ("dns", 53, "UDP")]))
    assert s.key == ObjectKey("default", "web")
    assert s.cluster_ips == (IP("10.96.0.10"),)
    assert [(p.name, p.port, p.protocol) for p in s.ports] == [
        ("http", 80, Protocol.TCP), ("dns", 53, Protocol.UDP)]


@pytest.mark.parametrize("mutate,message", [
    (lambda o: o["spec"]["ports"][0].update(port="http"),
     "Service default/web: spec.ports[0].port: must be an integer 1-65535, got 'http'"),
    (lambda o: o["spec"]["ports"][0].update(protocol="ICMP"),
     "Service default/web: spec.ports[0].protocol: must be TCP, UDP or SCTP, got 'ICMP'"),
    (lambda o: o["spec"].update(clusterIPs=["10.96.0.300"]),
     "Service default/web: spec.clusterIPs[0]: must be an IP address, got '10.96.0.300'"),
    (lambda o: o["spec"].update(type="Weird"),
     "Service default/web: spec.type: must be ClusterIP, NodePort, LoadBalancer or "
     "ExternalName, got 'Weird'"),
    (lambda o: o["metadata"].pop("name"), "Service default/<no name>: metadata.name: is required"),
    (lambda o: o.update(spec=[]), "Service default/web: spec: must be an object, got []"),
])
def test_invalid_service_names_object_and_field(mutate: Any, message: str) -> None:
    obj = service_obj("web", "10.96.0.10", [("http", 80, "TCP")])
    mutate(obj)
    with pytest.raises(ObjectError) as ei:
        parse_service(obj)
    assert str(ei.value) == message


@pytest.mark.parametrize("mutate,message", [
    (lambda o: o["metadata"]["labels"].clear(),
     "EndpointSlice default/web-abcde: metadata.labels[kubernetes.io/service-name]: is required"),
    (lambda o: o["endpoints"][0].update(addresses=["fd00::1"]),
     "EndpointSlice default/web-abcde: endpoints[0].addresses[0]: fd00::1 is not an IPv4 address"),
    (lambda o: o["endpoints"][0]["conditions"].update(ready="yes"),
     "EndpointSlice default/web-abcde: endpoints[0].conditions.ready: must be true or false, "
     "got 'yes'"),
    (lambda o: o["ports"][0].update(port=0),
     "EndpointSlice default/web-abcde: ports[0].port: must be an integer 1-65535, got 0"),
])
def test_invalid_slice_names_object_and_field(mutate: Any, message: str) -> None:
    obj = slice_obj("web", ["10.0.0.1"], [("http", 8080, "TCP")])
    mutate(obj)
    with pytest.raises(ObjectError) as ei:
        parse_slice(obj)
    assert str(ei.value) == message


# ----- translation -------------------------------------------------------------------------

PORTS = [("http", 80, "TCP")]
TPORTS = [("http", 8080, "TCP")]


def translate(svc: dict[str, Any], *slices: dict[str, Any], node: str = "") -> list[ServiceEntry]:
    return list(translate_service(parse_service(svc), [parse_slice(s) for s in slices],
                                  NodeInfo(name=node)))


def cond(ready: bool, serving: bool, terminating: bool) -> dict[str, bool]:
    return {"ready": ready, "serving": serving, "terminating": terminating}


@pytest.mark.parametrize("endpoints,expect", [
    # kube-proxy CategorizeEndpoints, cluster policy: ready endpoints when any exist ...
    ([("10.0.0.1", cond(True, True, False)), ("10.0.0.2", cond(False, True, True))],
     ["10.0.0.1"]),
    # ... else serving+terminating ones (graceful fallback) ...
    ([("10.0.0.1", cond(False, True, True)), ("10.0.0.2", cond(False, False, True))],
     ["10.0.0.1"]),
    # ... never not-ready, not-terminating ones.
    ([("10.0.0.1", cond(False, False, False))], []),
    # unset conditions mean ready
    ([("10.0.0.1", {})], ["10.0.0.1"]),
])
def test_endpoint_categorization(endpoints: list[Any], expect: list[str]) -> None:
    [e] = translate(service_obj("web", "10.96.0.10", PORTS), slice_obj("web", endpoints, TPORTS))
    assert [str(b.ip) for b in e.backends] == expect


def test_ports_match_by_name_and_protocol_and_slices_merge() -> None:
    svc = service_obj("web", "10.96.0.10", [("http", 80, "TCP"), ("dns", 53, "UDP")])
    s1 = slice_obj("web", ["10.0.0.1"], [("http", 8080, "TCP"), ("dns", 5353, "UDP")], name="s1")
    s2 = slice_obj("web", ["10.0.0.2"], [("http", 8081, "TCP")], name="s2")
    entries = {e.frontend.port: e for e in translate(svc, s1, s2)}
    assert entries[80].backends == (be("10.0.0.1", 8080), be("10.0.0.2", 8081))
    assert entries[53].backends == (be("10.0.0.1", 5353),)
    assert entries[80].name == "default/web:http"


def test_local_and_terminating_flags() -> None:
    sl = slice_obj("web", [("10.0.0.1", cond(False, True, True))], TPORTS)
    sl["endpoints"][0]["nodeName"] = "n1"
    [e] = translate(service_obj("web", "10.96.0.10", PORTS), sl, node="n1")
    assert e.backends[0].flags == BackendFlag.LOCAL | BackendFlag.TERMINATING


@pytest.mark.parametrize("change", [
    lambda o: o["spec"].update(clusterIP="None", clusterIPs=["None"]),  # headless
    lambda o: o["spec"].update(type="ExternalName", externalName="x.example"),
    lambda o: o["metadata"].update(labels={"service.kubernetes.io/service-proxy-name": "other"}),
])
def test_services_kube_proxy_does_not_proxy(change: Any) -> None:
    svc = service_obj("web", "10.96.0.10", PORTS)
    change(svc)
    assert translate(svc, slice_obj("web", ["10.0.0.1"], TPORTS)) == []


# ----- tracker ---------------------------------------------------------------------------

def test_tracker_drops_noop_changes_and_reports_changed_frontends() -> None:
    t = ChangeTracker()
    svc = parse_service(service_obj("web", "10.96.0.10", PORTS))
    sl = parse_slice(slice_obj("web", ["10.0.0.1"], TPORTS))
    t.update_service(svc.key, svc)
    t.update_slice(sl.key, sl)
    a = t.apply()
    assert [e.frontend for e in a.diff.upserted] == [fe("10.96.0.10")]
    assert len(t.state()) == 1
    # the same objects again: not even pending
    assert not t.update_service(svc.key, svc)
    assert t.pending() == (0, 0)
    # a change and its undo before the sync: (previous, current) cancels out
    other = parse_service(service_obj("web", "10.96.0.99", PORTS))
    assert t.update_service(svc.key, other) and t.pending() == (1, 0)
    assert t.update_service(svc.key, svc) and t.pending() == (0, 0)
    # a change that translates to the same entries is dropped at apply
    sl2 = parse_slice(slice_obj("web", ["10.0.0.1", ("10.0.0.9", cond(False, False, False))],
                                TPORTS))
    assert t.update_slice(sl2.key, sl2)
    a2 = t.apply()
    assert not a2.diff and a2.services_changed == 0
    t.update_service(svc.key, None)
    a3 = t.apply()
    assert a3.diff.removed == (fe("10.96.0.10"),) and len(t.state()) == 0


def test_tracker_two_services_on_one_frontend_and_two_slices_per_service() -> None:
    """Files can give two Services one ClusterIP: the lexically first owns the
    frontend, and the other takes over when it goes. A Service's slices merge, and
    losing one slice drops only its endpoints."""
    t = ChangeTracker()
    b = parse_service(service_obj("b", "10.96.0.10", PORTS))
    a = parse_service(service_obj("a", "10.96.0.10", PORTS))
    for svc in (b, a):
        t.update_service(svc.key, svc)
    slices = [parse_slice(slice_obj(n, [ip], TPORTS, name=f"{n}-{i}"))
              for n, i, ip in (("a", 1, "10.0.0.1"), ("a", 2, "10.0.0.2"), ("b", 1, "10.0.0.3"))]
    for sl in slices:
        t.update_slice(sl.key, sl)
    t.apply()
    owner = t.state()[fe("10.96.0.10")]
    assert owner.name.startswith("default/a") and len(owner.backends) == 2
    t.update_slice(slices[1].key, None)
    t.apply()
    assert [str(x.ip) for x in t.state()[fe("10.96.0.10")].backends] == ["10.0.0.1"]
    t.update_service(a.key, None)
    d = t.apply().diff
    assert [e.name.split(":")[0] for e in d.upserted] == ["default/b"]
    assert [str(x.ip) for x in t.state()[fe("10.96.0.10")].backends] == ["10.0.0.3"]
    t.update_service(b.key, None)
    assert t.apply().diff.removed == (fe("10.96.0.10"),) and len(t.state()) == 0


# ----- file source -------------------------------------------------------------------------

def test_file_source_reads_lists_multidoc_json_and_directories(tmp_path: Path) -> None:
    svc = service_obj("web", "10.96.0.10", PORTS)
    sl = slice_obj("web", ["10.0.0.1"], TPORTS)
    (tmp_path / "list.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                    "items": [svc]}))
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump_all([sl, {"kind": "ConfigMap"}]))
    (tmp_path / "ignored.txt").write_text("not: [yaml")
    snap = load(tmp_path)
    assert list(snap.services) == [ObjectKey("default", "web")]
    assert list(snap.slices) == [ObjectKey("default", "web-abcde")]
    # a typed list (items without kind), as the API server returns it
    typed = {"kind": "ServiceList", "items": [{k: v for k, v in svc.items() if k != "kind"}]}
    (tmp_path / "list.json").write_text(json.dumps(typed))
    assert list(load(tmp_path).services) == [ObjectKey("default", "web")]


def test_file_source_rereads_on_atomic_rename_and_keeps_good_state(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    good = [service_obj("web", "10.96.0.10", PORTS), slice_obj("web", ["10.0.0.1"], TPORTS)]
    write_objects(str(path), good)
    t = ChangeTracker()
    errors: list[str] = []
    src = FileSource(path, t, on_error=errors.append)
    assert src.poll() and t.apply() and len(t.state()) == 1
    assert not src.poll()  # unchanged

    # Atomic rename of a new version: seen. The bad Service keeps its last good version,
    # the other objects are applied.
    bad = service_obj("web", "10.96.0.10", [("http", 99999, "TCP")])
    write_objects(str(path), [bad, slice_obj("web", ["10.0.0.2"], TPORTS),
                              service_obj("other", "10.96.0.11", PORTS)])
    assert src.poll()
    t.apply()
    st = t.state()
    assert {str(f.ip) for f in st} == {"10.96.0.10", "10.96.0.11"}
    assert st[fe("10.96.0.10")].backends == (be("10.0.0.2"),)
    assert any("Service default/web: spec.ports[0].port" in e for e in errors)

    # A file that does not parse changes nothing (written in place: read on the
    # second poll that sees it unchanged).
    path.write_text("kind: Service\n  bad: [indent")
    assert not src.poll() and not any("cannot read source" in e for e in errors)
    assert not src.poll()
    assert t.pending() == (0, 0)
    assert any("cannot read source" in e for e in errors)


def test_file_source_never_reads_a_file_half_written_in_place(tmp_path: Path) -> None:
    """An in-place writer truncates, then writes: a poll in between sees an empty
    file, which must not remove every Service."""
    path = tmp_path / "svc.yaml"
    good = [service_obj("web", "10.96.0.10", PORTS), slice_obj("web", ["10.0.0.1"], TPORTS)]
    write_objects(str(path), good)
    t = ChangeTracker()
    src = FileSource(path, t)
    assert src.poll() and t.apply() and len(t.state()) == 1
    text = path.read_text()
    with open(path, "w") as f:  # truncated; the poll comes before the write
        f.flush()
        assert not src.poll()
        f.write(text.replace("10.0.0.1", "10.0.0.2"))
    assert not src.poll()  # changed since the last poll: not yet
    assert t.pending() == (0, 0) and len(t.state()) == 1
    assert src.poll() and t.apply()  # held for one interval: read
    assert t.state()[fe("10.96.0.10")].backends == (be("10.0.0.2"),)
    # a new file in a directory source waits too; a rename over one does not
    d = tmp_path / "dir"
    d.mkdir()
    write_objects(str(d / "a.yaml"), good)
    t2 = ChangeTracker()
    src2 = FileSource(d, t2)
    assert src2.poll() and t2.apply()
    write_objects(str(d / "a.yaml"), [good[0], slice_obj("web", ["10.0.0.3"], TPORTS)])
    assert src2.poll()  # replaced whole: at once
    write_objects(str(d / "b.yaml"), [service_obj("b", "10.96.0.12", PORTS)])
    assert not src2.poll() and src2.poll()


# ----- bounded frequency runner -----------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_runner_coalesces_rate_limits_and_backs_off() -> None:
    clock = FakeClock()
    results = [True]
    calls: list[float] = []

    def fn() -> bool:
        calls.append(clock.now)
        return results[-1]

    r = BoundedFrequencyRunner(fn, min_interval=1.0, max_interval=30.0, retry_interval=2.0,
                               clock=clock)
    assert r.next_run(clock.now) <= clock.now  # first run immediately
    r.run_once()
    for _ in range(5):
        r.request()  # a burst coalesces into one run ...
    assert r.next_run(clock.now) == 101.0  # ... no sooner than min_interval
    clock.now = 101.0
    r.run_once()
    assert r.next_run(clock.now) == 131.0  # idle: the periodic run at max_interval
    results.append(False)
    clock.now = 131.0
    r.run_once()
    assert r.next_run(clock.now) == 133.0  # failure: retry after 2 s ...
    clock.now = 133.0
    r.run_once()
    assert r.next_run(clock.now) == 137.0  # ... then 4 s
    results.append(True)
    clock.now = 137.0
    r.run_once()
    assert r.next_run(clock.now) == 167.0
    assert calls == [100.0, 101.0, 131.0, 133.0, 137.0]


# ----- kernel headers ---------------------------------------------------------------------

def test_header_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setattr(kernel, "_package_headers", lambda: None)
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: False if "kheaders" in str(p)
                        else real_exists(p))
    monkeypatch.setattr(Path, "is_dir", lambda p: False)
    with pytest.raises(kernel.KernelHeadersError) as ei:
        kernel.resolve_headers(tmp_path)
    assert "apt-get install linux-headers-amd64" in str(ei.value)


@pytest.mark.kernel
def test_headers_resolve_on_this_machine_without_touching_lib_modules() -> None:
    release = os.uname().release
    existed = os.path.exists(f"/lib/modules/{release}")
    h = kernel.resolve_headers()
    assert (h.path / "include" / "uapi" / "linux" / "bpf.h").exists() or \
        (h.path / "include" / "linux").is_dir()
    assert os.path.exists(f"/lib/modules/{release}") == existed


# ----- proxier: full vs partial syncs -----------------------------------------------------

class _RecordingDatapath:
    """Records what it is asked to do; fails when told to (a unit-test fake)."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = False

    def sync(self, state: State, diff: Diff | None) -> Any:
        from controller.datapaths.base import DatapathError, SyncResult

        if self.fail:
            raise DatapathError("map full")
        self.calls.append(("full", len(state)) if diff is None else ("partial", len(diff)))
        return SyncResult(full=diff is None, ops=1, frontends=len(state))


class _Observer:
    def __init__(self) -> None:
        self.synced_calls: list[tuple[bool, tuple[float, ...]]] = []
        self.failures = 0

    def synced(self, full: bool, duration: float, result: Any,
               trigger_times: tuple[float, ...]) -> None:
        self.synced_calls.append((full, trigger_times))

    def failed(self, error: Exception) -> None:
        self.failures += 1


def test_proxier_full_then_partial_full_after_failure_and_periodically() -> None:
    from controller.sync import Proxier

    now = [1000.0]
    t = ChangeTracker(clock=lambda: 0.0)
    dp = _RecordingDatapath()
    obs = _Observer()
    p = Proxier(dp, t, full_sync_interval=3600, clock=lambda: now[0],  # type: ignore[arg-type]
                observer=obs)

    def add(i: int, *eps: str) -> None:
        s = parse_service(service_obj(f"s{i}", f"10.96.0.{i}", PORTS))
        sl = slice_obj(f"s{i}", list(eps), TPORTS)
        sl["metadata"]["annotations"] = {
            "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-21T10:00:00Z"}
        t.update_service(s.key, s)
        t.update_slice(parse_slice(sl).key, parse_slice(sl))

    add(1, "10.0.0.1")
    assert p.sync() and dp.calls == [("full", 1)]           # the first sync is full
    add(2, "10.0.0.2")
    assert p.sync() and dp.calls[-1] == ("partial", 1)      # then partial: the diff only
    assert obs.synced_calls[-1][1]  # trigger times reach the observer (for the metric)
    assert p.sync() and len(dp.calls) == 2                  # nothing changed: no call
    dp.fail = True
    add(3, "10.0.0.3")
    assert not p.sync() and obs.failures == 1
    dp.fail = False
    assert p.sync() and dp.calls[-1] == ("full", 3)         # after a failure: full
    now[0] += 3600
    assert p.sync() and dp.calls[-1] == ("full", 3)         # and every full_sync_interval
    assert [full for full, _ in obs.synced_calls] == [True, False, False, True, True]


def test_maglev_table_is_even_stable_and_order_independent() -> None:
    from controller.datapaths.ebpf.maps import maglev_table

    m = 4093
    for n in (3, 10, 40):
        names = [f"10.244.{i // 250}.{i % 250}:8080" for i in range(n)]
        table = maglev_table(names, m)
        counts = [table.count(i) for i in range(n)]
        assert max(counts) - min(counts) <= 1 + m // 500  # shares within ~0.2% of 1/n
        # the same backends in another order give the same placement (every node agrees)
        rev = maglev_table(names[::-1], m)
        assert [names[i] for i in table] == [names[::-1][i] for i in rev]
        # removing one backend moves its own entries and at most 1/n of the others
        gone = n // 2
        rest = names[:gone] + names[gone + 1:]
        after = [rest[i] for i in maglev_table(rest, m)]
        before = [names[i] for i in table]
        survivors = [i for i in range(m) if before[i] != names[gone]]
        moved = sum(before[i] != after[i] for i in survivors) / len(survivors)
        assert moved <= 1 / n


def test_ids_grow_skip_zero_and_after_a_wrap_skip_ids_in_use() -> None:
    from controller.datapaths.ebpf.maps import _Ids

    in_use = {1, 3}
    ids = _Ids(lambda: in_use)
    ids.start_above(0xFFFFFFFD)
    # no set of ids in use before the wrap: the counter is above every one
    assert [ids.take() for _ in range(2)] == [0xFFFFFFFE, 0xFFFFFFFF]
    in_use |= {0xFFFFFFFE}  # 0xFFFFFFFF was released
    # at the wrap: 0 is never an id, and 1 and 3 are taken
    assert [ids.take() for _ in range(3)] == [2, 4, 5]
    ids.start_above(7)  # a restart read the maps back: ids above 7 are free
    assert ids.take() == 8


def test_backend_ids_fresh_first_then_the_longest_free_each_with_a_newer_generation() -> None:
    from controller.datapaths.ebpf.maps import MapOpError, _BackendIds

    ids = _BackendIds(capacity=5)  # ids 1..4: index 0 is never an id
    taken = [ids.take() for _ in range(3)]
    assert [i for i, _ in taken] == [1, 2, 3]
    assert [g for _, g in taken] == [1, 2, 3]
    ids.give([2, 1])  # released in this order (after the plan freeing them applied)
    # a fresh id before a released one; then the released, oldest first
    assert [ids.take() for _ in range(3)] == [(4, 4), (2, 5), (1, 6)]
    with pytest.raises(MapOpError, match="backends.*map full"):
        ids.take()
    # read back after a restart: 2 and 3 live, the array's newest generation 9
    ids.reset(3, [1], 9)
    assert [ids.take() for _ in range(2)] == [(4, 10), (1, 11)]


@pytest.mark.parametrize("classic_rules", [True, False])
def test_takeover_waits_for_netfilter_only_while_classic_rules_exist(classic_rules: bool) -> None:
    """A switch from a classic datapath puts the services in SYN_ONLY (netfilter may
    still open flows); a first start must not, or its first datagrams go to rules
    that do not exist and are lost."""
    import struct

    from controller.datapaths.ebpf import handover
    from controller.datapaths.ebpf.maps import Plan

    value = struct.pack("=IHH", 7, 2, 0x1) + bytes(8)
    plan = Plan(svc_write={b"k": value})
    t = handover.Takeover(250, guard=classic_rules)
    assert t.seed(None, frozenset(), None, plan, flows=[]) == 0  # type: ignore[arg-type]
    flags = struct.unpack_from("=H", plan.svc_write[b"k"], handover._SVC_FLAGS)[0]
    assert bool(flags & handover.SVC_F_SYN_ONLY) == classic_rules
    assert flags & ~handover.SVC_F_SYN_ONLY == 0x1


def test_ipvs_connections_are_read_from_its_table() -> None:
    """/proc/net/ip_vs_conn lines (ip_vs_conn_seq_show's formats): the live TCP and
    UDP connections, ports in hex, IPv4 as hex, IPv6 as text; ended ones skipped."""
    import ipaddress

    from controller.nfct import _ipvs_conn

    ip = ipaddress.ip_address
    f = _ipvs_conn("TCP 0AF40002 C350 0A60000A 0050 0AF40003 1F90 ESTABLISHED     899")
    assert f is not None and (f.client, f.cport, f.frontend, f.fport, f.backend, f.bport) == (
        ip("10.244.0.2"), 50000, ip("10.96.0.10"), 80, ip("10.244.0.3"), 8080)
    assert not f.closing and f.snat is None
    g = _ipvs_conn("TCP fd00:0244:0000:0000:0000:0000:0000:0002 C351 "
                   "fd00:0096:0000:0000:0000:0000:0000:000a 0050 "
                   "fd00:0244:0000:0000:0000:0000:0000:0003 1F90 CLOSE_WAIT       59")
    assert g is not None and g.client == ip("fd00:244::2") and g.closing
    u = _ipvs_conn("UDP 0AF40002 C352 0A60000A 0035 0AF40003 14E9 UDP             299")
    assert u is not None and u.proto == 17 and u.bport == 5353
    assert _ipvs_conn("TCP 0AF40002 C353 0A60000A 0050 0AF40003 1F90 TIME_WAIT       119") is None
    assert _ipvs_conn("Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires") is None

"""The map writer against real (pinned) BPF maps in the kernel."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datapaths.base import DatapathError
from controller.datapaths.ebpf.datapath import EbpfConfig, EbpfDatapath, cleanup
from controller.datapaths.ebpf import loader, maps
from controller.datapaths.ebpf.loader import MapSizes
from controller.datapaths.ebpf.maps import _PAIR, _U32, SCOPE_EXTERNAL
from controller.model import (
    Backend,
    Diff,
    Frontend,
    Protocol,
    ServiceEntry,
    State,
)
from tests.conftest import TEST_PIN_ROOT, new_datapath
from tests.shapes import rich_entry, states

pytestmark = pytest.mark.kernel


def make_state(spec: dict[int, list[int]]) -> State:
    """{service index: [backend indexes]} -> State of plain ClusterIP entries."""
    return State(ServiceEntry.make(
        Frontend(ipaddress.IPv4Address(0x0A600000 + i), 80 + i % 3,
                 Protocol.UDP if i % 2 else Protocol.TCP),
        [Backend(ipaddress.IPv4Address(0x0AF40000 + b), 8080) for b in bes], f"ns/svc{i}")
        for i, bes in spec.items())


@pytest.fixture(scope="module")
def shared_dp() -> EbpfDatapath:
    d = new_datapath()
    d.load()
    yield d
    d.cleanup()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=6))
def test_incremental_syncs_end_where_one_full_sync_ends(
        shared_dp: EbpfDatapath, seq: list[dict[int, tuple[list[int], int]]]) -> None:
    dp = shared_dp
    prev = State()
    dp.sync(prev, None)
    for spec in seq:
        cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
        dp.sync(cur, Diff.between(prev, cur))
        assert dp.dump() == dp.canonical(cur.values())  # read back from the kernel
        # the metric's running slot count matches the kernel's map
        assert round(dp.map_fill()["backend_slots"] * dp.maps.slots.max_entries) == \
            dp.maps.slots.count()
        # the running frontend count (SyncResult.frontends) matches the shadow's keys
        assert dp.maps.programmed() == sum(1 for _, scope in dp.maps._svc if scope == SCOPE_EXTERNAL)
        prev = cur
    owned = ("services", "names", "slots", "members", "backends", "ranges", "maglev", "vips")
    raw_incremental = {m: sorted(getattr(dp.maps, m).items()) for m in owned}
    r = dp.sync(prev, None)  # a full sync of the final state finds nothing to change
    assert dp.dump() == dp.canonical(prev.values())
    assert {m: sorted(getattr(dp.maps, m).items()) for m in owned} == raw_incremental
    # every slot and member is a live service's; one backend per (address, port, proto)
    want_slots = sum(len(e.backends) + len(e.cluster_backends) for e in prev.values())
    assert dp.maps.slots.count() == want_slots
    assert dp.maps.backends_in_kernel() == len(
        {(b, e.frontend.protocol) for e in prev.values()
         for b in e.backends + e.cluster_backends})
    assert r.ops == 0


def test_one_change_at_scale_costs_work_proportional_to_the_change(shared_dp: EbpfDatapath) -> None:
    dp = shared_dp
    dp.sync(State(), None)  # start from empty maps
    n = 5000
    big = {i: [i * 4 + k for k in range(4)] for i in range(n)}
    full = make_state(big)
    r = dp.sync(full, None)
    # service, name, VIP marker, 4 slots, 4 members, 4 backends each
    assert r.ops == n * (1 + 1 + 1 + 4 + 4 + 4)
    changed = dict(big)
    changed[1234] = big[1234] + [99999]  # one service gains one backend
    new = make_state(changed)
    f1234 = next(iter(make_state({1234: []})))
    r = dp.sync(new, Diff.between(full, new, only=[f1234]))
    assert r.ops == 4  # one backend, one slot, one member, one service count
    assert dp.dump()[f1234].backends == new[f1234].backends
    removed = dict(changed)
    del removed[7]
    gone = make_state(removed)
    r = dp.sync(gone, Diff.between(new, gone))
    assert r.ops == 1 + 1 + 1 + 4 + 4 + 4  # service, name, marker, slots, members, backends
    dp.sync(State(), None)


def test_restart_adopts_pinned_state_reuses_ids_and_prunes_orphans(
        datapath_factory: Callable[..., EbpfDatapath]) -> None:
    dp1 = datapath_factory(start=False)
    dp1.load()
    s1 = make_state({0: [1, 2], 1: [2, 3], 2: [4]})
    dp1.sync(s1, None)
    ids1 = {f: s.svc_id for f, s in dp1.maps._svc.items()}
    be_ids1 = dp1.maps.backend_ids()
    # A new process on the same pins (same instance): it reads the maps back.
    dp2 = datapath_factory(start=False, instance=dp1.cfg.instance)
    dp2.load()
    assert dp2.dump() == dp2.canonical(s1.values())
    s2 = make_state({0: [1, 2], 1: [3]})  # service 2 went away while we were down
    r = dp2.sync(s2, None)
    assert dp2.dump() == dp2.canonical(s2.values())
    # untouched services keep their ids, so established flows keep their slots
    assert {k: s.svc_id for k, s in dp2.maps._svc.items()} == {
        k: i for k, i in ids1.items() if k[0] in s2}
    assert all(be_ids1[k] == v for k, v in dp2.maps.backend_ids().items())
    # svc 1 (UDP): slot 0 rewritten, count lowered, slot 1 and member 2 deleted, backend
    # 2/UDP deleted (backends are per protocol: svc 0 keeps 2/TCP); svc 2: service,
    # name, VIP marker, slot, member, and backend 4/TCP deleted.
    assert r.ops == (4 + 1) + (5 + 1)



def test_a_new_service_never_takes_the_id_of_an_orphan_being_pruned(
        datapath_factory: Callable[..., EbpfDatapath]) -> None:
    """Slots and a member left by a service whose entry is gone (a crash between
    map writes), with an id above every live one: the next full sync prunes them,
    so a new service given that id would lose its own or serve the orphan's."""
    dp1 = datapath_factory(start=False)
    dp1.load()
    dp1.sync(make_state({0: [1]}), None)
    orphan = max(s.svc_id for s in dp1.maps._svc.values()) + 1
    bid = next(iter(dp1.maps.backend_ids().values()))
    dp1.maps.slots.update([(_PAIR.pack(orphan, 0), _U32.pack(bid))])
    dp1.maps.members.update([(_PAIR.pack(orphan, bid), b"\x01")])
    dp2 = datapath_factory(start=False, instance=dp1.cfg.instance)
    dp2.load()
    want = make_state({0: [1], 1: [1, 2]})
    dp2.sync(want, None)
    assert dp2.dump() == dp2.canonical(want.values())
    assert dp2.maps.slots.count() == 3 and dp2.maps.members.count() == 3
    assert orphan not in {s.svc_id for s in dp2.maps._svc.values()}

def test_a_chunked_full_sync_keeps_moving_backends_and_repairs_drift(
        datapath_factory: Callable[..., EbpfDatapath], monkeypatch: pytest.MonkeyPatch) -> None:
    """A full sync plans and applies a chunk of keys at a time (here one key). A
    backend leaving a service in the first chunk for one in the last keeps its id,
    and drift found at adoption (a member lost) is repaired before the chunks."""
    monkeypatch.setattr(maps, "FULL_SYNC_CHUNK", 1)
    dp1 = datapath_factory(start=False)
    dp1.load()
    dp1.sync(make_state({0: [1, 2], 1: [3], 2: [4]}), None)
    bid2 = dp1.maps.backend_ids()[maps.pack_backend(Backend(ipaddress.IPv4Address(0x0AF40002), 8080),
                                               Protocol.TCP)]
    lost = next(s for (f, _), s in dp1.maps._svc.items() if f.port == 82)  # service 2
    dp1.maps.members.delete([_PAIR.pack(lost.svc_id, dp1.maps._id(lost.backends[0]))])
    dp2 = datapath_factory(start=False, instance=dp1.cfg.instance)
    dp2.load()
    # backend 2 leaves service 0 (TCP, first in the State) for service 4 (TCP, last)
    want = make_state({0: [1], 1: [3], 2: [4], 4: [2, 5]})
    r = dp2.sync(want, None)
    assert dp2.dump() == dp2.canonical(want.values())
    assert dp2.maps.backend_ids()[maps.pack_backend(
        Backend(ipaddress.IPv4Address(0x0AF40002), 8080), Protocol.TCP)] == bid2
    assert dp2.maps.members.count() == 5 and dp2.maps.slots.count() == 5
    # repair: 1 member; svc 0: slot, member deleted, count; svc 4: service, name,
    # marker, 2 slots, 2 members, backend 5
    assert r.ops == 1 + 3 + 8
    assert dp2.sync(want, None).ops == 0


def test_map_full_is_an_error_and_forces_a_full_sync(
        datapath_factory: Callable[..., EbpfDatapath]) -> None:
    dp = EbpfDatapath(EbpfConfig(instance="tiny" + datapath_factory(start=False).cfg.instance,
                                 pin_root=TEST_PIN_ROOT,
                                 sizes=MapSizes(services=4, slots=64, backends=64)))
    try:
        dp.load()
        ok = make_state({0: [1], 1: [1]})
        dp.sync(ok, None)
        with pytest.raises(DatapathError, match="map services .*map full"):
            dp.sync(make_state({i: [1] for i in range(8)}), None)
        # what was programmed before still holds, and a full sync recovers
        dp.sync(ok, None)
        assert dp.dump() == dp.canonical(ok.values())
    finally:
        dp.cleanup()


def test_a_full_backends_array_is_an_error_and_forwarding_holds(
        datapath_factory: Callable[..., EbpfDatapath]) -> None:
    """Backend ids run out before the kernel is asked (the array has no room to
    report it): the sync fails naming the map, and what was programmed holds."""
    dp = EbpfDatapath(EbpfConfig(instance="tinybe" + datapath_factory(start=False).cfg.instance,
                                 pin_root=TEST_PIN_ROOT,
                                 sizes=MapSizes(services=16, slots=64, backends=2)))
    try:
        dp.load()
        ok = make_state({0: [1, 2]})
        dp.sync(ok, None)
        with pytest.raises(DatapathError, match="backends.*map full"):
            dp.sync(make_state({0: [1, 2], 1: [3]}), None)
        assert dp.dump() == dp.canonical(ok.values())
        dp.sync(ok, None)  # the full sync after a failure: nothing lost, nothing to do
        assert dp.dump() == dp.canonical(ok.values())
    finally:
        dp.cleanup()


def test_a_compile_error_names_file_and_line_and_leaves_no_staging(tmp_path: Path) -> None:
    """The build child's compiler output reaches the caller; nothing of the failed
    load stays in the pin directory."""
    bad = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, bad)
    lb = bad / "kpr_lb.h"
    lb.write_text(lb.read_text().replace("#endif", "this is not C;\n#endif", 1))
    pin = TEST_PIN_ROOT / f"broken{secrets.token_hex(3)}"
    try:
        with pytest.raises(loader.CompileError, match=r"kpr_lb\.h:\d+"):
            loader.load(pin, MapSizes(), bad)
        assert not [p for p in pin.iterdir() if p.name.startswith("staging_")]
    finally:
        cleanup(pin)


def test_a_counter_added_to_the_programs_regrows_the_pinned_stats_array() -> None:
    """An upgrade whose programs count one more thing (enum kpr_stat grew) finds
    the old, shorter stats array pinned: it is recreated at the new size, so every
    counter has its slot (the counters start again, which a Prometheus rate()
    reads as a reset)."""
    import os

    from controller import kernel

    d = new_datapath()
    pin = d.cfg.pin_dir / f"stats{loader.LAYOUT}"
    d.cfg.pin_dir.mkdir(parents=True)
    n = len(loader.stat_names())
    fd = kernel.sys_bpf(0, kernel._MapCreateAttr(map_type=6, key_size=4, value_size=8,
                                                  max_entries=n - 1))  # PERCPU_ARRAY
    try:
        kernel.obj_pin(fd, pin)
    finally:
        os.close(fd)
    try:
        d.load()
        info = kernel.pinned_map_info(pin)
        assert info is not None and info.max_entries == n
        assert set(d.stats()) == set(loader.stat_names())
    finally:
        d.cleanup()

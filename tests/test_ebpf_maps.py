"""The map writer against real (pinned) BPF maps in the kernel."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datapaths.base import DatapathError
from controller.datapaths.ebpf.datapath import EbpfConfig, EbpfDatapath, cleanup
from controller.datapaths.ebpf.loader import MapSizes
from controller.model import Backend, Diff, Frontend, Protocol, ServiceEntry, State
from tests.conftest import TEST_PIN_ROOT, new_datapath

pytestmark = pytest.mark.kernel


def make_state(spec: dict[int, list[int]]) -> State:
    """{service index: [backend indexes]} -> State."""
    return State(ServiceEntry.make(
        Frontend(ipaddress.IPv4Address(0x0A600000 + i), 80 + i % 3,
                 Protocol.UDP if i % 2 else Protocol.TCP),
        [Backend(ipaddress.IPv4Address(0x0AF40000 + b), 8080) for b in bes], f"ns/svc{i}")
        for i, bes in spec.items())


states = st.dictionaries(st.integers(0, 12), st.lists(st.integers(0, 15), max_size=6),
                         max_size=8)


@pytest.fixture(scope="module")
def shared_dp() -> EbpfDatapath:
    d = new_datapath()
    d.load()
    yield d
    cleanup(d.cfg.pin_dir)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=6))
def test_incremental_syncs_end_where_one_full_sync_ends(shared_dp: EbpfDatapath,
                                                        seq: list[dict[int, list[int]]]) -> None:
    dp = shared_dp
    prev = State()
    dp.sync(prev, None)
    for spec in seq:
        cur = make_state(spec)
        dp.sync(cur, Diff.between(prev, cur))
        assert dp.dump() == cur  # read back from the kernel
        # the metric's running slot count matches the kernel's map
        assert round(dp.map_fill()["backend_slots"] * dp.maps.slots.max_entries) == \
            dp.maps.slots.count()
        prev = cur
    raw_incremental = {m: sorted(v for _, v in getattr(dp.maps, m).items())
                       for m in ("services", "names")}
    slots_incremental = dp.maps.slots.count()
    backends_incremental = dp.maps.backends.count()
    dp.sync(prev, None)  # a full sync of the final state changes nothing
    assert dp.dump() == prev
    assert dp.maps.slots.count() == slots_incremental == prev.backend_count()
    # one backend entry per distinct (address, port, protocol)
    assert dp.maps.backends.count() == backends_incremental == len(
        {(b, e.frontend.protocol) for e in prev.values() for b in e.backends})
    assert {m: sorted(v for _, v in getattr(dp.maps, m).items())
            for m in ("services", "names")} == raw_incremental


def test_one_change_at_scale_costs_work_proportional_to_the_change(shared_dp: EbpfDatapath) -> None:
    dp = shared_dp
    dp.sync(State(), None)  # start from empty maps
    n = 5000
    big = {i: [i * 4 + k for k in range(4)] for i in range(n)}
    full = make_state(big)
    r = dp.sync(full, None)
    assert r.ops == n * (1 + 1 + 4 + 4)  # service, name, 4 slots, 4 backends each
    changed = dict(big)
    changed[1234] = big[1234] + [99999]  # one service gains one backend
    new = make_state(changed)
    f1234 = next(iter(make_state({1234: []})))
    r = dp.sync(new, Diff.between(full, new, only=[f1234]))
    assert r.ops == 3  # one backend, one slot, one service count
    assert dp.dump()[f1234].backends == new[f1234].backends
    removed = dict(changed)
    del removed[7]
    gone = make_state(removed)
    r = dp.sync(gone, Diff.between(new, gone))
    assert r.ops == 1 + 1 + 4 + 4  # service, name, 4 slots, 4 unshared backends
    dp.sync(State(), None)


def test_restart_adopts_pinned_state_reuses_ids_and_prunes_orphans(
        datapath_factory: Callable[..., EbpfDatapath]) -> None:
    dp1 = datapath_factory(start=False)
    dp1.load()
    s1 = make_state({0: [1, 2], 1: [2, 3], 2: [4]})
    dp1.sync(s1, None)
    ids1 = {f: s.svc_id for f, s in dp1.maps._svc.items()}
    be_ids1 = dict(dp1.maps._be_ids)
    # A new process on the same pins (same instance): it reads the maps back.
    dp2 = EbpfDatapath(EbpfConfig(instance=dp1.cfg.instance, pin_root=TEST_PIN_ROOT))
    dp2.load()
    assert dp2.dump() == s1
    s2 = make_state({0: [1, 2], 1: [3]})  # service 2 went away while we were down
    r = dp2.sync(s2, None)
    assert dp2.dump() == s2
    # untouched services keep their ids, so established flows keep their slots
    assert {f: s.svc_id for f, s in dp2.maps._svc.items()} == {
        f: i for f, i in ids1.items() if f in s2}
    assert all(be_ids1[k] == v for k, v in dp2.maps._be_ids.items())
    # svc 1 (UDP): slot 0 rewritten, count lowered, slot 1 deleted, backend 2/UDP deleted
    # (backends are per protocol: svc 0 keeps 2/TCP); svc 2: service, name, slot, and
    # backend 4/TCP deleted.
    assert r.ops == 3 + 1 + 3 + 1


def test_map_full_is_an_error_and_forces_a_full_sync(
        datapath_factory: Callable[..., EbpfDatapath]) -> None:
    dp = EbpfDatapath(EbpfConfig(instance="tiny" + datapath_factory(start=False).cfg.instance,
                                 pin_root=TEST_PIN_ROOT,
                                 sizes=MapSizes(services=4, slots=64, backends=64)))
    try:
        dp.load()
        ok = make_state({0: [1], 1: [1]})
        dp.sync(ok, None)
        with pytest.raises(DatapathError, match="services4.*map full"):
            dp.sync(make_state({i: [1] for i in range(8)}), None)
        # what was programmed before still holds, and a full sync recovers
        dp.sync(ok, None)
        assert dp.dump() == ok
    finally:
        cleanup(dp.cfg.pin_dir)

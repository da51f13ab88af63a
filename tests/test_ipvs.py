"""The IPVS writer against a real kernel's IPVS: what it reads back after full and
partial syncs, and graceful termination. This machine's kernel has no IPVS: these
tests run inside the VM (tests/test_ipvs_vm.py boots it), and skip elsewhere."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datapaths.ipvs.datapath import IpvsConfig, IpvsDatapath
from controller.model import Backend, Diff, Frontend, Protocol, ServiceEntry, State
from controller.testbed import Testbed, in_netns, sh, spread
from tests.shapes import rich_entry, states
from tests.test_ipvs_logic import serving

pytestmark = pytest.mark.kernel
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/64"))


def _has_ipvs() -> bool:
    return IpvsDatapath(IpvsConfig()).probe().ok


needs_ipvs = pytest.mark.skipif(not _has_ipvs(), reason="this kernel has no IPVS "
                                "(tests/test_ipvs_vm.py runs these in a VM)")


@needs_ipvs
def test_full_and_partial_syncs_read_back(netns: str) -> None:
    sh("ip", "-n", netns, "link", "add", "e0", "type", "veth", "peer", "name", "e1")
    sh("ip", "-n", netns, "addr", "add", "172.16.0.1/24", "dev", "e0")
    sh("ip", "-n", netns, "link", "set", "e0", "up")
    dp = IpvsDatapath(IpvsConfig(netns=netns, cluster_cidrs=CIDRS))
    dp.start()
    try:
        prev = State()
        for spec in ({i: ([1, 2, 3][:i % 4], i) for i in range(12)},
                     {i: ([2, 5][:i % 3], i + 1) for i in (0, 1, 2, 3, 11, 13)},
                     {i: ([1, 4, 6], i + 2) for i in range(0, 16, 3)}):
            cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
            r = dp.sync(cur, Diff.between(prev, cur))
            assert not r.full or not prev  # the first sync is always a full one
            # UDP real servers go at once; TCP ones drain first (weight 0, not dumped)
            assert dp.dump() == dp.canonical(cur.values())
            prev = cur
        assert dp.sync(prev, None).full and dp.dump() == dp.canonical(prev.values())
    finally:
        dp.cleanup()
    assert "kpr-ipvs0" not in sh("ip", "-n", netns, "link").stdout


@needs_ipvs
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=4))
def test_incremental_syncs_end_where_one_full_sync_ends(
        nodeport_ns: str, seq: list[dict[int, tuple[list[int], int]]]) -> None:
    """tests/test_ipvs_logic.py's property, against the kernel's IPVS (a few
    examples: the VM emulates its CPU)."""
    dp = IpvsDatapath(IpvsConfig(netns=nodeport_ns, cluster_cidrs=CIDRS))
    dp.start()
    try:
        prev = State()
        dp.sync(prev, None)
        for spec in seq:
            cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
            assert not dp.sync(cur, Diff.between(prev, cur)).full
            assert dp.dump() == dp.canonical(cur.values())
            prev = cur
        incremental = serving(dp._read())
        assert dp.sync(prev, None).full and serving(dp._read()) == incremental
    finally:
        dp.cleanup()
    fresh = IpvsDatapath(IpvsConfig(netns=nodeport_ns, cluster_cidrs=CIDRS))
    fresh.start()
    try:
        fresh.sync(prev, None)
        assert serving(fresh._read()) == incremental
    finally:
        fresh.cleanup()


@needs_ipvs
def test_a_removed_tcp_backend_drains_before_it_goes(testbed: Testbed) -> None:
    """Graceful termination: an open connection to a removed backend carries on
    (weight 0: no new ones), and the backend goes once it is closed."""
    tb = testbed
    for n in "ab":
        tb.add_pod(n)
        tb.serve(n, 8080)
    tb.add_pod("client")
    vip = "10.96.0.10"

    def entry(names: str) -> ServiceEntry:
        return ServiceEntry.make(Frontend(ipaddress.ip_address(vip), 80, Protocol.TCP),
                                 [Backend(ipaddress.ip_address(tb.pods[n].ip), 8080)
                                  for n in names], "default/web:http")
    dp = IpvsDatapath(IpvsConfig(netns=tb.node, cluster_cidrs=CIDRS))
    dp.start()
    try:
        both = State([entry("ab")])
        dp.sync(both, None)

        def weights() -> dict[str, int]:
            out = sh("ip", "netns", "exec", tb.node, "ipvsadm", "-Ln", "-t", f"{vip}:80").stdout
            return {line.split()[1].split(":")[0]: int(line.split()[3])
                    for line in out.splitlines() if line.strip().startswith("->")
                    and "RemoteAddress" not in line}

        def hold() -> str:
            s = socket.create_connection((vip, 80), timeout=5)
            s.sendall(b"hi\n")
            name = s.recv(100).decode().split()[0]
            held.append(s)
            return name
        held: list[socket.socket] = []
        name = in_netns(tb.pods["client"].ns, hold)
        other = "b" if name == "a" else "a"
        less = State([entry(other)])
        dp.sync(less, Diff.between(both, less))
        gone = tb.pods[name].ip
        assert weights().get(gone) == 0  # draining: kept, no new connections
        assert dp.dump() == dp.canonical(less.values())
        held[0].sendall(b"still there\n")  # the open connection carries on
        assert held[0].recv(100)
        # closed with an RST: IPVS keeps the entry 10 s in CLOSE (a FIN would keep it
        # 2 min in TIME_WAIT, which counts as an inactive connection)
        held[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        held[0].close()
        deadline = time.monotonic() + 60
        while gone in weights() and time.monotonic() < deadline:
            time.sleep(1)
        assert gone not in weights()
    finally:
        dp.cleanup()



def open_at_once(vip: str, n: int) -> list[str]:
    """The endpoints of n connections held open together."""
    held = [socket.create_connection((vip, 80), timeout=5) for _ in range(n)]
    try:
        for s in held:
            s.sendall(b"hi\n")
        return [s.recv(100).decode().split()[0] for s in held]
    finally:
        for s in held:
            s.close()


@needs_ipvs
def test_each_scheduler_balances_as_it_says(testbed: Testbed) -> None:
    """The schedulers the issue names, with traffic, one after another on the same
    pods: the spreading ones use every endpoint, the hashing ones (sh, mh) keep a
    client on one, and IPVS reports the scheduler it was given."""
    tb = testbed
    for n in "abc":
        tb.add_pod(n)
        tb.serve(n, 8080)
    tb.add_pod("client")
    vip = "10.96.0.10"
    state = State([ServiceEntry.make(
        Frontend(ipaddress.ip_address(vip), 80, Protocol.TCP),
        [Backend(ipaddress.ip_address(tb.pods[n].ip), 8080) for n in "abc"],
        "default/web:http")])
    for sched in ("rr", "wrr", "lc", "sh", "mh", "sed", "nq"):
        dp = IpvsDatapath(IpvsConfig(netns=tb.node, cluster_cidrs=CIDRS, scheduler=sched))
        dp.start()
        try:
            dp.sync(state, None)
            listed = sh("ip", "netns", "exec", tb.node, "ipvsadm", "-Ln").stdout
            assert f"{vip}:80 {sched}" in listed, listed
            got = spread(tb.pods["client"].ns, vip, 80, 9)
            assert "<error>" not in got, (sched, got)
            if sched in ("sh", "mh"):
                assert len(got) == 1, (sched, got)  # one client address, one endpoint
            elif sched in ("rr", "wrr"):
                assert got == {"a": 3, "b": 3, "c": 3}, (sched, got)
            else:  # least-connection kinds: three open connections, three endpoints
                assert sorted(in_netns(tb.pods["client"].ns, open_at_once, vip, 3)) == \
                    ["a", "b", "c"], sched
        finally:
            dp.cleanup()

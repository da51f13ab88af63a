"""The nftables writer against real tables in a network namespace: what it reads
back, partial syncs against full ones, failure recovery, and stale UDP flows.
(The rest of the traffic through it is the shared flow table's,
tests/test_scenarios.py.)"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datapaths.base import DatapathError
from controller.datapaths.nftables.datapath import NftablesConfig, NftablesDatapath, cleanup
from controller.model import Backend, Diff, Frontend, Protocol, ServiceEntry, State
from controller.testbed import Testbed, in_netns, sh
from tests.shapes import rich_entry, states

pytestmark = pytest.mark.kernel
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/64"))


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    ns = f"knft{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def dp(netns: str) -> NftablesDatapath:
    d = NftablesDatapath(NftablesConfig(netns=netns, cluster_cidrs=CIDRS))
    assert d.probe().ok
    return d


def snapshot(ns: str) -> dict[str, Any]:
    """Both tables as data, without handles and in a canonical order: chains with
    their rules, sets and maps with their elements."""
    out: dict[str, Any] = {}
    for fam in ("ip", "ip6"):
        p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "nft", "-j", "list", "table",
                            fam, "kpr"], capture_output=True, text=True, check=True)
        for o in json.loads(p.stdout)["nftables"]:
            (kind, body), = o.items()
            if kind in ("metainfo", "table"):
                continue
            body = {k: v for k, v in body.items() if k != "handle"}
            if kind == "rule":
                out.setdefault(f"{fam} chain {body['chain']}", {}).setdefault(
                    "rules", []).append(json.dumps(body["expr"], sort_keys=True))
            elif kind == "chain":
                out.setdefault(f"{fam} chain {body['name']}", {})["decl"] = body
            else:
                elems = sorted(json.dumps(e, sort_keys=True) for e in body.pop("elem", []))
                out[f"{fam} {kind} {body['name']}"] = (body, elems)
    return out


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=5))
def test_incremental_syncs_end_where_one_full_sync_ends(
        dp: NftablesDatapath, netns: str, seq: list[dict[int, tuple[list[int], int]]]) -> None:
    prev = State()
    dp.sync(prev, None)
    for spec in seq:
        cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
        dp.sync(cur, Diff.between(prev, cur))
        assert dp.dump() == dp.canonical(cur.values())  # read back from the kernel
        prev = cur
    incremental = snapshot(netns)
    r = dp.sync(prev, None)
    assert r.full and dp.dump() == dp.canonical(prev.values())
    assert snapshot(netns) == incremental  # every chain, rule, set and element


def test_partial_sync_touches_only_the_changed_service(dp: NftablesDatapath) -> None:
    big = State(rich_entry(i, [1, 2, 3], i) for i in range(200))
    dp.sync(big, None)
    one = rich_entry(7, [1, 2, 3, 4], 7)
    after = State([*(e for e in big.values() if e.frontend != one.frontend), one])
    r = dp.sync(after, Diff.between(big, after))
    assert not r.full and 0 < r.ops <= 20  # the entry's own chains, not 200 services'
    assert dp.dump() == dp.canonical(after.values())


def test_a_failed_transaction_changes_nothing_and_a_full_sync_repairs(
        dp: NftablesDatapath, netns: str) -> None:
    s1 = State(rich_entry(i, [1, 2], 0) for i in range(4))
    dp.sync(s1, None)
    before = snapshot(netns)
    # Someone deletes an element behind kpr's back: the next partial sync that
    # deletes it fails as a whole, and the kernel keeps the earlier state.
    gone = next(iter(s1.values()))
    sh("nsenter", f"--net=/run/netns/{netns}", "nft", "delete", "element", "ip", "kpr",
       "service-ips", f"{{ {gone.frontend.ip} . {gone.frontend.protocol.name.lower()} . "
       f"{gone.frontend.port} }}")
    damaged = snapshot(netns)
    s2 = State(e for e in s1.values() if e.frontend != gone.frontend)
    with pytest.raises(DatapathError, match="nft transaction"):
        dp.sync(s2, Diff.between(s1, s2))
    assert snapshot(netns) == damaged != before
    dp.sync(s2, None)  # what the proxier does after a failure
    assert dp.dump() == dp.canonical(s2.values())


def test_cleanup_removes_both_tables(netns: str) -> None:
    d = NftablesDatapath(NftablesConfig(netns=netns))
    d.sync(State([rich_entry(1, [1], 0), rich_entry(3, [1], 0)]), None)
    assert cleanup(netns) == 2
    out = sh("nsenter", f"--net=/run/netns/{netns}", "nft", "list", "tables").stdout
    assert "kpr" not in out
    assert cleanup(netns) == 0


@pytest.mark.parametrize("vip", ["10.96.0.10", "fd00:96::10"])
def test_udp_flow_moves_when_its_backend_goes(testbed: Testbed, vip: str) -> None:
    """netfilter would keep sending a UDP flow to its first endpoint for as long as
    its conntrack entry lives; the sync that removes the endpoint deletes it."""
    tb = testbed
    for n in "abc":
        tb.add_pod(n)
        tb.serve(n, 8080)
    tb.add_pod("client")
    v6 = ":" in vip
    ip = {n: tb.pods[n].ip6 if v6 else tb.pods[n].ip for n in "abc"}

    def entry(names: str) -> ServiceEntry:
        return ServiceEntry.make(Frontend(ipaddress.ip_address(vip), 53, Protocol.UDP),
                                 [Backend(ipaddress.ip_address(ip[n]), 8080) for n in names],
                                 "default/dns:dns")
    dp = NftablesDatapath(NftablesConfig(netns=tb.node, cluster_cidrs=CIDRS))
    full = State([entry("abc")])
    dp.sync(full, None)

    def flow() -> list[str]:
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((vip, 53))
            names = []
            for i in range(6):
                s.send(b"hi\n")
                names.append(s.recv(100).decode().split()[0])
                if i == 2:
                    less = State([entry("".join(n for n in "abc" if n != names[0]))])
                    dp.sync(less, Diff.between(full, less))
            return names
    names = in_netns(tb.pods["client"].ns, flow)
    assert len(set(names[:3])) == 1  # one flow, one backend
    assert names[0] not in names[3:]  # moved, no datagram lost (recv would time out)
    assert len(set(names[3:])) == 1
    cleanup(tb.node)


def test_node_address_changes_reach_the_nodeport_set_at_once(netns: str) -> None:
    from controller.testbed import wait_until

    d = NftablesDatapath(NftablesConfig(netns=netns))
    d.start()
    try:
        d.sync(State([rich_entry(2, [1], 2), rich_entry(3, [1], 2)]), None)  # NodePorts

        def nodeport_ips() -> str:
            return "".join(sh("nsenter", f"--net=/run/netns/{netns}", "nft", "list", "set",
                              fam, "kpr", "nodeport-ips").stdout for fam in ("ip", "ip6"))

        def postrouting() -> str:
            return sh("nsenter", f"--net=/run/netns/{netns}", "nft", "list", "chain", "ip",
                      "kpr", "nat-postrouting").stdout
        # a veth pair: this kernel has no dummy driver (no loadable modules)
        sh("ip", "-n", netns, "link", "add", "kprdummy0", "type", "veth", "peer", "name",
           "kprdummy1")
        sh("ip", "-n", netns, "link", "set", "kprdummy0", "up")
        sh("ip", "-n", netns, "addr", "add", "192.168.77.1/24", "dev", "kprdummy0")
        sh("ip", "-n", netns, "addr", "add", "fd00:77::1/64", "dev", "kprdummy0", "nodad")
        wait_until(lambda: "192.168.77.1" in nodeport_ips() and "fd00:77::1" in nodeport_ips(),
                   timeout=10)
        assert "snat to 192.168.77.1" in postrouting()  # the only address: the primary
        sh("ip", "-n", netns, "addr", "del", "192.168.77.1/24", "dev", "kprdummy0")
        wait_until(lambda: "192.168.77.1" not in nodeport_ips(), timeout=10)
        assert "masquerade" in postrouting()  # no IPv4 address left to SNAT to
        assert d.dump() == d.canonical([rich_entry(2, [1], 2), rich_entry(3, [1], 2)])
    finally:
        d.cleanup()
        sh("ip", "-n", netns, "link", "del", "kprdummy0", check=False)

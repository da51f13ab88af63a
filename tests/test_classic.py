"""Features of the classic writers with real traffic, once per writer: nftables,
iptables over its nft back end, iptables-legacy, and IPVS (in the VM:
tests/test_ipvs_vm.py; this kernel has none). Each writer is programmed directly
(no controller): ClientIP affinity, affinity across full syncs and restarts, a UDP
flow moving off a removed endpoint, and node address changes reaching the NodePort
rules at once. Every traffic test runs in both families."""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

import pytest

from controller.datapaths.iptables.datapath import IptablesConfig, IptablesDatapath
from controller.datapaths.ipvs.datapath import IpvsConfig, IpvsDatapath
from controller.datapaths.nftables.datapath import NftablesConfig, NftablesDatapath
from controller.model import Backend, Diff, Frontend, Protocol, ServiceEntry, ServiceFlag, State
from controller.testbed import Testbed, in_netns, sh, spread, wait_until
from tests.shapes import rich_entry

pytestmark = pytest.mark.kernel
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/64"))
HAS_IPVS = IpvsDatapath(IpvsConfig()).probe().ok
WRITERS = ("nftables", "iptables-nft", "iptables-legacy",
           pytest.param("ipvs", marks=pytest.mark.skipif(
               not HAS_IPVS, reason="this kernel has no IPVS (tests/test_ipvs_vm.py "
               "runs these in a VM)")))


def make(writer: str, netns: str) -> Any:
    if writer == "nftables":
        return NftablesDatapath(NftablesConfig(netns=netns, cluster_cidrs=CIDRS))
    if writer == "ipvs":
        d = IpvsDatapath(IpvsConfig(netns=netns, cluster_cidrs=CIDRS))
        d.start()  # loads ip_vs in the namespace, sets its sysctls
        return d
    return IptablesDatapath(IptablesConfig(netns=netns, backend=writer.split("-")[1],
                                           cluster_cidrs=CIDRS))


@pytest.fixture(params=WRITERS)
def writer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pods(testbed: Testbed) -> Testbed:
    for n in "abc":
        testbed.add_pod(n)
        testbed.serve(n, 8080)
    testbed.add_pod("client")
    return testbed


def entry(tb: Testbed, vip: str, names: str, proto: Protocol, port: int,
          **kw: Any) -> ServiceEntry:
    v6 = ":" in vip
    return ServiceEntry.make(
        Frontend(ipaddress.ip_address(vip), port, proto),
        [Backend(ipaddress.ip_address(tb.pods[n].ip6 if v6 else tb.pods[n].ip), 8080)
         for n in names], "default/svc:p", **kw)


@pytest.mark.parametrize("vip", ["10.96.0.10", "fd00:96::10"])
def test_client_ip_affinity_holds_until_the_timeout(pods: Testbed, writer: str,
                                                    vip: str) -> None:
    tb = pods
    dp = make(writer, tb.node)
    try:
        svc = entry(tb, vip, "abc", Protocol.TCP, 80, flags=ServiceFlag.AFFINITY,
                    affinity_timeout=1)
        dp.sync(State([svc]), None)
        client = tb.pods["client"].ns
        first = spread(client, vip, 80, 12)  # each new connection renews the timeout
        assert len(first) == 1 and "<error>" not in first
        if writer != "ipvs":
            # IPVS keeps a persistence template while any connection it controls is
            # in its table (a closed one stays 2 min in TIME_WAIT): there affinity
            # outlasts the timeout, as in kube-proxy's IPVS mode
            chosen = set(first)
            for _ in range(8):  # after each expiry: balanced afresh, then sticky again
                time.sleep(1.2)
                got = spread(client, vip, 80, 3)
                assert len(got) == 1
                chosen |= set(got)
            assert len(chosen) > 1  # all the same: p = 3^-8
        sticky = next(iter(spread(client, vip, 80, 1)))
        rest = "".join(n for n in "abc" if n != sticky)
        smaller = entry(tb, vip, rest, Protocol.TCP, 80, flags=ServiceFlag.AFFINITY,
                        affinity_timeout=1)
        dp.sync(State([smaller]), Diff.between(State([svc]), State([smaller])))
        moved = spread(client, vip, 80, 8)
        assert len(moved) == 1 and sticky not in moved
    finally:
        dp.cleanup()


@pytest.mark.parametrize("vip", ["10.96.0.10", "fd00:96::10"])
def test_client_ip_affinity_outlives_full_syncs(pods: Testbed, writer: str, vip: str) -> None:
    """A full sync (the periodic repair, a restart, a node address change) keeps
    every client on the endpoint it had. Were affinity lost, each sync would choose
    afresh: all four agreeing by chance has p = 3^-4."""
    tb = pods
    dp = make(writer, tb.node)
    try:
        state = State([entry(tb, vip, "abc", Protocol.TCP, 80, flags=ServiceFlag.AFFINITY,
                             affinity_timeout=600)])
        dp.sync(state, None)
        client = tb.pods["client"].ns
        first = set(spread(client, vip, 80, 3))
        assert len(first) == 1 and "<error>" not in first
        for _ in range(4):
            assert dp.sync(state, None).full
            assert set(spread(client, vip, 80, 2)) == first
        restarted = make(writer, tb.node)  # a new kpr adopts what the old one left
        assert restarted.sync(state, None).full
        assert set(spread(client, vip, 80, 2)) == first
    finally:
        dp.cleanup()


@pytest.mark.parametrize("vip", ["10.96.0.10", "fd00:96::10"])
def test_udp_flow_moves_when_its_backend_goes(pods: Testbed, writer: str, vip: str) -> None:
    """netfilter would keep sending a UDP flow to its first endpoint for as long as
    its conntrack entry lives; the sync that removes the endpoint deletes it."""
    tb = pods
    dp = make(writer, tb.node)
    full = State([entry(tb, vip, "abc", Protocol.UDP, 53)])
    dp.sync(full, None)

    def flow() -> list[str]:
        with socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET,
                           socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((vip, 53))
            names = []
            for i in range(6):
                s.send(b"hi\n")
                names.append(s.recv(100).decode().split()[0])
                if i == 2:
                    rest = "".join(n for n in "abc" if n != names[0])
                    less = State([entry(tb, vip, rest, Protocol.UDP, 53)])
                    dp.sync(less, Diff.between(full, less))
            return names
    try:
        names = in_netns(tb.pods["client"].ns, flow)
    finally:
        dp.cleanup()
    assert len(set(names[:3])) == 1  # one flow, one backend
    assert names[0] not in names[3:]  # moved, no datagram lost (recv would time out)
    assert len(set(names[3:])) == 1


def test_node_address_changes_reach_the_nodeport_rules_at_once(netns: str,
                                                               writer: str) -> None:
    d = make(writer, netns)
    d.start()

    def rules() -> str:
        if writer == "ipvs":  # the companion table and the virtual services
            return "".join(sh("nsenter", f"--net=/run/netns/{netns}", "nft", "list", "table",
                              fam, "kpr-ipvs").stdout for fam in ("ip", "ip6")) + \
                sh("nsenter", f"--net=/run/netns/{netns}", "ipvsadm", "-Ln").stdout
        if writer == "nftables":
            return sh("nsenter", f"--net=/run/netns/{netns}", "nft", "list", "table", "ip",
                      "kpr").stdout + sh("nsenter", f"--net=/run/netns/{netns}", "nft",
                                         "list", "table", "ip6", "kpr").stdout
        be = writer.split("-")[1]
        return "".join(sh("nsenter", f"--net=/run/netns/{netns}", f"{fam}tables-{be}-save",
                          "-t", "nat").stdout for fam in ("ip", "ip6"))
    try:
        d.sync(State([rich_entry(2, [1], 2), rich_entry(3, [1], 2)]), None)  # NodePorts
        # a veth pair: this kernel has no dummy driver (no loadable modules)
        sh("ip", "-n", netns, "link", "add", "kprdummy0", "type", "veth", "peer", "name",
           "kprdummy1")
        sh("ip", "-n", netns, "link", "set", "kprdummy0", "up")
        sh("ip", "-n", netns, "addr", "add", "192.168.77.1/24", "dev", "kprdummy0")
        sh("ip", "-n", netns, "addr", "add", "fd00:77::1/64", "dev", "kprdummy0", "nodad")
        wait_until(lambda: "192.168.77.1" in rules() and "fd00:77::1" in rules(), timeout=10)
        # the only address is the masquerade address
        assert ("--to-source 192.168.77.1" if writer.startswith("iptables")
                else "snat to 192.168.77.1") in rules()
        sh("ip", "-n", netns, "addr", "del", "192.168.77.1/24", "dev", "kprdummy0")
        wait_until(lambda: "192.168.77.1" not in rules(), timeout=10)
        assert ("MASQUERADE" if writer.startswith("iptables") else "masquerade") in rules()
        # a new address: the NodePorts move there (IPVS: with no IPv4 address, the
        # IPv4 NodePort had no virtual service to hold its real servers)
        sh("ip", "-n", netns, "addr", "add", "192.168.79.1/24", "dev", "kprdummy0")
        wait_until(lambda: "192.168.79.1" in rules(), timeout=10)
        assert d.dump() == d.canonical([rich_entry(2, [1], 2), rich_entry(3, [1], 2)])
    finally:
        d.cleanup()
        sh("ip", "-n", netns, "link", "del", "kprdummy0", check=False)

"""Service features with real traffic through the eBPF datapath, programmed directly:
ClientIP affinity, Maglev, masqueradeAll, what happens to flows whose backend goes
away or turns terminating (TCP stays, UDP moves), and host sockets. Every test runs once per family
over the dual-stack testbed."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from controller.datapaths.ebpf.datapath import EbpfDatapath
from controller.datapaths.ebpf.maps import BpfMap
from controller.model import Backend, Diff, Frontend, Protocol, ServiceEntry, ServiceFlag, State
from controller.testbed import Conn, Testbed, in_netns, probe, spread


def conntrack(dp: EbpfDatapath) -> BpfMap:
    assert dp.bpf is not None
    return BpfMap(dp.bpf["conntrack"], "conntrack")

pytestmark = pytest.mark.kernel


@dataclass(frozen=True)
class Family:
    """One IP family's addresses in the testbed."""

    vip: str
    """The Service address."""
    node_ip: str
    """The node's masquerade address."""
    any: str
    """The unspecified address (to bind a client socket)."""
    af: socket.AddressFamily
    """Socket family."""

    def pod_ip(self, tb: Testbed, name: str) -> str:
        pod = tb.pods[name]
        return pod.ip6 if self.af == socket.AF_INET6 else pod.ip


FAMILIES = {"ipv4": Family("10.96.0.10", "172.16.0.1", "0.0.0.0", socket.AF_INET),
            "ipv6": Family("fd00:96::10", "fd00:16::1", "::", socket.AF_INET6)}


@pytest.fixture(params=list(FAMILIES))
def fam(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


def entry(tb: Testbed, fam: Family, names: str, proto: Protocol = Protocol.TCP, port: int = 80,
          **kw: object) -> ServiceEntry:
    return ServiceEntry.make(Frontend(ipaddress.ip_address(fam.vip), port, proto),
                             [Backend(ipaddress.ip_address(fam.pod_ip(tb, n)), 8080)
                              for n in names],
                             "default/svc:p", **kw)  # type: ignore[arg-type]


@pytest.fixture
def node(testbed: Testbed) -> Testbed:
    for n in "abcde":
        testbed.add_pod(n)
        testbed.serve(n, 8080)
    testbed.add_pod("client")
    testbed.add_ext()
    return testbed


def start(tb: Testbed, factory: Callable[..., EbpfDatapath], **kw: object) -> EbpfDatapath:
    return factory([f"{tb.prefix}p*", f"{tb.prefix}x"], tb.node, **kw)


def test_client_ip_affinity_holds_until_the_timeout(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    tb = node
    dp = start(tb, datapath_factory)
    svc = entry(tb, fam, "abc", flags=ServiceFlag.AFFINITY, affinity_timeout=1)
    dp.sync(State([svc]), None)
    client = tb.pods["client"].ns
    # New connections within the timeout (each one renews it) keep one backend.
    first = spread(client, fam.vip, 80, 20)
    assert len(first) == 1 and "<error>" not in first
    sticky = next(iter(first))
    time.sleep(0.6)
    assert spread(client, fam.vip, 80, 5) == {sticky: 5}
    # After the timeout the client is balanced afresh: over several expiries it
    # lands on more than one backend (all the same: p = 3^-7).
    chosen = set()
    for _ in range(8):
        time.sleep(1.15)
        got = spread(client, fam.vip, 80, 3)
        assert len(got) == 1  # and sticks again at once
        chosen |= set(got)
    assert len(chosen) > 1
    # The sticky backend leaves the Service: the client moves, and sticks to the new one.
    sticky = next(iter(spread(client, fam.vip, 80, 1)))
    rest = "".join(n for n in "abc" if n != sticky)
    smaller = entry(tb, fam, rest, flags=ServiceFlag.AFFINITY, affinity_timeout=1)
    dp.sync(State([smaller]), Diff.between(State([svc]), State([smaller])))
    moved = spread(client, fam.vip, 80, 10)
    assert len(moved) == 1 and sticky not in moved


def _udp_flows(ns: str, ports: range, fam: Family) -> dict[int, str]:
    """One datagram from each source port; the backend that answered each."""
    def go() -> dict[int, str]:
        out = {}
        for sport in ports:
            with socket.socket(fam.af, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.bind((fam.any, sport))
                s.sendto(b"hi\n", (fam.vip, 53))
                out[sport] = s.recvfrom(100)[0].decode().split()[0]
        return out
    return in_netns(ns, go, timeout=120)


def test_maglev_keeps_flows_when_a_backend_goes(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    """Flows are re-balanced without conntrack (as on another node, or after the
    flow table was lost): Maglev puts at least 1 - 1/N of the flows on surviving
    backends back where they were."""
    tb = node
    dp = start(tb, datapath_factory)
    full = entry(tb, fam, "abcde", Protocol.UDP, 53, flags=ServiceFlag.MAGLEV)
    dp.sync(State([full]), None)
    client = tb.pods["client"].ns
    ports = range(41000, 41300)
    before = _udp_flows(client, ports, fam)
    assert set(before.values()) == set("abcde")
    assert _udp_flows(client, ports, fam) == before  # the same flows hash the same
    less = entry(tb, fam, "abce", Protocol.UDP, 53, flags=ServiceFlag.MAGLEV)
    dp.sync(State([less]), Diff.between(State([full]), State([less])))
    conntrack(dp).clear()  # forget every flow: placement is the hash's alone
    after = _udp_flows(client, ports, fam)
    survivors = [p for p in ports if before[p] != "d"]
    kept = sum(after[p] == before[p] for p in survivors) / len(survivors)
    assert kept >= 1 - 1 / 5, f"only {kept:.1%} of surviving flows kept their backend"
    assert "d" not in after.values()


def test_random_reshuffles_flows_without_conntrack(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    """The control for the Maglev test: random choice keeps only ~1/N."""
    tb = node
    dp = start(tb, datapath_factory)
    dp.sync(State([entry(tb, fam, "abcde", Protocol.UDP, 53)]), None)
    client = tb.pods["client"].ns
    ports = range(42000, 42200)
    before = _udp_flows(client, ports, fam)
    conntrack(dp).clear()
    after = _udp_flows(client, ports, fam)
    assert sum(after[p] == before[p] for p in ports) / len(ports) < 0.5


def test_masquerade_all_hides_every_client(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    tb = node
    dp = start(tb, datapath_factory, masquerade_all=True)
    dp.sync(State([entry(tb, fam, "ab")]), None)
    for _ in range(6):
        got = probe(tb.pods["client"].ns, fam.vip, 80)
        assert isinstance(got, tuple) and got[1] == fam.node_ip


def test_udp_flow_moves_when_its_backend_goes(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    tb = node
    dp = start(tb, datapath_factory)
    full = entry(tb, fam, "abc", Protocol.UDP, 53)
    dp.sync(State([full]), None)

    def flow() -> list[str]:
        # one socket = one flow (same 5-tuple) for every datagram
        with socket.socket(fam.af, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((fam.vip, 53))
            names = []
            for i in range(6):
                s.send(b"hi\n")
                names.append(s.recv(100).decode().split()[0])
                if i == 2:
                    gone = names[0]
                    rest = "".join(n for n in "abc" if n != gone)
                    less = entry(tb, fam, rest, Protocol.UDP, 53)
                    dp.sync(State([less]), Diff.between(State([full]), State([less])))
            return names
    stale = dp.stats()["ct_stale"]
    names = in_netns(tb.pods["client"].ns, flow)
    assert len(set(names[:3])) == 1  # one flow, one backend
    assert names[0] not in names[3:]  # moved, with no datagram lost (recv would time out)
    assert len(set(names[3:])) == 1  # and stays on its new backend
    assert dp.stats()["ct_stale"] == stale + 1


def test_tcp_connection_keeps_a_backend_that_left_until_its_id_has_another_owner(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    """kube-proxy's TCP behaviour: netfilter's conntrack keeps a removed endpoint's
    NAT, so an open connection stays on its backend (it may still serve: a label or
    selector change removes a running pod). Only once the backend's id has another
    owner (fresh ids first, then the longest-free: a 3-entry array here) does the
    flow fail, at once, with an RST from a live backend, never a hang."""
    from controller.datapaths.ebpf.loader import MapSizes

    tb = node
    dp = start(tb, datapath_factory, sizes=MapSizes(backends=3))
    full = entry(tb, fam, "ab")
    dp.sync(State([full]), None)
    conn = Conn(tb.pods["client"].ns, fam.vip, 80)
    name = conn.ask().split()[0]
    rest = "b" if name == "a" else "a"
    less = entry(tb, fam, rest)
    dp.sync(State([less]), Diff.between(State([full]), State([less])))
    assert set(spread(tb.pods["client"].ns, fam.vip, 80, 20)) == {rest}  # no new flow
    for _ in range(5):
        assert conn.ask().split()[0] == name  # the open one keeps its backend
    # c takes the third fresh id, d the gone backend's id: now the flow is balanced
    # again, to a backend that has no such connection
    more = entry(tb, fam, rest + "cd")
    dp.sync(State([more]), Diff.between(State([less]), State([more])))
    t0 = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        conn.ask()
        conn.ask()  # the RST may arrive after the first send was accepted
    assert time.monotonic() - t0 < 1.5  # the Conn timeout is 2 s: a reset, not a hang
    conn.close()


def test_a_terminating_endpoint_keeps_its_flows_and_takes_no_new_one(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    """A rolling update: the endpoint turns terminating (ready false, serving
    true) while others are ready. Its open TCP connections and its UDP flow stay on
    it; new flows go to the ready ones. When it leaves the slice, its TCP
    connections still stay (kube-proxy keeps TCP conntrack entries) and its UDP flow
    moves at once (kube-proxy deletes UDP entries of an endpoint that stopped
    serving), losing no datagram."""
    tb = node
    dp = start(tb, datapath_factory)
    tcp, udp = entry(tb, fam, "ab"), entry(tb, fam, "ab", Protocol.UDP, 53)
    dp.sync(State([tcp, udp]), None)
    client = tb.pods["client"].ns
    conns = {}
    for _ in range(60):
        c = Conn(client, fam.vip, 80)
        n = c.ask().split()[0]
        if n in conns:
            c.close()
        else:
            conns[n] = c
        if len(conns) == 2:
            break
    assert set(conns) == {"a", "b"}
    u = in_netns(client, lambda: socket.socket(fam.af, socket.SOCK_DGRAM))
    u.settimeout(1)
    u.connect((fam.vip, 53))

    def ask_udp() -> str:
        u.send(b"hi\n")
        return u.recv(100).decode().split()[0]
    first = ask_udp()
    other = "b" if first == "a" else "a"
    a_ip = ipaddress.ip_address(fam.pod_ip(tb, first))
    drain = [Backend(a_ip, 8080)]
    tcp2 = ServiceEntry.make(tcp.frontend, [b for b in tcp.backends if b.ip != a_ip],
                             tcp.name, draining=drain)
    udp2 = ServiceEntry.make(udp.frontend, [b for b in udp.backends if b.ip != a_ip],
                             udp.name, draining=drain)
    s1, s2 = State([tcp, udp]), State([tcp2, udp2])
    dp.sync(s2, Diff.between(s1, s2))
    assert dp.dump() == dp.canonical(s2.values())  # draining backends read back
    assert set(spread(client, fam.vip, 80, 20)) == {other}
    assert set(spread(client, fam.vip, 53, 20, "udp")) == {other}
    for _ in range(3):
        assert conns["a"].ask().split()[0] == "a" and conns["b"].ask().split()[0] == "b"
        assert ask_udp() == first
    # it leaves the slice
    tcp3 = ServiceEntry.make(tcp.frontend, tcp2.backends, tcp.name)
    udp3 = ServiceEntry.make(udp.frontend, udp2.backends, udp.name)
    s3 = State([tcp3, udp3])
    dp.sync(s3, Diff.between(s2, s3))
    assert conns[first].ask().split()[0] == first
    assert ask_udp() == other  # moved, and answered: no datagram lost
    u.close()
    for c in conns.values():
        c.close()


def test_host_sockets_see_the_frontend_as_their_peer(
        node: Testbed, datapath_factory: Callable[..., EbpfDatapath], fam: Family) -> None:
    """The socket programs: unconnected UDP (sendmsg/recvmsg) and TCP's getpeername
    show the Service address, never the backend's; an IPv6 socket reaching an IPv4
    Service by its mapped address (::ffff:a.b.c.d, a dual-stack socket) is balanced
    too."""
    from controller import kernel
    from controller.datapaths.ebpf import sock

    tb = node
    cgroup = kernel.cgroup2_mount()
    assert cgroup is not None
    dp = start(tb, datapath_factory, cgroup=cgroup)
    dp.sync(State([entry(tb, fam, "ab", Protocol.UDP, 53), entry(tb, fam, "ab")]), None)
    assert sock.attached(dp.cfg.pin_dir) == [name for name, _ in sock.PROGRAMS]

    def host() -> tuple[list[tuple[str, int]], tuple[str, int]]:
        froms: list[tuple[str, int]] = []
        with socket.socket(fam.af, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            for _ in range(4):
                u.sendto(b"hi\n", (fam.vip, 53))
                froms.append(u.recvfrom(100)[1][:2])
        with socket.create_connection((fam.vip, 80), timeout=2) as t:
            peer = t.getpeername()[:2]
        return froms, peer

    def mapped() -> tuple[str, str]:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t:
            t.settimeout(2)
            t.connect((f"::ffff:{fam.vip}", 80))
            t.sendall(b"hi\n")
            return t.getpeername()[0], t.recv(100).decode().split()[0]
    before = dp.stats()["sock_lb"]
    froms, peer = in_netns(tb.node, host)
    assert froms == [(fam.vip, 53)] * 4
    assert peer == (fam.vip, 80)
    assert dp.stats()["sock_lb"] == before + 5
    if fam.af == socket.AF_INET:
        assert in_netns(tb.node, mapped)[0] == f"::ffff:{fam.vip}"
        assert dp.stats()["sock_lb"] == before + 6
        before += 1
    # A socket in another namespace (a pod; same cgroup) is not the node's: the socket
    # programs leave it alone and the tc programs balance its packets.
    assert isinstance(probe(tb.pods["client"].ns, fam.vip, 80), tuple)
    assert dp.stats()["sock_lb"] == before + 5
    dp.cleanup()
    assert sock.attached(dp.cfg.pin_dir) == []

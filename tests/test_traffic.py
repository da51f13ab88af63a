"""Real TCP and UDP between network namespaces through the eBPF datapath."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.datapaths.ebpf import tc
from controller.datapaths.ebpf.datapath import EbpfDatapath
from controller.model import Backend, Frontend, Protocol, ServiceEntry, State
from controller.testbed import (
    Conn,
    Testbed,
    kpr_argv,
    service_obj,
    sh,
    slice_obj,
    spread,
    tcp_request,
    udp_request,
    wait_until,
    write_objects,
)
from controller.netns import in_netns
from tests.conftest import TEST_PIN_ROOT

pytestmark = pytest.mark.kernel
VIP = "10.96.0.10"


def state(vip: str, port: int, proto: Protocol, ips: list[str], tport: int = 8080) -> State:
    return State([ServiceEntry.make(Frontend(ipaddress.ip_address(vip), port, proto),
                                    [Backend(ipaddress.ip_address(i), tport) for i in ips])])


@pytest.fixture
def node(testbed: Testbed, datapath_factory: Callable[..., EbpfDatapath]
         ) -> tuple[Testbed, EbpfDatapath]:
    for n in ("a", "b", "c"):
        testbed.add_pod(n)
        testbed.serve(n, 8080)
    testbed.add_pod("client")
    dp = datapath_factory([f"{testbed.prefix}p*"], testbed.node)
    return testbed, dp


def ips(tb: Testbed, names: str = "abc") -> list[str]:
    return [tb.pods[n].ip for n in names]


def test_tcp_and_udp_reach_every_backend(node: tuple[Testbed, EbpfDatapath]) -> None:
    tb, dp = node
    dp.sync(State(list(state(VIP, 80, Protocol.TCP, ips(tb)).values())
                  + list(state(VIP, 53, Protocol.UDP, ips(tb)).values())), None)
    client = tb.pods["client"].ns
    assert set(spread(client, VIP, 80, 60)) == {"a", "b", "c"}
    assert set(spread(client, VIP, 53, 60, "udp")) == {"a", "b", "c"}


def test_udp_reply_comes_from_the_vip_and_backend_sees_client(
        node: tuple[Testbed, EbpfDatapath]) -> None:
    tb, dp = node
    dp.sync(state(VIP, 53, Protocol.UDP, ips(tb, "a")), None)
    answer, src = udp_request(tb.pods["client"].ns, VIP, 53)
    assert src == VIP
    assert answer == f"a {tb.pods['client'].ip}"


def test_backend_sees_the_client_pod_address_over_tcp(node: tuple[Testbed, EbpfDatapath]) -> None:
    tb, dp = node
    dp.sync(state(VIP, 80, Protocol.TCP, ips(tb, "b")), None)
    assert tcp_request(tb.pods["client"].ns, VIP, 80) == f"b {tb.pods['client'].ip}"


def test_removed_backend_gets_no_new_connections_open_ones_survive(
        node: tuple[Testbed, EbpfDatapath]) -> None:
    tb, dp = node
    client = tb.pods["client"].ns
    full = state(VIP, 80, Protocol.TCP, ips(tb))
    dp.sync(full, None)
    # Open connections until each backend holds at least one.
    conns: dict[str, Conn] = {}
    for _ in range(100):
        c = Conn(client, VIP, 80)
        name = c.ask().split()[0]
        if name in conns:
            c.close()
        else:
            conns[name] = c
        if len(conns) == 3:
            break
    assert set(conns) == {"a", "b", "c"}
    shrunk = state(VIP, 80, Protocol.TCP, ips(tb, "ac"))
    from controller.model import Diff
    dp.sync(shrunk, Diff.between(full, shrunk))  # one incremental sync
    assert set(spread(client, VIP, 80, 60)) == {"a", "c"}
    for name in ("a", "c"):  # established flows to remaining backends still work
        assert conns[name].ask().split()[0] == name
    for c in conns.values():
        c.close()


def _from_port(ns: str, ip: str, port: int, sport: int, proto: str) -> tuple[str, str]:
    """One request from source port ``sport``: (answer, address it came from)."""
    def go() -> tuple[str, str]:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            # the port may be in TIME_WAIT from the last connection to another address
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(2)
            s.bind(("0.0.0.0", sport))
            s.connect((ip, port))
            s.sendall(b"hello\n")
            answer = s.recv(4096).decode().strip()
            return answer, s.getpeername()[0]
    return in_netns(ns, go)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_pod_reached_through_a_service_then_directly_from_the_same_port(
        node: tuple[Testbed, EbpfDatapath], proto: str) -> None:
    """A client reaches pod a through the Service from port P, then pod a's own
    address from P (its stack picks ports per destination, so it may). The first
    flow's reply-side entry has the second's tuple; once that flow has ended (TCP:
    closed; UDP: a left the Service) the direct flow's answers must come from a, not
    be rewritten to come from the Service (the client would reset or drop them)."""
    tb, dp = node
    client, a = tb.pods["client"], tb.pods["a"]
    pm = Protocol.TCP if proto == "tcp" else Protocol.UDP
    dp.sync(state(VIP, 80, pm, [a.ip]), None)
    sport = 41234
    assert _from_port(client.ns, VIP, 80, sport, proto) == (f"a {client.ip}", VIP)
    if proto == "udp":  # a datagram flow ends when its backend leaves (or it expires)
        dp.sync(state(VIP, 80, pm, ips(tb, "b")), None)
    before = dp.stats()["ct_reclaim"]
    assert _from_port(client.ns, a.ip, 8080, sport, proto) == (f"a {client.ip}", a.ip)
    assert dp.stats()["ct_reclaim"] == before + 1
    # and the Service still answers from the same port, through its new backend
    want = "a" if proto == "tcp" else "b"
    assert _from_port(client.ns, VIP, 80, sport, proto) == (f"{want} {client.ip}", VIP)


def test_unknown_vip_or_port_passes_through_untouched(node: tuple[Testbed, EbpfDatapath]) -> None:
    tb, dp = node
    dp.sync(state(VIP, 80, Protocol.TCP, ips(tb, "a")), None)
    client = tb.pods["client"].ns
    # Direct pod-to-pod traffic through the same programs is not rewritten.
    assert tcp_request(client, tb.pods["c"].ip, 8080) == f"c {tb.pods['client'].ip}"
    before = dp.stats()["dnat"]
    # An unknown VIP and an unknown port on a known VIP: not translated (and, with no
    # route on the node for them here, not answered).
    for ip, port in (("10.96.0.99", 80), (VIP, 81)):
        with pytest.raises(OSError):
            tcp_request(client, ip, port, timeout=0.5)
    assert dp.stats()["dnat"] == before


def test_links_created_later_are_attached(testbed: Testbed,
                                          datapath_factory: Callable[..., EbpfDatapath]) -> None:
    testbed.add_pod("a")
    testbed.serve("a", 8080)
    dp = datapath_factory([f"{testbed.prefix}p*"], testbed.node)
    dp.sync(state(VIP, 80, Protocol.TCP, [testbed.pods["a"].ip]), None)
    late = testbed.add_pod("late")  # its veth appears after start
    deadline = time.monotonic() + 5
    while late.host_if not in dp.attacher.attached.values() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert late.host_if in dp.attacher.attached.values()
    assert tcp_request(late.ns, VIP, 80).startswith("a ")


# ----- the real CLI, as a process in the node's namespace ---------------------------

def _status(tb: Testbed, instance: str) -> dict:
    out = subprocess.run(kpr_argv(tb.node, "status", "--json", "--instance", instance,
                                  "--bpffs-root", str(TEST_PIN_ROOT)),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_kpr_run_from_file_status_sigterm_and_cleanup(testbed: Testbed, tmp_path: Path) -> None:
    tb = testbed
    for n in ("a", "b", "c"):
        tb.add_pod(n)
        tb.serve(n, 8080)
    client = tb.add_pod("client")
    manifest = tmp_path / "svc.yaml"
    ports = [("http", 80, "TCP")]
    target = [("http", 8080, "TCP")]
    write_objects(str(manifest), [service_obj("web", VIP, ports),
                                  slice_obj("web", ips(tb), target)])
    instance = f"cli-{tb.prefix}"
    root = str(TEST_PIN_ROOT)
    proc = subprocess.Popen(kpr_argv(tb.node, "run", "--source", f"file:{manifest}",
                                     "--interfaces", f"{tb.prefix}p*", "--instance", instance,
                                     "--bpffs-root", root, "--poll-interval", "0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: set(spread(client.ns, VIP, 80, 30, timeout=0.5)) == {"a", "b", "c"},
                   timeout=30)
        st = _status(tb, instance)
        assert st["services"] == [{
            "name": "default/web:http",
            "frontend": {"ip": VIP, "port": 80, "protocol": "TCP"},
            "backends": [{"ip": i, "port": 8080} for i in sorted(ips(tb))]}]
        assert {(a["interface"], a["direction"]) for a in st["attachments"]} >= {
            (tb.pods[n].host_if, d) for n in "abc" for d in ("ingress", "egress")}

        # Remove b with an atomic rename; new connections avoid it.
        write_objects(str(manifest), [service_obj("web", VIP, ports),
                                      slice_obj("web", ips(tb, "ac"), target)])
        wait_until(lambda: len(_status(tb, instance)["services"][0]["backends"]) == 2,
                   timeout=30)
        assert set(spread(client.ns, VIP, 80, 60)) == {"a", "c"}

        # An invalid object is reported by name and field; the valid one stays.
        bad = service_obj("broken", "10.96.0.77", [("x", 70000, "TCP")])
        write_objects(str(manifest), [service_obj("web", VIP, ports), bad,
                                      slice_obj("web", ips(tb, "ac"), target)])
        time.sleep(0.5)
        assert set(spread(client.ns, VIP, 80, 20)) == {"a", "c"}

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and time.monotonic() - t0 < 5
        assert "Service default/broken: spec.ports[0].port: must be an integer 1-65535, " \
               "got 70000" in out
        # Documented: after exit, forwarding continues (programs and maps stay).
        assert set(spread(client.ns, VIP, 80, 20)) == {"a", "c"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    for _ in range(2):  # cleanup is idempotent
        r = subprocess.run(kpr_argv(tb.node, "cleanup", "--bpffs-root", root),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert tc.list_attachments(tb.node) == []
    assert not (TEST_PIN_ROOT / instance).exists()
    # nothing left: status says so, where it looked, and exits 1 (text and JSON)
    for extra in ([], ["--json"]):
        r = subprocess.run(kpr_argv(tb.node, "status", "--instance", instance, "--bpffs-root",
                                    root, *extra), capture_output=True, text=True)
        assert r.returncode == 1, (extra, r.stdout, r.stderr)
        assert "nothing programmed" in r.stderr and str(TEST_PIN_ROOT / instance) in r.stderr
    assert json.loads(r.stdout)["datapath"] is None
    for n in "abc":
        qd = sh("tc", "-n", tb.node, "qdisc", "show", "dev", tb.pods[n].host_if).stdout
        assert "clsact" not in qd
    assert os.path.ismount("/sys/fs/bpf")

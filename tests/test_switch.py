"""Choosing and switching datapaths through the real ``kpr run``: ``auto`` falls back
to nftables when bpf() is denied, and a restart with another datapath (every one
this machine has: ebpf, nftables, iptables over both back ends) under live
traffic leaves nothing of the previous one behind. The switches into and out of
IPVS run in the VM (tests/test_ipvs_vm.py): this kernel has no IPVS, so each has
its own sequence."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.datapaths.ebpf import tc
from controller.datapaths.ipvs.datapath import IpvsConfig, IpvsDatapath
from controller.testbed import (
    Testbed,
    in_netns,
    kpr_argv,
    probe,
    service_obj,
    slice_obj,
    wait_until,
    write_objects,
)
from tests.conftest import TEST_PIN_ROOT

pytestmark = pytest.mark.kernel
VIP = "10.96.0.10"
NOBPF = str(Path(__file__).parent / "tools" / "nobpf.py")


@dataclass
class Node:
    tb: Testbed
    manifest: Path
    instance: str
    log: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, *args: str, wrap: list[str] | None = None) -> subprocess.Popen[str]:
        argv = kpr_argv(self.tb.node, "run", "--source", f"file:{self.manifest}",
                        "--interfaces", f"{self.tb.prefix}p*", "--instance", self.instance,
                        "--bpffs-root", str(TEST_PIN_ROOT), "--poll-interval", "0.1",
                        "--min-sync-period", "50ms", "--metrics-bind-address", "",
                        "--healthz-bind-address", "", "--cgroup-root", "none", *args)
        if wrap:  # nsenter ... python -m controller.cli -> nsenter ... python WRAP python -m
            argv = argv[:2] + [sys.executable, *wrap, *argv[2:]]
        out = open(self.log, "a")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[str]) -> None:
        p.terminate()
        p.wait(20)

    def nft_tables(self) -> str:
        return in_netns(self.tb.node, lambda: subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True).stdout)

    def ipt_chains(self, backend: str) -> int:
        """kpr's chains in one iptables back end, both families."""
        return sum(in_netns(self.tb.node, lambda fam=fam: subprocess.run(
            [f"{fam}tables-{backend}-save"], capture_output=True, text=True).stdout
        ).count("\n:KPR-") for fam in ("ip", "ip6"))

    def ipvs(self) -> bool:
        """Anything of the IPVS datapath: its companion table or its dummy link."""
        return "table ip kpr-ipvs\n" in self.nft_tables() or "kpr-ipvs0" in in_netns(
            self.tb.node, lambda: subprocess.run(["ip", "link"], capture_output=True,
                                                 text=True).stdout)

    def filters(self) -> list[str]:
        return [a.name for a in in_netns(self.tb.node, tc.list_attachments)]

    def status(self) -> dict[str, object]:
        out = subprocess.run(kpr_argv(self.tb.node, "status", "--json", "--instance",
                                      self.instance, "--bpffs-root", str(TEST_PIN_ROOT)),
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def node(testbed: Testbed, tmp_path: Path) -> Iterator[Node]:
    tb = testbed
    for n in ("a", "b"):
        tb.add_pod(n)
        tb.serve(n, 8080)
    tb.add_pod("client")
    manifest = tmp_path / "svc.yaml"
    write_objects(str(manifest), [
        service_obj("web", VIP, [("http", 80, "TCP")]),
        slice_obj("web", [tb.pods["a"].ip, tb.pods["b"].ip], [("http", 8080, "TCP")])])
    n = Node(tb, manifest, f"sw-{tb.prefix}", tmp_path / "kpr.log")
    try:
        yield n
    finally:
        for p in n.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(kpr_argv(tb.node, "cleanup", "--instance", n.instance, "--bpffs-root",
                                str(TEST_PIN_ROOT)), capture_output=True)


def _serving(n: Node) -> bool:
    return isinstance(probe(n.tb.pods["client"].ns, VIP, 80, timeout=0.5), tuple)


def test_auto_picks_nftables_when_bpf_is_denied(node: Node) -> None:
    p = node.run("--proxy-mode", "auto", wrap=[NOBPF])
    wait_until(lambda: p.poll() is None and _serving(node), timeout=60)
    log = node.log.read_text()
    assert "mode auto: ebpf rejected: the bpf() syscall fails: Operation not permitted" in log
    assert "mode auto: chose nftables" in log
    assert "table ip kpr" in node.nft_tables() and node.filters() == []
    assert node.status()["datapath"] == "nftables"
    answers = {probe(node.tb.pods["client"].ns, VIP, 80)[0] for _ in range(16)}  # type: ignore[index]
    assert answers == {"a", "b"}
    node.stop(p)


class Load:
    """New TCP connections to the Service, back to back, from the client pod; counts
    the ones that fail (refused, reset, timed out)."""

    def __init__(self, ns: str) -> None:
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=in_netns, args=(ns, self._run),
                                   kwargs={"timeout": 600}, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                with socket.create_connection((VIP, 80), timeout=1.0) as s:
                    s.sendall(b"hi\n")
                    if not s.recv(100):
                        raise ConnectionResetError("closed")
                self.ok += 1
            except OSError as e:
                self.failed.append(type(e).__name__)
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)


SWITCHES = ("nftables", "iptables-nft", "iptables-legacy", "ebpf", "iptables-nft", "ebpf",
            "nftables")
"""Every datapath here, each one entered from at least two others."""
SWITCHES_IPVS = ("ipvs", "iptables-nft", "ipvs", "nftables")
"""In the VM, from nftables: IPVS entered from, and left to, both rule writers
(iptables-legacy shares iptables-nft's code and order; each switch costs about 20 s
of emulated CPU)."""


@pytest.mark.parametrize("first,switches", [
    pytest.param("ebpf", SWITCHES, id="host"),
    pytest.param("nftables", SWITCHES_IPVS, id="ipvs", marks=pytest.mark.skipif(
        not IpvsDatapath(IpvsConfig()).probe().ok,
        reason="this kernel has no IPVS (tests/test_ipvs_vm.py runs this in a VM)"))])
def test_switching_datapaths_under_traffic_leaves_nothing_behind(
        node: Node, first: str, switches: tuple[str, ...]) -> None:
    pin_dir = TEST_PIN_ROOT / node.instance

    def only(mode: str) -> bool:
        """What ``mode`` installs is there, and nothing of any other datapath."""
        ebpf = bool(node.filters()) or pin_dir.exists()
        tables = node.nft_tables()
        ipt = {b: node.ipt_chains(b) for b in ("nft", "legacy")}
        # iptables-nft's own nat and filter tables go with kpr's chains (nothing
        # else here uses them)
        nft_ipt_tables = "table ip nat\n" in tables or "table ip6 filter\n" in tables
        return (ebpf == (mode == "ebpf")
                and ("table ip kpr\n" in tables) == (mode == "nftables")
                and bool(ipt["nft"]) == (mode == "iptables-nft") == nft_ipt_tables
                and bool(ipt["legacy"]) == (mode == "iptables-legacy")
                and node.ipvs() == (mode == "ipvs"))

    p = node.run("--proxy-mode", first)
    wait_until(lambda: _serving(node), timeout=60)
    load = Load(node.tb.pods["client"].ns)
    try:
        report = []
        for mode in switches:
            before_ok, before_failed = load.ok, len(load.failed)
            node.stop(p)  # no cleanup on exit: the old datapath keeps forwarding
            flags = ["--proxy-mode", mode] if not mode.startswith("iptables") else \
                ["--proxy-mode", "iptables", "--iptables-backend", mode.split("-")[1]]
            p = node.run(*flags)
            wait_until(lambda: only(mode), timeout=30)
            assert node.status()["datapath"] == mode.split("-")[0]
            time.sleep(0.5)  # traffic on the new datapath alone
            report.append((mode, load.ok - before_ok, len(load.failed) - before_failed))
        time.sleep(0.3)
    finally:
        load.stop()
    print(f"switches (to, connections ok, failed): {report}; failures: {load.failed}")
    assert all(ok > 50 for _, ok, _ in report)  # traffic flowed through every switch
    # New connections never meet an empty node (the new datapath is programmed
    # before the old one goes); only a connection in flight at the moment its
    # translation changes hands can break.
    assert len(load.failed) <= 3, load.failed
    # Every mode holds the clsact qdisc on the links eBPF attaches to, so a switch
    # only adds and removes filters: grafting or deleting the qdisc drops what the
    # link sends for a moment (tc.py). `kpr cleanup` removes it (test_traffic.py).
    for n in ("a", "b", "client"):
        qd = in_netns(node.tb.node, lambda n=n: subprocess.run(
            ["tc", "qdisc", "show", "dev", node.tb.pods[n].host_if], capture_output=True,
            text=True).stdout)
        assert "clsact" in qd, (n, qd)
    node.stop(p)

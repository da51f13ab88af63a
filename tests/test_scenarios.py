"""The shared flow table (tests/scenarios.py), IPv4 and IPv6 rows, with real traffic, through ``kpr run
--source file:`` with ``--interfaces``, ``--nodeport-addresses`` and
``--cluster-cidr``, once per datapath under test (``pytest --datapath X``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.testbed import DROP, REJECT, Testbed, kpr_argv, probe, wait_until, write_objects
from tests import scenarios
from tests.conftest import TEST_PIN_ROOT, datapath_flags

pytestmark = pytest.mark.kernel
TRIES = 16  # per backend-set row: two backends are both seen with p > 1 - 2^-15


@dataclass
class Node:
    tb: Testbed
    proc: subprocess.Popen[str]
    log: Path

    def source_ns(self, src: str) -> str:
        if src == "node":
            return self.tb.node
        return self.tb.ext_ns if src == "ext" else self.tb.pods[src].ns  # type: ignore[return-value]

    def source_ip(self, src: str, ipv6: bool) -> str:
        if src == "node":  # the node's address on the pods' links
            ip = scenarios.POD_LINK_IP
        elif src == "ext":
            ip = scenarios.EXT_IP
        else:
            return self.tb.pods[src].ip6 if ipv6 else self.tb.pods[src].ip
        return scenarios.v6(ip) if ipv6 else ip


@pytest.fixture(scope="module")
def node(datapath: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("scenarios")
    with Testbed() as tb:
        for name in scenarios.PODS:
            tb.add_pod(name)
            if name != "client":
                tb.serve(name, scenarios.TARGET)
        tb.add_ext()
        manifest = tmp / "objects.yaml"
        write_objects(str(manifest), scenarios.objects({n: p.ip for n, p in tb.pods.items()},
                                                       {n: p.ip6 for n, p in tb.pods.items()}))
        log = tmp / "kpr.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                kpr_argv(tb.node, "run", *datapath_flags(datapath),
                         "--source", f"file:{manifest}",
                         "--interfaces", f"{tb.prefix}p*,{tb.prefix}x",
                         "--nodeport-addresses", scenarios.NODEPORT_CIDR,
                         "--cluster-cidr", scenarios.CLUSTER_CIDR,
                         "--hostname-override", scenarios.NODE,
                         "--instance", f"sc-{tb.prefix}", "--bpffs-root", str(TEST_PIN_ROOT),
                         "--cleanup-on-exit", "--poll-interval", "0.1"),
                stdout=out, stderr=subprocess.STDOUT, text=True)
        n = Node(tb, proc, log)
        try:
            # programmed: the first IPv4 and IPv6 rows answer (a datapath that is not
            # atomic, IPVS, programs IPv6 frontends last)
            for first in (scenarios.FLOWS[0], scenarios.FLOWS6[0]):
                wait_until(lambda: proc.poll() is None and isinstance(
                    probe(n.source_ns(first.src), first.dst, first.port, timeout=0.3), tuple),
                    timeout=120)
            yield n
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -15):
                print(log.read_text())


@pytest.mark.parametrize("flow", scenarios.FLOWS + scenarios.FLOWS6, ids=str)
def test_flow(node: Node, flow: scenarios.Flow) -> None:
    ns = node.source_ns(flow.src)
    if isinstance(flow.expect, str):
        got = probe(ns, flow.dst, flow.port, flow.proto, timeout=1.0)
        assert got == flow.expect, f"{flow} ({flow.why}): {got}"
        return
    answers = [probe(ns, flow.dst, flow.port, flow.proto) for _ in range(TRIES)]
    assert not any(a in (REJECT, DROP) for a in answers), f"{flow} ({flow.why}): {answers}"
    names = {a[0] for a in answers}
    assert names == flow.expect, f"{flow} ({flow.why}): answered by {sorted(names)}"
    ipv6 = ":" in flow.dst
    node_ip = scenarios.v6(scenarios.NODE_IP) if ipv6 else scenarios.NODE_IP
    seen = {a[1] for a in answers}
    if flow.src == "node":
        # The node is its own client: the backend sees one of its addresses, which
        # one depends on the datapath (socket LB: the source the kernel picks
        # toward the backend; NAT rules: the masquerade address).
        mine = {node_ip, node.source_ip("node", ipv6)}
        assert len(seen) == 1 and seen <= mine, f"{flow} ({flow.why}): backends saw {seen}"
        return
    want = node_ip if flow.masq else node.source_ip(flow.src, ipv6)
    assert seen == {want}, f"{flow} ({flow.why}): backends saw {seen}, want {want}"

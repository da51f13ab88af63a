"""Shared fixtures.

Kernel tests (marker ``kernel``) need root. Outside CI they skip without it; in CI
(``CI=true``) a missing privilege is a failure, never a skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from controller.datapaths.ebpf.datapath import EbpfConfig, EbpfDatapath
from controller.testbed import Testbed, sh

IN_CI = os.environ.get("CI", "").lower() == "true"
TEST_PIN_ROOT = Path("/sys/fs/bpf/kpr-test")


DATAPATHS = ("ebpf", "nftables", "iptables", "iptables-legacy", "ipvs")
"""Datapaths the shared flow table can run against (iptables: its nft back end)."""
DEFAULT_DATAPATHS = DATAPATHS[:-1]
"""What runs by default: this machine's kernel has no IPVS, so tests/test_ipvs_vm.py
runs ``--datapath ipvs`` inside a VM whose kernel has it."""


def datapath_flags(datapath: str) -> list[str]:
    """The ``kpr run`` flags that select a datapath of DATAPATHS."""
    if datapath.startswith("iptables-"):
        return ["--proxy-mode", "iptables", "--iptables-backend", datapath.split("-", 1)[1]]
    if datapath == "iptables":
        return ["--proxy-mode", "iptables", "--iptables-backend", "nft"]
    return ["--proxy-mode", datapath]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--datapath", action="append", default=[],
                     help=f"datapath(s) for the flow table: {', '.join(DATAPATHS)} "
                          "(default: all)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "datapath" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("datapath") or list(DEFAULT_DATAPATHS)
        unknown = [d for d in chosen if d not in DATAPATHS]
        if unknown:
            raise pytest.UsageError(f"--datapath {unknown[0]}: not one of {DATAPATHS}")
        metafunc.parametrize("datapath", chosen, scope="module")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    kernel_items = [i for i in items if "kernel" in i.keywords]
    if kernel_items and IN_CI:
        raise pytest.UsageError("CI must run as root: kernel tests may not skip in CI")
    for item in kernel_items:
        item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    with Testbed() as tb:
        yield tb


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace of this test's own, always removed."""
    ns = f"kprt{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


def new_datapath(interfaces: list[str] | None = None, netns: str | None = None,
                 **kw: Any) -> EbpfDatapath:
    kw.setdefault("instance", f"t{secrets.token_hex(4)}")
    return EbpfDatapath(EbpfConfig(interfaces=interfaces or [], pin_root=TEST_PIN_ROOT,
                                   netns=netns, **kw))


@pytest.fixture
def datapath_factory() -> Iterator[object]:
    """Creates datapaths with unique pin dirs; removes them all afterwards."""
    made: list[EbpfDatapath] = []

    def make(interfaces: list[str] | None = None, netns: str | None = None,
             start: bool = True, **kw: Any) -> EbpfDatapath:
        dp = new_datapath(interfaces, netns, **kw)
        made.append(dp)
        if start:
            dp.start()
        return dp

    yield make
    for dp in made:
        dp.cleanup()  # also closes its map and program fds: pins gone, maps freed


@pytest.fixture(scope="module")
def nodeport_ns() -> Iterator[str]:
    """A network namespace of this module's own with a NodePort address in each
    family (on a veth: this kernel has no dummy module), always removed."""
    ns = f"kprn{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "e0", "type", "veth", "peer", "name", "e1")
        sh("ip", "-n", ns, "addr", "add", "172.16.0.1/24", "dev", "e0")
        sh("ip", "-n", ns, "addr", "add", "fd00:16::1/64", "dev", "e0", "nodad")
        sh("ip", "-n", ns, "link", "set", "e0", "up")
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)

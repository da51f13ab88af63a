"""Shared fixtures.

Kernel tests (marker ``kernel``) need root. Outside CI they skip without it; in CI
(``CI=true``) a missing privilege is a failure, never a skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.datapaths.ebpf.datapath import EbpfConfig, EbpfDatapath, cleanup
from controller.testbed import Testbed

IN_CI = os.environ.get("CI", "").lower() == "true"
TEST_PIN_ROOT = Path("/sys/fs/bpf/kpr-test")


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


def new_datapath(interfaces: list[str] | None = None, netns: str | None = None) -> EbpfDatapath:
    return EbpfDatapath(EbpfConfig(interfaces=interfaces or [],
                                   instance=f"t{secrets.token_hex(4)}",
                                   pin_root=TEST_PIN_ROOT, netns=netns))


@pytest.fixture
def datapath_factory() -> Iterator[object]:
    """Creates datapaths with unique pin dirs; removes them all afterwards."""
    made: list[EbpfDatapath] = []

    def make(interfaces: list[str] | None = None, netns: str | None = None,
             start: bool = True) -> EbpfDatapath:
        dp = new_datapath(interfaces, netns)
        made.append(dp)
        if start:
            dp.start()
        return dp

    yield make
    for dp in made:
        dp.close()
        cleanup(dp.cfg.pin_dir, dp.cfg.netns)

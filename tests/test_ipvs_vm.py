"""The IPVS datapath's tests, in a VM: this machine's kernel is built without IPVS,
so tests/vm/qemu.py boots Debian's kernel (which has it, as modules) with the host's
root file system, and runs there, unchanged, the shared flow table with
``--datapath ipvs``, tests/test_ipvs.py, and the IPVS cases of tests/test_classic.py,
tests/test_switch.py and the continuity rows (tests/continuity/test_events.py).
One boot for all of them."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.vm import qemu

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)  # one boot runs ~75 tests under emulation: about 5 min
def test_ipvs_datapath_passes_the_flow_table_in_a_vm() -> None:
    missing = [t for t in ("qemu-system-x86_64", "busybox") if shutil.which(t) is None]
    if qemu.find_kernel() is None:
        missing.append("linux-image-amd64")
    if missing:
        if IN_CI:
            pytest.fail(f"missing in CI: {missing} (the Makefile installs them)")
        pytest.skip(f"needs {', '.join(missing)} (make test installs them)")
    cmd = (f"cd {ROOT} && CI={os.environ.get('CI', '')} PYTHONDONTWRITEBYTECODE=1 "
           f"{sys.executable} -m pytest -p no:cacheprovider -q -rs --color=no "
           f"--durations=10 tests/test_scenarios.py --datapath ipvs tests/test_ipvs.py "
           f"tests/test_classic.py tests/test_switch.py tests/continuity/test_events.py -k ipvs")
    r = qemu.run(cmd, timeout=900)
    print(r.output)
    assert r.rc == 0, r.output[-6000:] or r.console[-4000:]
    assert "passed" in r.output and "skipped" not in r.output.split("\n")[-2]

"""Upgrades and rollbacks across releases and map layouts, under traffic.

For each release named in releases.txt: that release's kpr runs the node (its own
source tree, extracted from git history), 24 long-lived connections and a stream of
new ones run through a ClusterIP, then kpr is upgraded to this checkout, rolled back
to the release, and upgraded again, each step a SIGTERM and a start as a DaemonSet
rolling update does it. Nothing may break: no long-lived connection reset, moved or
timed out, no new connection failed.
"""

from __future__ import annotations

import time

import pytest

from tests.continuity.conftest import VIP, wait_serving
from tests.continuity.harness import (
    REPO,
    Kpr,
    LongLived,
    NewConns,
    Row,
    release_tree,
    releases,
)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


@pytest.mark.parametrize("release", sorted(releases()))
def test_upgrade_rollback_upgrade_keeps_every_connection(kpr: Kpr, release: str) -> None:
    old = release_tree(releases()[release])
    p = kpr.run("--proxy-mode", "ebpf", tree=old)
    kpr.wait_running(p)
    wait_serving(kpr)
    client = kpr.tb.pods["client"].ns
    flows = LongLived(client, VIP, 80, n=24, udp=8)
    new = NewConns(client, VIP, 80)
    report = []
    try:
        for step, tree in (("upgrade", REPO), ("rollback", old), ("upgrade again", REPO)):
            ok0, failed0, broken0 = new.ok, sum(new.failed.values()), len(flows.broken)
            time.sleep(1.0)
            kpr.stop(p)
            p = kpr.run("--proxy-mode", "ebpf", tree=tree)
            kpr.wait_running(p)
            time.sleep(1.5)  # traffic on the new programs alone
            report.append((step, len(flows.broken) - broken0, new.ok - ok0,
                           sum(new.failed.values()) - failed0))
            what = {"upgrade": f"upgrade from {release} to this checkout",
                    "rollback": f"rollback to {release}",
                    "upgrade again": f"upgrade from {release} again, after the rollback"}
            Row(what[step], "ebpf", *report[-1][1:]).record()
    finally:
        failed = new.stop()
        broken = flows.stop()
    print(f"{release}: (step, long-lived broken, new ok, new failed): {report}; "
          f"broken: {broken}; new failures: {dict(failed)}")
    log = kpr.log.read_text()
    if release.startswith("v3"):
        assert "upgrading" in log and "from map layout v3" in log, kpr.tail()
        assert "left layout v3's maps beside v4's for a rollback" in log, kpr.tail()
    assert all(ok > 20 for _, _, ok, _ in report), report  # traffic through every step
    assert broken == {}, (report, broken)
    assert not failed, (report, dict(failed))
    kpr.stop(p)

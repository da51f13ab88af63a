"""50,000 Services on real maps: one change costs one Service's work.

Operation counts, never times (times are the benchmark's job): the tracker's work
counter (Services translated + entries compared), the datapath's kernel operations,
and which kind of sync ran.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from controller.bench.coldstart import cold_start
from controller.testbed import slice_obj, wait_until

pytestmark = pytest.mark.kernel

N = 50_000


def _count_in_kernel(dp: Any, vip: str, port: int) -> int | None:
    """The backend count of one frontend, read from the services map itself (an IPv4
    address as ::ffff:a.b.c.d)."""
    key = struct.pack("=16sHBB", bytes(10) + b"\xff\xff" + socket.inet_aton(vip),
                      socket.htons(port), 6, 0)
    for k, v in dp.maps.services.items():
        if k == key:
            return int(struct.unpack("=IHHIB3x", v)[1])
    return None


def test_one_change_among_50000_services_costs_one_service(datapath_factory: Any) -> None:
    dp = datapath_factory()
    cs = cold_start(N, dp, separate_process=False)
    try:
        assert cs.frontends == N and dp.maps.services.count() == N
        t, proxier = cs.tracker, cs.proxier
        syncs, fulls = proxier.stats.syncs, proxier.stats.full_syncs

        # One endpoint added to one Service, through the API server's watch.
        work = t.counters.work
        eps = ["10.128.0.14", "10.128.0.15", "10.200.0.1"]
        sl = slice_obj("svc-7", eps, [("http", 8080, "TCP")], namespace="bench")
        cs.server.apply(sl)
        wait_until(lambda: t.pending() == (0, 1), timeout=20)
        assert proxier.sync()
        assert proxier.stats.syncs == syncs + 1 and proxier.stats.full_syncs == fulls
        assert t.counters.work - work == 2  # 1 Service translated + 1 entry compared
        # backend write + slot write + member write + service count: 4 kernel operations
        assert proxier.stats.last_ops == 4
        assert _count_in_kernel(dp, "10.96.0.8", 80) == 3

        # One Service deleted (with its slice): its entries go, nothing else is touched.
        work = t.counters.work
        cs.server.delete("Service", "svc-9", "bench")
        cs.server.delete("EndpointSlice", "svc-9-abcde", "bench")
        wait_until(lambda: t.pending() == (1, 1), timeout=20)
        assert proxier.sync()
        assert proxier.stats.full_syncs == fulls
        assert t.counters.work - work == 2
        # service + name + ClusterIP marker + 2 slots + 2 members + 2 backends
        assert proxier.stats.last_ops == 9
        assert _count_in_kernel(dp, "10.96.0.10", 80) is None
        assert dp.maps.services.count() == N - 1

        # An update that changes nothing kpr uses: no kernel operation at all.
        sl2 = dict(sl, metadata=dict(sl["metadata"], labels=dict(
            sl["metadata"]["labels"], team="blue")))
        cs.server.apply(sl2)
        slices = cs.source.reflectors[1]
        wait_until(lambda: int(slices.resource_version) >= cs.server.resource_version,
                   timeout=20)
        assert t.pending() == (0, 0)  # dropped as a no-op by the tracker
        ops_before = proxier.stats.syncs
        assert proxier.sync()
        assert proxier.stats.syncs == ops_before  # nothing to program: no datapath call
    finally:
        cs.close()

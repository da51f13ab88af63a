"""The IPVS writer's sync logic against a fake IPVS that keeps the kernel's rules
(adding what exists fails with EEXIST, changing or deleting what does not with
ENOENT), so random sequences of partial syncs run here in milliseconds. The
companion nftables table is real, in a namespace of the test's own. The same
property runs against the real IPVS in the VM (tests/test_ipvs.py); this one finds
the sequences, that one proves the kernel agrees."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2 import NetlinkError

from controller.datapaths.ipvs import render
from controller.datapaths.ipvs.datapath import Held, IpvsConfig, IpvsDatapath
from controller.model import Diff, IPAddress, State
from tests.shapes import rich_entry, states

pytestmark = pytest.mark.kernel
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/64"))
Key = tuple[Any, ...]


class FakeIPVS:
    """Virtual services and real servers as the kernel's ip_vs_ctl.c keeps them:
    one service per (af, fwmark) or (af, protocol, addr, port); every write is
    checked the way the kernel checks it."""

    def __init__(self) -> None:
        self.services: dict[Key, dict[str, Any]] = {}
        self.dests: dict[Key, dict[tuple[str, int], int]] = {}
        self.writes = 0

    @staticmethod
    def key(s: Any) -> Key:
        if s.get("fwmark"):
            return (s["af"], s["fwmark"])
        return (s["af"], s["protocol"], str(ipaddress.ip_address(s["addr"])), s["port"])

    def service(self, cmd: str, service: Any = None) -> list[Any]:
        k = self.key(service)
        if cmd == "dump":
            raise AssertionError("the fake is read through IpvsDatapath._read")
        self.writes += 1
        if cmd == "add":
            if k in self.services:
                raise NetlinkError(17, f"service {k} exists")
            self.services[k] = {f: service[f] for f in ("sched_name", "timeout")}
            self.dests[k] = {}
        elif cmd in ("set", "del"):
            if k not in self.services:
                raise NetlinkError(3, f"no service {k}")  # ESRCH, as ip_vs_ctl.c
            if cmd == "set":
                self.services[k] = {f: service[f] for f in ("sched_name", "timeout")}
            else:
                del self.services[k], self.dests[k]
        else:
            raise AssertionError(f"service({cmd!r}): the writer never sends it")
        return []

    def dest(self, cmd: str, service: Any, dest: Any = None) -> list[Any]:
        k = self.key(service)
        if k not in self.services:
            raise NetlinkError(3, f"no service {k}")
        d = (str(ipaddress.ip_address(dest["addr"])), int(dest["port"]))
        self.writes += 1
        have = self.dests[k]
        if cmd == "add":
            if d in have:
                raise NetlinkError(17, f"real server {d} of {k} exists")
            have[d] = dest["weight"]
        elif cmd in ("set", "del"):
            if d not in have:
                raise NetlinkError(2, f"no real server {d} in {k}")
            if cmd == "set":
                have[d] = dest["weight"]
            else:
                del have[d]
        else:
            raise AssertionError(f"dest({cmd!r}): the writer never sends it")
        return []

    def read(self, nodeport_ips: Any = ()) -> dict[render.VKey, Held]:
        out = {}
        for k, dests in self.dests.items():
            version = 4 if k[0] == socket.AF_INET else 6
            vk = render.VKey(version, 0, "", 0, k[1]) if len(k) == 2 else \
                render.VKey(version, k[1], k[2], k[3])
            s = self.services[k]
            out[vk] = Held(s["sched_name"], s["timeout"], {d: (w, 0) for d, w in dests.items()})
        return out


def serving(held: dict[render.VKey, Held]) -> dict[Any, Any]:
    """What traffic sees of IPVS: each virtual service with its scheduler, timeout
    and the real servers that take new connections (weight > 0). Firewall-mark
    services are listed by family: a mark is an ID, which one depends on history."""
    out: dict[Any, Any] = {}
    for k, h in held.items():
        v = (h.scheduler, h.timeout, sorted(d for d, (w, _) in h.dests.items() if w > 0))
        if k.fwmark:
            out.setdefault((k.version, "fwmark"), []).append(v)
        else:
            out[k] = v
    return {k: sorted(v) if isinstance(v, list) else v for k, v in out.items()}


def fake_datapath(ns: str, ipvs: FakeIPVS) -> IpvsDatapath:
    """The writer with IPVS and the dummy link faked, nftables real; no reaper
    thread, so real servers removed from TCP services stay draining (weight 0)."""
    dp = IpvsDatapath(IpvsConfig(netns=ns, cluster_cidrs=CIDRS))
    vips: set[IPAddress] = set()

    def set_vips(add: Any, delete: Any) -> None:
        vips.update(add)
        vips.difference_update(delete)
    dp._local.ipvs = ipvs
    dp._read = ipvs.read  # type: ignore[method-assign]
    dp._link = lambda: 1  # type: ignore[method-assign]
    dp._link_addrs = lambda: set(vips)  # type: ignore[method-assign]
    dp._set_vips = set_vips  # type: ignore[method-assign]
    return dp


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=6))
def test_incremental_syncs_end_where_one_full_sync_ends(
        nodeport_ns: str, seq: list[dict[int, tuple[list[int], int]]]) -> None:
    ipvs = FakeIPVS()
    dp = fake_datapath(nodeport_ns, ipvs)
    prev = State()
    dp.sync(prev, None)
    for spec in seq:
        cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
        r = dp.sync(cur, Diff.between(prev, cur))
        assert not r.full
        assert dp.dump() == dp.canonical(cur.values())
        prev = cur
    incremental = serving(ipvs.read())
    writes = ipvs.writes
    assert dp.sync(prev, None).full
    assert ipvs.writes == writes, "a full sync after partial ones found IPVS out of date"
    fresh = FakeIPVS()
    fresh_dp = fake_datapath(nodeport_ns, fresh)
    fresh_dp.sync(prev, None)
    assert incremental == serving(fresh.read())


def test_a_backend_that_comes_back_while_draining_is_reused(nodeport_ns: str) -> None:
    """A TCP real server removed by one sync drains at weight 0; the next sync
    that wants it back sets its weight again (adding it would fail: it exists)."""
    ipvs = FakeIPVS()
    dp = fake_datapath(nodeport_ns, ipvs)
    a, b = State([rich_entry(0, [1, 2], 0)]), State([rich_entry(0, [1], 0)])
    dp.sync(a, None)
    dp.sync(b, Diff.between(a, b))
    (k,) = ipvs.dests
    assert ipvs.dests[k] == {("10.244.0.1", 8080): 1, ("10.244.0.2", 8080): 0}
    dp.sync(a, Diff.between(b, a))
    assert ipvs.dests[k] == {("10.244.0.1", 8080): 1, ("10.244.0.2", 8080): 1}

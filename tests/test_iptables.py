"""The iptables writer against real tables in a network namespace, over both back
ends (iptables-nft and iptables-legacy): what it reads back, partial syncs against
full ones, failure recovery, and cleanup that leaves other rules alone. (Traffic
through it is the shared flow table's, tests/test_scenarios.py, and
tests/test_classic.py's.)"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datapaths.base import DatapathError
from controller.datapaths.iptables import render
from controller.datapaths.iptables.datapath import (
    IptablesConfig,
    IptablesDatapath,
    cleanup,
    parse_save,
)
from controller.model import Diff, State
from controller.testbed import sh
from tests.shapes import rich_entry, states

pytestmark = pytest.mark.kernel
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/64"))


@pytest.fixture(scope="module", params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def mod_ns() -> Iterator[str]:
    ns = f"kipt{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def dp(mod_ns: str, backend: str) -> Iterator[IptablesDatapath]:
    d = IptablesDatapath(IptablesConfig(netns=mod_ns, backend=backend, cluster_cidrs=CIDRS))
    assert d.probe().ok
    yield d
    cleanup(mod_ns)


def save(ns: str, backend: str) -> str:
    return "".join(sh("nsenter", f"--net=/run/netns/{ns}", f"{fam}tables-{backend}-save").stdout
                   for fam in ("ip", "ip6"))


SHARED = (render.FRONTENDS, render.NODEPORTS, render.NOEP, render.NOEP_NP, render.CLUSTER_IPS)
"""Chains with one rule per frontend (or ClusterIP). Their rules match disjoint
packets, so their order is not behaviour: a partial sync appends, a full sync
writes them in the State's order."""


def snapshot(ns: str, backend: str) -> dict[str, dict[str, list[str]]]:
    """Both families' nat and filter tables: every chain with its rules, in order
    (in any order for the SHARED chains)."""
    out: dict[str, dict[str, list[str]]] = {}
    for fam in ("ip", "ip6"):
        text = sh("nsenter", f"--net=/run/netns/{ns}", f"{fam}tables-{backend}-save").stdout
        for table, chains in parse_save(text).items():
            out[f"{fam} {table}"] = {c: sorted(r) if c in SHARED else r
                                     for c, r in chains.items()}
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=5))
def test_incremental_syncs_end_where_one_full_sync_ends(
        dp: IptablesDatapath, mod_ns: str, backend: str,
        seq: list[dict[int, tuple[list[int], int]]]) -> None:
    prev = State()
    dp.sync(prev, None)
    for spec in seq:
        cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
        dp.sync(cur, Diff.between(prev, cur))
        assert dp.dump() == dp.canonical(cur.values())  # read back from the kernel
        prev = cur
    incremental = snapshot(mod_ns, backend)
    r = dp.sync(prev, None)
    assert r.full and dp.dump() == dp.canonical(prev.values())
    assert snapshot(mod_ns, backend) == incremental  # every chain and rule, in order


def test_partial_sync_touches_only_the_changed_service(dp: IptablesDatapath) -> None:
    big = State(rich_entry(i, [1, 2, 3], i) for i in range(200))
    dp.sync(big, None)
    one = rich_entry(7, [1, 2, 3, 4], 7)
    after = State([*(e for e in big.values() if e.frontend != one.frontend), one])
    r = dp.sync(after, Diff.between(big, after))
    assert not r.full and 0 < r.ops <= 20  # the entry's own chains, not 200 services'
    assert dp.dump() == dp.canonical(after.values())


def test_a_failed_restore_changes_nothing_and_a_full_sync_repairs(
        dp: IptablesDatapath, mod_ns: str, backend: str) -> None:
    s1 = State(rich_entry(i, [1, 2], 0) for i in range(0, 8, 4))  # IPv4 ClusterIPs
    dp.sync(s1, None)
    # Someone deletes kpr's rule for a Service behind its back: the next partial
    # sync, which deletes that rule, fails as a whole.
    gone = next(iter(s1.values()))
    rule = render.render(gone, dp.node).rule
    assert rule is not None
    sh("nsenter", f"--net=/run/netns/{mod_ns}", f"iptables-{backend}", "-t", rule[0], "-D",
       rule[1], *__import__("shlex").split(rule[2]))
    damaged = snapshot(mod_ns, backend)
    s2 = State(e for e in s1.values() if e.frontend != gone.frontend)
    with pytest.raises(DatapathError, match="restore failed"):
        dp.sync(s2, Diff.between(s1, s2))
    assert snapshot(mod_ns, backend) == damaged
    dp.sync(s2, None)  # what the proxier does after a failure
    assert dp.dump() == dp.canonical(s2.values())


def test_cleanup_removes_every_kpr_chain_and_jump_and_nothing_else(
        netns: str, backend: str) -> None:
    pre = ["nsenter", f"--net=/run/netns/{netns}"]
    for fam in ("ip", "ip6"):  # somebody else's rules, before and after kpr's
        sh(*pre, f"{fam}tables-{backend}", "-t", "nat", "-N", "OTHER")
        sh(*pre, f"{fam}tables-{backend}", "-t", "nat", "-A", "PREROUTING", "-j", "OTHER")
        sh(*pre, f"{fam}tables-{backend}", "-A", "INPUT", "-p", "tcp", "--dport", "22",
           "-j", "ACCEPT")
    before = save(netns, backend)
    d = IptablesDatapath(IptablesConfig(netns=netns, backend=backend))
    d.sync(State([rich_entry(i, [1], i) for i in range(8)]), None)
    d.sync(State([rich_entry(i, [1], i) for i in range(8)]), None)  # hooks not doubled
    text = save(netns, backend)
    assert text.count("-j KPR-SERVICES") == 4  # PREROUTING and OUTPUT, both families
    assert text.count("-A INPUT -m conntrack --ctstate NEW") == 2
    assert cleanup(netns) > 0
    after = save(netns, backend)
    assert "KPR" not in after

    def rules(t: str) -> list[str]:
        return sorted(x for x in t.splitlines() if x.startswith(("-A", ":")))
    assert rules(after) == rules(before)  # the other rules, untouched
    assert cleanup(netns) == 0

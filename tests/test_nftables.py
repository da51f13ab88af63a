"""The nftables writer against real tables in a network namespace: what it reads
back, partial syncs against full ones, failure recovery. (Traffic through it is
the shared flow table's, tests/test_scenarios.py, and tests/test_classic.py's.)"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.datapaths.base import DatapathError
from controller.datapaths.nftables.datapath import NftablesConfig, NftablesDatapath, cleanup
from controller.model import Diff, State
from controller.testbed import sh
from tests.shapes import rich_entry, states

pytestmark = pytest.mark.kernel
CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/64"))


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    ns = f"knft{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def dp(netns: str) -> NftablesDatapath:
    d = NftablesDatapath(NftablesConfig(netns=netns, cluster_cidrs=CIDRS))
    assert d.probe().ok
    return d


def snapshot(ns: str) -> dict[str, Any]:
    """Both tables as data, without handles and in a canonical order: chains with
    their rules, sets and maps with their elements."""
    out: dict[str, Any] = {}
    for fam in ("ip", "ip6"):
        p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "nft", "-j", "list", "table",
                            fam, "kpr"], capture_output=True, text=True, check=True)
        for o in json.loads(p.stdout)["nftables"]:
            (kind, body), = o.items()
            if kind in ("metainfo", "table"):
                continue
            body = {k: v for k, v in body.items() if k != "handle"}
            if kind == "rule":
                out.setdefault(f"{fam} chain {body['chain']}", {}).setdefault(
                    "rules", []).append(json.dumps(body["expr"], sort_keys=True))
            elif kind == "chain":
                out.setdefault(f"{fam} chain {body['name']}", {})["decl"] = body
            else:
                elems = sorted(json.dumps(e, sort_keys=True) for e in body.pop("elem", []))
                out[f"{fam} {kind} {body['name']}"] = (body, elems)
    return out


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.lists(states, min_size=1, max_size=5))
def test_incremental_syncs_end_where_one_full_sync_ends(
        dp: NftablesDatapath, netns: str, seq: list[dict[int, tuple[list[int], int]]]) -> None:
    prev = State()
    dp.sync(prev, None)
    for spec in seq:
        cur = State(rich_entry(i, bes, v) for i, (bes, v) in spec.items())
        dp.sync(cur, Diff.between(prev, cur))
        assert dp.dump() == dp.canonical(cur.values())  # read back from the kernel
        prev = cur
    incremental = snapshot(netns)
    r = dp.sync(prev, None)
    assert r.full and dp.dump() == dp.canonical(prev.values())
    assert snapshot(netns) == incremental  # every chain, rule, set and element


def test_partial_sync_touches_only_the_changed_service(dp: NftablesDatapath) -> None:
    big = State(rich_entry(i, [1, 2, 3], i) for i in range(200))
    dp.sync(big, None)
    one = rich_entry(7, [1, 2, 3, 4], 7)
    after = State([*(e for e in big.values() if e.frontend != one.frontend), one])
    r = dp.sync(after, Diff.between(big, after))
    assert not r.full and 0 < r.ops <= 20  # the entry's own chains, not 200 services'
    assert dp.dump() == dp.canonical(after.values())


def test_a_failed_transaction_changes_nothing_and_a_full_sync_repairs(
        dp: NftablesDatapath, netns: str) -> None:
    s1 = State(rich_entry(i, [1, 2], 0) for i in range(4))
    dp.sync(s1, None)
    before = snapshot(netns)
    # Someone deletes an element behind kpr's back: the next partial sync that
    # deletes it fails as a whole, and the kernel keeps the earlier state.
    gone = next(iter(s1.values()))
    sh("nsenter", f"--net=/run/netns/{netns}", "nft", "delete", "element", "ip", "kpr",
       "service-ips", f"{{ {gone.frontend.ip} . {gone.frontend.protocol.name.lower()} . "
       f"{gone.frontend.port} }}")
    damaged = snapshot(netns)
    s2 = State(e for e in s1.values() if e.frontend != gone.frontend)
    with pytest.raises(DatapathError, match="nft transaction"):
        dp.sync(s2, Diff.between(s1, s2))
    assert snapshot(netns) == damaged != before
    dp.sync(s2, None)  # what the proxier does after a failure
    assert dp.dump() == dp.canonical(s2.values())


def test_cleanup_removes_both_tables(netns: str) -> None:
    d = NftablesDatapath(NftablesConfig(netns=netns))
    d.sync(State([rich_entry(1, [1], 0), rich_entry(3, [1], 0)]), None)
    assert cleanup(netns) == 2
    out = sh("nsenter", f"--net=/run/netns/{netns}", "nft", "list", "tables").stdout
    assert "kpr" not in out
    assert cleanup(netns) == 0

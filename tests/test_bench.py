"""``kpr bench --quick`` end to end, as a smoke test: every datapath available here
is programmed at both quick scales, the client's connections all succeed through
each one, and the outputs (JSON, plots, benchmarks.md) are written. It asserts
that the benchmark works, never what it measured: speed is the benchmark's to
report, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.bench.harness import QUICK, available

pytestmark = pytest.mark.kernel


def test_quick_bench_runs_every_datapath_end_to_end(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "controller.cli", "bench", "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "benchmarks.json").read_text())
    modes = [m for m, why in available(()).items() if not why]
    assert {"ebpf", "nftables", "iptables", "iptables-legacy"} <= set(modes)
    for n in QUICK.scales:
        for mode in modes:
            (r,) = [x for x in doc["results"] if x["services"] == n and x["datapath"] == mode]
            assert "error" not in r, r
            for target in ("head", "middle", "tail"):
                lat = r["latency"][target]
                assert lat["count"] == QUICK.connections and lat["errors"] == 0
                assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert r["change_s"]["n"] == QUICK.changes
            assert r["change_to_traffic_s"]["n"] == QUICK.traffic_changes
            assert r["full_ops"] > 0 and r["peak_rss_mb"] > 0
        ebpf = next(x for x in doc["results"] if x["services"] == n and x["datapath"] == "ebpf")
        assert ebpf["bpf"]["runs"] > 0 and ebpf["kernel"]["bpf_memlock_bytes"] > 0
        assert all(v > 0 for v in ebpf["bpf"]["test_run"].values())
        floor = [f for f in doc["floors"] if f["services"] == n]
        assert floor and floor[0]["errors"] == 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| ebpf |" in md and "## eBPF targets" in md
    for png in ("bench-latency.png", "bench-programming.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "kpr bench" in p.stdout  # the terminal table

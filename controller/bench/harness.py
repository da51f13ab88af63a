"""``kpr bench``: every available datapath side by side, control plane and data
plane, in one run on one machine.

The topology is the tests' (controller/testbed.py): a node namespace, backend pods
running nginx (Debian's nginx-light) on port 8080, and a client pod. Each
measurement (controller/bench/one.py) is a process of its own, run in the node
namespace as ``kpr run`` is, so its peak RSS is one controller's. Within a run the
datapaths are interleaved (floor A B C, floor A B C, ... at each scale), and the
summary takes medians over the repeats, so a slow minute of this noisy machine
lands on every datapath alike.

Latency is compared only within one measurement. Beside the three target
Services, each measurement (one.py) times, interleaved ten connections at a
time, the floor (straight to a twin nginx pod through the same node, the
datapath installed) and the reference (to a third nginx pod through a twin node
that no datapath touches, Testbed.add_twin_path). This host's speed changes for
minutes at a time (p50 ~104 or ~130-150 µs for the same path), so a ratio
between two figures taken a minute apart measures the host as much as the
datapath, while one between figures taken within the same milliseconds does
not. ×floor is the issue's ratio, and one datapath's scales compare through it
(the twin pods agree within ×1.01; the twin path within ×1.035); datapaths
compare through ×ref, since a datapath can slow its own floor (iptables' nat
chains see every new connection). The floor is also measured once per round with no datapath
installed, beside the reference: the twin path's calibration.

CPU pinning is off by default: pinned (client on CPU 0, nginx on CPU 1) the floor's
p50 drifted 90-126 µs over six runs of 2,000 connections, unpinned it stayed at
91.4-92.2 µs (two cores here: every packet crossed CPUs when pinned). ``--pin``
turns it on for machines with more cores.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controller.bench.one import TARGETS, connlat, connlat_side_by_side, jit_enabled

ALL_DATAPATHS = ("ebpf", "nftables", "ipvs", "iptables", "iptables-legacy")
"""What the benchmark can compare ("iptables" is its nft back end)."""


@dataclass(frozen=True)
class BenchConfig:
    """What one ``kpr bench`` run measures."""

    scales: tuple[int, ...] = (100, 1000, 10000, 50000)
    """Numbers of Services."""
    endpoints: int = 4
    """Endpoints per Service (2 to 10)."""
    datapaths: tuple[str, ...] = ()
    """Datapaths to compare (empty: every one this machine has)."""
    connections: int = 20000
    """New connections per target and measurement. Two identical paths measured
    side by side over 10,000 connections each differed by up to ×1.09 in p99 here,
    over 20,000 by up to ×1.05 (p50: ×1.01 either way)."""
    repeats: int = 3
    """Interleaved rounds per scale; the summary is the median."""
    changes: int = 20
    """Single-Service changes timed per measurement."""
    traffic_changes: int = 5
    """Changes timed until traffic uses them."""
    pin: bool = False
    """Pin the client and nginx to CPUs."""
    budget_s: float = 600.0
    """Longest full sync a datapath may be expected to take at the next scale
    (extrapolated as O(n²) from the scale before); beyond it, it is skipped there,
    with the reason in the results."""
    out: Path = Path("docs")
    """Where benchmarks.md, the plots and the JSON go."""
    skip: tuple[tuple[str, int], ...] = ()
    """(datapath, scale) pairs not measured (kpr bench --skip), with that reason in
    the results: the budget's O(n²) guess cannot tell 87 s from 104 s apart."""


QUICK = BenchConfig(scales=(100, 1000), connections=2000, repeats=1, changes=20,
                    traffic_changes=3)


def available(wanted: tuple[str, ...]) -> dict[str, str]:
    """Datapath -> "" if it can run here, else why not."""
    from controller import cli

    out: dict[str, str] = {}
    cfg = cli._load_config(cli.build_parser().parse_args(["run", "--cgroup-root", "none"]))
    for mode in wanted or ALL_DATAPATHS:
        if mode not in ALL_DATAPATHS:
            out[mode] = f"unknown datapath (one of {', '.join(ALL_DATAPATHS)})"
            continue
        if mode.startswith("iptables"):
            from controller.datapaths.iptables.datapath import IptablesConfig, IptablesDatapath

            dp: Any = IptablesDatapath(IptablesConfig(
                backend="legacy" if mode == "iptables-legacy" else "nft"))
        else:
            dp = cli._make_datapath(cfg, mode)
        try:
            pr = dp.probe()
            out[mode] = "" if pr.ok else pr.reason
        except Exception as e:  # noqa: BLE001 - a probe that fails says no
            out[mode] = str(e)
        finally:
            if hasattr(dp, "close"):
                dp.close()
    return out


class Nginx:
    """nginx in a pod's namespace, answering its name on port 8080."""

    def __init__(self, ns: str, name: str, cpu: int | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"kpr-bench-nginx-{name}-"))
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    server {{
        listen 8080 backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
""")
        argv = ["ip", "netns", "exec", ns, "nginx", "-c", str(conf), "-p", str(self.dir),
                "-e", str(self.dir / "error.log")]
        if cpu is not None:
            argv[4:4] = ["taskset", "-c", str(cpu)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its PID: nginx's fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def connlat_binary() -> str:
    """The compiled client: next to the interpreter (make builds it), else built now."""
    here = Path(sys.executable).parent / "kpr-connlat"
    if here.exists():
        return str(here)
    src = Path(__file__).with_name("connlat.c")
    out = Path(tempfile.gettempdir()) / "kpr-connlat"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return str(out)


def machine() -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                               / 2**30, 1),
            "bpf_jit": jit_enabled(), "nft": cmd("nft", "--version"),
            "iptables": cmd("iptables", "--version"), "python": platform.python_version()}


@dataclass
class Run:
    """Raw results of one benchmark run."""

    config: dict[str, Any]
    machine: dict[str, Any]
    skipped: dict[str, str]
    results: list[dict[str, Any]] = field(default_factory=list)
    floors: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""


def run(cfg: BenchConfig, progress: Any = None) -> Run:
    """Every measurement of ``cfg``; ``progress(description)`` advances a bar."""
    from controller.testbed import Testbed

    avail = available(cfg.datapaths)
    modes = [m for m, why in avail.items() if not why]
    skipped = {m: why for m, why in avail.items() if why}
    if not modes:
        raise RuntimeError(f"no datapath can run here: {skipped}")
    binary = connlat_binary()
    out = Run(config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              machine=machine(), skipped=skipped, command=" ".join(["kpr", *sys.argv[1:]]))
    cpus = os.cpu_count() or 1
    client_cpu, server_cpu = (0, 1) if cfg.pin and cpus >= 2 else (None, None)
    with Testbed() as tb:
        live = {}
        servers = []
        try:
            for name in ("be0", "be1"):
                pod = tb.add_pod(name)
                live[name] = pod.ip
                servers.append(Nginx(pod.ns, name, server_cpu))
            client = tb.add_pod("client")
            _steady_client(client.ns)
            ref = tb.add_twin_path(client)
            servers.append(Nginx(f"{tb.prefix}-twinpod", "twin", server_cpu))
            client_bin = _pinned_client(binary, client_cpu)
            for ip in (live["be0"], live["be1"], ref):
                _wait_serving(client_bin, client.ns, ip)
            done: dict[str, tuple[int, float]] = {}  # mode -> (scale, median full sync)
            for scale in cfg.scales:
                skip = _over_budget(done, scale, cfg.budget_s)
                for mode, at in cfg.skip:
                    if at == scale and mode in modes:
                        skip[mode] = f"skipped: kpr bench --skip {mode}@{scale}"
                for mode, why in skip.items():
                    out.results.append({"datapath": mode, "services": scale, "skipped": why})
                run_modes = [m for m in modes if m not in skip]
                for rep in range(cfg.repeats):
                    order = run_modes[rep % len(run_modes):] + run_modes[:rep % len(run_modes)] \
                        if run_modes else []
                    if progress:
                        progress(f"{scale} Services: floor (round {rep + 1})")
                    fl = connlat_side_by_side(client_bin, client.ns, {
                        "reference": (ref, 8080), "floor": (live["be0"], 8080)},
                        cfg.connections)
                    out.floors.append({"services": scale, "round": rep, **fl["floor"],
                                       "reference": fl["reference"]})
                    for mode in order:
                        if progress:
                            progress(f"{scale} Services: {mode} (round {rep + 1})")
                        r = _one(tb, mode, scale, cfg, live, client, client_bin, ref)
                        r["round"] = rep
                        out.results.append(r)
                for mode in run_modes:
                    ts = [x["full_sync_s"] for x in out.results if x["services"] == scale
                          and x["datapath"] == mode and "full_sync_s" in x]
                    if ts:
                        done[mode] = (scale, statistics.median(ts))
        finally:
            for s in servers:
                s.stop()
    return out


def _steady_client(ns: str) -> None:
    """TCP timestamps without per-destination random offsets in the client pod.

    nginx closes first, so each connection leaves a TIME_WAIT socket in the backend
    pod for 60 s. The client picks source ports per destination, so a connection to
    one Service address (or the backend's own, for the floor) reuses a port whose
    tuple, after DNAT to the same backend, is still in TIME_WAIT there. Linux
    accepts a SYN into TIME_WAIT when its timestamp is newer; with random offsets
    (tcp_timestamps=1, the offset hashes the destination address) it is newer only
    half the time, and the rejected SYN costs a challenge ACK, an RST and a
    retransmission (TCP_TIMEOUT_MIN later, ~12 ms here): a 12 ms p99 measured on
    every datapath and the floor alike, decided by the order of the runs."""
    from controller.testbed import sh

    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_timestamps=2")


def _over_budget(done: dict[str, tuple[int, float]], scale: int,
                 budget: float) -> dict[str, str]:
    """Datapaths whose full sync at ``scale``, extrapolated as O(n²) from the last
    scale measured, would exceed ``budget`` seconds: mode -> why it is skipped."""
    out = {}
    for mode, (n, t) in done.items():
        est = t * (scale / n) ** 2
        if est > budget:
            out[mode] = (f"skipped: its full sync took {t:.1f} s at {n:,} Services, so about "
                         f"{est:.0f} s (O(n²)) at {scale:,}, over the {budget:.0f} s budget "
                         "(kpr bench --budget)")
    return out


def _pinned_client(binary: str, cpu: int | None) -> str:
    """The client, or a wrapper that runs it on one CPU."""
    if cpu is None:
        return binary
    wrapper = Path(tempfile.gettempdir()) / f"kpr-connlat-cpu{cpu}"
    wrapper.write_text(f"#!/bin/sh\nexec taskset -c {cpu} {binary} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def _wait_serving(binary: str, ns: str, ip: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            connlat(binary, ns, ip, 8080, 5)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _one(tb: Any, mode: str, scale: int, cfg: BenchConfig, live: dict[str, str],
         client: Any, client_bin: str, ref: str) -> dict[str, Any]:
    from controller.testbed import kpr_argv

    instance = f"bench-{tb.prefix}"
    root = "/sys/fs/bpf/kpr-bench"
    argv = ["ip", "netns", "exec", tb.node, sys.executable, "-m", "controller.bench.one",
            "--datapath", mode, "--services", str(scale), "--endpoints", str(cfg.endpoints),
            "--live", json.dumps(live), "--client-ns", client.ns, "--client-ip", client.ip,
            "--connlat", client_bin, "--reference", ref,
            "--connections", str(cfg.connections), "--changes", str(cfg.changes),
            "--traffic-changes", str(cfg.traffic_changes),
            "--interfaces", f"{tb.prefix}p*", "--instance", instance, "--bpffs-root", root]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    # whatever happened, nothing of this datapath stays for the next one
    subprocess.run(kpr_argv(tb.node, "cleanup", "--instance", instance, "--bpffs-root",
                            root), capture_output=True)
    if p.returncode != 0 or not p.stdout.strip():
        return {"datapath": mode, "services": scale, "error": p.stderr.strip()[-2000:]}
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


# ----- summary -------------------------------------------------------------------------

def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(r: Run) -> dict[str, Any]:
    """Medians over rounds: per scale, the floor and each datapath's figures."""
    out: dict[str, Any] = {}
    scales = sorted({x["services"] for x in r.results})
    r_floor = {f["services"] for f in r.floors}
    scales = [n for n in scales if n in r_floor]
    for n in scales:
        floors = [f for f in r.floors if f["services"] == n]
        row: dict[str, Any] = {"floor": {k: _med([f[k] for f in floors])
                                         for k in ("p50", "p90", "p99", "rate")}}
        # the twin path's calibration: the floor over the reference, no datapath
        row["floor"]["x_ref_p50"] = _med([f["p50"] / f["reference"]["p50"] for f in floors
                                          if "reference" in f])
        for mode in dict.fromkeys(x["datapath"] for x in r.results):
            rs = [x for x in r.results if x["services"] == n and x["datapath"] == mode
                  and "error" not in x and "skipped" not in x]
            if not rs:
                why = [x.get("skipped") or x.get("error", "") for x in r.results
                       if x["services"] == n and x["datapath"] == mode]
                row[mode] = {"error": why[-1] if why else "not run"}
                continue
            s: dict[str, Any] = {
                "full_sync_s": _med([x["full_sync_s"] for x in rs]),
                "change_p50_ms": _med([x["change_s"]["p50"] * 1000 for x in rs]),
                "change_p99_ms": _med([x["change_s"]["p99"] * 1000 for x in rs]),
                "change_to_traffic_ms": _med([x["change_to_traffic_s"]["p50"] * 1000
                                              for x in rs]),
                "peak_rss_mb": _med([x["peak_rss_mb"] for x in rs]),
                "kernel": rs[-1].get("kernel", {}),
            }
            for t in ("reference", "floor", *TARGETS):
                for k in ("p50", "p90", "p99", "rate"):
                    s[f"{t}_{k}"] = _med([x["latency"][t][k] for x in rs
                                          if t in x["latency"]])
            # each measurement's ratios to the paths measured beside it, then the
            # median over rounds: x_floor to the floor through this node (the
            # issue's floor), x_ref to the twin path no datapath touches (datapaths
            # compare through it), others_x: the floor's own slowdown, what the
            # datapath costs the node's traffic that is not a Service's
            for k in ("p50", "p99"):
                s[f"x_floor_{k}"] = _med([x["latency"]["tail"][k] / x["latency"]["floor"][k]
                                          for x in rs if "floor" in x["latency"]])
                s[f"x_ref_{k}"] = _med([x["latency"]["tail"][k] / x["latency"]["reference"][k]
                                        for x in rs if "reference" in x["latency"]])
            s["others_x_p50"] = _med([x["latency"]["floor"]["p50"]
                                      / x["latency"]["reference"]["p50"]
                                      for x in rs if "reference" in x["latency"]])
            if mode == "ebpf":
                s["bpf_ns_per_run"] = _med([x["bpf"]["mean_ns_per_run"] for x in rs])
                s["bpf_progs"] = rs[-1]["bpf"]["ns_per_run"]
                for k in ("new_flow_ns", "established_ns", "reply_ns",
                          "established_single_run_ns", "test_run_loop_ns",
                          "established_own_ns", "reply_own_ns", "established_median_ns",
                          "reply_median_ns", "test_run_loop_median_ns"):
                    s[f"bpf_{k}"] = _med([x["bpf"]["test_run"][k] for x in rs
                                          if k in x["bpf"].get("test_run", {})])
                s["build_peak_rss_mb"] = _med([x["build_peak_rss_mb"] for x in rs
                                               if x.get("build_peak_rss_mb")])
            row[mode] = s
        ipt = row.get("iptables")
        for mode, s in row.items():
            if mode == "floor" or "error" in s:
                continue
            for k in ("p50", "p99"):
                for x in ("x_floor", "x_ref"):  # results from before the paths beside
                    if s[f"{x}_{k}"] is None:
                        s[f"{x}_{k}"] = s[f"tail_{k}"] / row["floor"][k]
            # two datapaths compare through the reference measured beside each, so
            # the host's state at the time of either measurement cancels out
            s["x_iptables_p50"] = s["x_ref_p50"] / ipt["x_ref_p50"] \
                if ipt and "error" not in ipt and ipt.get("x_ref_p50") else None
        out[str(n)] = row
    return out

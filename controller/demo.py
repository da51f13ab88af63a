"""``kpr demo``: one node in network namespaces, real traffic through the eBPF datapath.

It builds a node with three backend pods and a client pod, writes a ClusterIP
Service and its EndpointSlice to a file, and runs the real ``kpr run --source file:``
inside the node's namespace. It then sends requests to the Service address from the
client, prints how they spread, removes one endpoint live (an atomic rewrite of the
file) and shows the new spread. Everything is torn down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from controller.testbed import (
    Testbed,
    kpr_argv,
    service_obj,
    slice_obj,
    spread,
    udp_request,
    write_objects,
)

VIP = "10.96.0.10"
PORTS = [("http", 80, "TCP"), ("dns", 53, "UDP")]
TARGET = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]


def _bar(counts: dict[str, int], total: int) -> None:
    for name in sorted(counts):
        n = counts[name]
        print(f"    {name:<8} {'#' * round(40 * n / total):<40} {n:>4}  ({100 * n / total:.0f}%)")


def _kpr(tb: Testbed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kpr_argv(tb.node, *args), capture_output=True, text=True)


def _wait_backends(tb: Testbed, instance: str, want: int, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = _kpr(tb, "status", "--json", "--instance", instance)
        if out.returncode == 0:
            svcs = json.loads(out.stdout)["services"]
            if svcs and all(len(s["backends"]) == want for s in svcs):
                return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError(f"kpr did not program {want} backends in {timeout}s")


def run_demo(requests: int = 60) -> int:
    if os.geteuid() != 0:
        print("kpr demo needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="kpr-demo-")
    manifest = os.path.join(workdir, "web.yaml")
    proc: subprocess.Popen[str] | None = None
    with Testbed() as tb:
        instance = f"demo-{tb.prefix}"
        try:
            names = ["pod-a", "pod-b", "pod-c"]
            for n in names:
                tb.add_pod(n)
                tb.serve(n, 8080)
            client = tb.add_pod("client")
            print(f"node namespace {tb.node}; backends "
                  + ", ".join(f"{n} {tb.pods[n].ip}" for n in names)
                  + f"; client {client.ip}")
            ips = [tb.pods[n].ip for n in names]
            write_objects(manifest, [service_obj("web", VIP, PORTS),
                                     slice_obj("web", ips, TARGET)])
            print(f"Service default/web: ClusterIP {VIP}, 80/TCP and 53/UDP -> 8080 "
                  f"(objects in {manifest})\n")
            log = open(os.path.join(workdir, "kpr.log"), "w")
            proc = subprocess.Popen(
                kpr_argv(tb.node, "run", "--source", f"file:{manifest}", "--interfaces",
                         f"{tb.prefix}p*", "--instance", instance, "--poll-interval", "0.2"),
                stdout=log, stderr=subprocess.STDOUT, text=True)
            _wait_backends(tb, instance, 3)
            print("$ kpr status")
            print(_kpr(tb, "status", "--instance", instance).stdout)

            print(f"{requests} TCP connections from client to {VIP}:80:")
            _bar(spread(client.ns, VIP, 80, requests), requests)
            print(f"{requests} UDP requests from client to {VIP}:53:")
            _bar(spread(client.ns, VIP, 53, requests, "udp"), requests)
            answer, src = udp_request(client.ns, VIP, 53)
            print(f"    (a UDP reply comes back from {src}; the backend saw the client as "
                  f"{answer.split()[1]})\n")

            print("removing pod-b from the EndpointSlice (the file is rewritten) ...")
            write_objects(manifest, [service_obj("web", VIP, PORTS),
                                     slice_obj("web", [ips[0], ips[2]], TARGET)])
            _wait_backends(tb, instance, 2)
            with open(os.path.join(workdir, "kpr.log")) as f:
                synced = [ln.split(": ", 1)[1].strip() for ln in f if "partial sync" in ln]
            print(f"kpr: {synced[-1] if synced else 'synced'}\n")
            print(f"{requests} TCP connections from client to {VIP}:80:")
            _bar(spread(client.ns, VIP, 80, requests), requests)
            print(f"{requests} UDP requests from client to {VIP}:53:")
            _bar(spread(client.ns, VIP, 53, requests, "udp"), requests)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            _kpr(tb, "cleanup", "--instance", instance)
    print("\ntorn down: kpr stopped, its filters and maps removed, namespaces deleted.")
    return 0

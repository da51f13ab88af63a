"""``kpr demo``: one node in network namespaces, real traffic through the eBPF datapath.

It builds a node with three backend pods and a client pod, starts an embedded API
server (controller/fakeapi.py, the list/watch protocol of the real one) inside the
node's namespace, creates a dual-stack NodePort Service and its EndpointSlices (one
per family) there, and runs
the real ``kpr run --source kube`` inside the node's namespace, as the DaemonSet
does. It then sends requests to the Service address from the client, prints how they
spread, removes one endpoint live (an EndpointSlice update through the watch), shows
the new spread and kpr's own metrics and health. Everything is torn down at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from controller.fakeapi import FakeApiServer
from controller.testbed import (
    Testbed,
    in_netns,
    kpr_argv,
    probe,
    service_obj,
    slice_obj,
    spread,
    udp_request,
)

VIP = "10.96.0.10"
VIP6 = "fd00:96::10"
NODE_IP = "172.16.0.1"
EXT_IP = "172.16.0.2"
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


def _stamped(obj: dict[str, object]) -> dict[str, object]:
    """An EndpointSlice with the trigger-time annotation the controller sets."""
    from datetime import datetime, timezone

    meta = obj["metadata"]
    assert isinstance(meta, dict)
    meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time":
                           datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    return obj


def _http(tb: Testbed, url: str) -> str:
    import urllib.error
    import urllib.request

    def go() -> str:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return f"{r.status} {r.read().decode()}"
        except urllib.error.HTTPError as e:
            return f"{e.code} {e.read().decode()}"
    return in_netns(tb.node, go)


def run_demo(requests: int = 60) -> int:
    if os.geteuid() != 0:
        print("kpr demo needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    import yaml

    workdir = tempfile.mkdtemp(prefix="kpr-demo-")
    kubeconfig = os.path.join(workdir, "kubeconfig")
    proc: subprocess.Popen[str] | None = None
    api = FakeApiServer(bookmark_interval=5.0)
    with Testbed() as tb:
        instance = f"demo-{tb.prefix}"
        try:
            names = ["pod-a", "pod-b", "pod-c"]
            for n in names:
                tb.add_pod(n)
                tb.serve(n, 8080)
            client = tb.add_pod("client")
            ext = tb.add_ext()
            print(f"node namespace {tb.node} (external link {NODE_IP}); backends "
                  + ", ".join(f"{n} {tb.pods[n].ip}" for n in names)
                  + f"; client pod {client.ip}; external client {EXT_IP}")
            ips = [tb.pods[n].ip for n in names]
            ips6 = [tb.pods[n].ip6 for n in names]
            in_netns(tb.node, api.start)
            with open(kubeconfig, "w") as f:
                yaml.safe_dump(api.kubeconfig(), f)
            api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
            svc = service_obj("web", VIP, PORTS, type="NodePort", ipFamilies=["IPv4", "IPv6"],
                              ipFamilyPolicy="RequireDualStack")
            svc["spec"]["clusterIPs"] = [VIP, VIP6]
            for p in svc["spec"]["ports"]:
                p["nodePort"] = 30000 + p["port"]
            api.apply(svc)
            api.apply(_stamped(slice_obj("web", ips, TARGET)))
            api.apply(_stamped(slice_obj("web", ips6, TARGET, name="web-v6",
                                         address_type="IPv6")))
            print(f"API server {api.url} (in the node namespace); Service default/web: "
                  f"NodePort, dual-stack ClusterIPs {VIP} and {VIP6}, 80/TCP (node port "
                  f"30080) and 53/UDP (30053) -> 8080\n")
            log = open(os.path.join(workdir, "kpr.log"), "w")
            proc = subprocess.Popen(
                kpr_argv(tb.node, "run", "--source", "kube", "--kubeconfig", kubeconfig,
                         "--hostname-override", "node-1",
                         "--interfaces", f"{tb.prefix}p*,{tb.prefix}x",
                         "--cluster-cidr", "10.244.0.0/24,fd00:244::/64",
                         "--nodeport-addresses", "172.16.0.0/24,fd00:16::/64",
                         "--instance", instance, "--min-sync-period", "50ms"),
                stdout=log, stderr=subprocess.STDOUT, text=True)
            _wait_backends(tb, instance, 3)
            print("$ kpr status")
            print(_kpr(tb, "status", "--instance", instance).stdout)

            print(f"{requests} TCP connections from client to {VIP}:80:")
            _bar(spread(client.ns, VIP, 80, requests), requests)
            print(f"{requests} UDP requests from client to {VIP}:53:")
            _bar(spread(client.ns, VIP, 53, requests, "udp"), requests)
            print(f"{requests} TCP connections from client to [{VIP6}]:80 (IPv6):")
            _bar(spread(client.ns, VIP6, 80, requests), requests)
            answer, src = udp_request(client.ns, VIP, 53)
            print(f"    (a UDP reply comes back from {src}; the backend saw the client as "
                  f"{answer.split()[1]})")
            print(f"{requests} TCP connections from the external client to the node port "
                  f"{NODE_IP}:30080:")
            _bar(spread(ext, NODE_IP, 30080, requests), requests)
            seen = probe(ext, NODE_IP, 30080)
            print(f"    (masqueraded: the backend saw the client as {seen[1]})")
            seen = probe(tb.node, VIP, 80)
            print(f"from the node itself (socket programs): {VIP}:80 answered by {seen[0]}\n")

            print("removing pod-b from the EndpointSlice (an update on the API server) ...")
            api.apply(_stamped(slice_obj("web", [ips[0], ips[2]], TARGET)))
            api.apply(_stamped(slice_obj("web", [ips6[0], ips6[2]], TARGET, name="web-v6",
                                         address_type="IPv6")))
            _wait_backends(tb, instance, 2)
            with open(os.path.join(workdir, "kpr.log")) as f:
                synced = [ln.split(": ", 1)[1].strip() for ln in f if "partial sync" in ln]
            print(f"kpr: {synced[-1] if synced else 'synced'}\n")
            print(f"{requests} TCP connections from client to {VIP}:80:")
            _bar(spread(client.ns, VIP, 80, requests), requests)
            print(f"{requests} UDP requests from client to {VIP}:53:")
            _bar(spread(client.ns, VIP, 53, requests, "udp"), requests)
            print(f"{requests} UDP requests from client to [{VIP6}]:53 (IPv6):")
            _bar(spread(client.ns, VIP6, 53, requests, "udp"), requests)

            print("\n$ curl 127.0.0.1:10249/metrics   (excerpt)")
            metrics = _http(tb, "http://127.0.0.1:10249/metrics").split(" ", 1)[1]
            for line in metrics.splitlines():
                if line.startswith(("kubeproxy_sync_proxy_rules_duration_seconds_count",
                                    "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                                    "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                                    "kubeproxy_network_programming_duration_seconds_count",
                                    "kubeproxy_network_programming_duration_seconds_sum",
                                    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                                    "kpr_datapath_info", "kpr_bpf_map_fill_ratio",
                                    "kpr_bpf_events_total{event=\"dnat\"}")):
                    print("    " + line)
            print("$ curl 0.0.0.0:10256/healthz")
            print("    " + _http(tb, "http://127.0.0.1:10256/healthz"))
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            _kpr(tb, "cleanup", "--instance", instance)
            api.stop()
    print("\ntorn down: kpr and the API server stopped, filters and maps removed, "
          "namespaces deleted.")
    return 0

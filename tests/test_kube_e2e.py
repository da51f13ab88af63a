"""``kpr run --source kube`` end to end: the fake API server, the real CLI, the real
eBPF datapath, real traffic between network namespaces, metrics and health.

The API server listens inside the node's namespace (kpr runs there too), so nothing
leaves the namespaces the test creates.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.datapaths.ebpf import tc
from controller.fakeapi import FakeApiServer
from controller.testbed import Conn, Testbed, in_netns, kpr_argv, service_obj, slice_obj, spread
from tests.conftest import TEST_PIN_ROOT

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"
PORTS = [("http", 80, "TCP")]
TPORTS = [("http", 8080, "TCP")]


def wait(cond: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (OSError, TimeoutError, AssertionError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"condition not met in time (last: {last!r})")


def get(ns: str, url: str) -> tuple[int, str]:
    def go() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    return in_netns(ns, go)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def ips(tb: Testbed, names: str) -> list[str]:
    return [tb.pods[n].ip for n in names]


def node_obj(zone: str = "", deleting: bool = False) -> dict[str, Any]:
    o: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": "node-1", "labels": {}}}
    if zone:
        o["metadata"]["labels"]["topology.kubernetes.io/zone"] = zone
    if deleting:
        o["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                                 "effect": "NoSchedule"}]}
    return o


def test_kpr_run_against_the_api_server(testbed: Testbed, tmp_path: Path) -> None:
    tb = testbed
    for n in "abc":
        tb.add_pod(n)
        tb.serve(n, 8080)
    client = tb.add_pod("client")
    api = FakeApiServer(bookmark_interval=0.5)
    in_netns(tb.node, api.start)  # listening socket inside the node's namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(api.kubeconfig()))
    api.apply(node_obj())
    api.apply(service_obj("web", VIP, PORTS))
    sl = slice_obj("web", ips(tb, "ab"), TPORTS)
    api.apply(sl)

    instance = f"kube-{tb.prefix}"
    proc = subprocess.Popen(kpr_argv(
        tb.node, "run", "--source", "kube", "--kubeconfig", str(kubeconfig),
        "--interfaces", f"{tb.prefix}p*", "--instance", instance,
        "--bpffs-root", str(TEST_PIN_ROOT), "--hostname-override", "node-1",
        "--min-sync-period", "50ms", "--sync-period", "2s",
        "--metrics-bind-address", "127.0.0.1:10249",
        "--healthz-bind-address", "0.0.0.0:10256", "--config-sync-period", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait(lambda: set(spread(client.ns, VIP, 80, 20, timeout=0.5)) == {"a", "b"})

        # An endpoint change with a trigger time: programmed, and measured.
        sl2 = slice_obj("web", ips(tb, "abc"), TPORTS)
        sl2["metadata"]["annotations"] = {
            "endpoints.kubernetes.io/last-change-trigger-time":
                datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        api.apply(sl2)
        wait(lambda: set(spread(client.ns, VIP, 80, 30, timeout=0.5)) == {"a", "b", "c"})

        # A long-lived connection, then the API server goes away, history is
        # compacted and the endpoints change meanwhile: forwarding goes on; when the
        # server is back, kpr relists (410 Gone) and programs the change.
        conn = Conn(client.ns, VIP, 80)
        first = conn.ask()
        gone = next(n for n in "abc" if not first.startswith(n + " "))
        kept = "".join(n for n in "abc" if n != gone)
        port = api.port
        api.stop()
        assert set(spread(client.ns, VIP, 80, 15)) == {"a", "b", "c"}
        api.apply(slice_obj("web", ips(tb, kept), TPORTS))
        api.compact()
        api.port = port
        in_netns(tb.node, api.start)
        wait(lambda: set(spread(client.ns, VIP, 80, 30, timeout=0.5)) == set(kept),
             timeout=30)
        assert conn.ask() == first  # the relist did not disturb the established flow
        conn.close()

        # A watch cut mid-stream loses no update.
        api.drop_watches()
        api.apply(slice_obj("web", ips(tb, "c"), TPORTS))
        wait(lambda: set(spread(client.ns, VIP, 80, 15, timeout=0.5)) == {"c"})

        # Metrics, with kube-proxy's names and kpr's own.
        code, text = get(tb.node, "http://127.0.0.1:10249/metrics")
        assert code == 200
        assert metric(text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 3
        assert metric(text, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= 1
        assert metric(text, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 1
        assert metric(text, "kubeproxy_network_programming_duration_seconds_count") >= 1
        assert metric(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9
        assert metric(text, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1.7e9
        assert metric(text, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 4
        assert metric(text, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1
        assert metric(text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
        assert 'kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}' \
            in text
        assert 'kpr_datapath_info{datapath="ebpf"} 1.0' in text
        assert metric(text, 'kpr_bpf_map_fill_ratio{map="services"}') > 0
        assert 'kpr_bpf_drops_total{reason="no_backend"}' in text
        assert metric(text, 'kpr_source_relists_total{reason="gone",resource="endpointslices"}') \
            >= 1

        # Health: kube-proxy's JSON; /healthz fails while the node is being deleted,
        # /livez does not.
        code, body = get(tb.node, "http://127.0.0.1:10256/healthz")
        assert code == 200 and json.loads(body)["nodeEligible"] is True
        api.apply(node_obj(deleting=True))
        wait(lambda: get(tb.node, "http://127.0.0.1:10256/healthz")[0] == 503)
        code, body = get(tb.node, "http://127.0.0.1:10256/livez")
        assert code == 200 and "nodeEligible" not in json.loads(body)
        assert any(e["reason"] == "Starting" for e in api.events)

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
        assert set(spread(client.ns, VIP, 80, 10)) == {"c"}  # forwarding outlives kpr

        # kube-proxy's --cleanup: everything goes, then it exits 0.
        r = subprocess.run(kpr_argv(tb.node, "run", "--cleanup", "--bpffs-root",
                                    str(TEST_PIN_ROOT)), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not (TEST_PIN_ROOT / instance).exists()
        assert tc.list_attachments(tb.node) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        api.stop()
        subprocess.run(kpr_argv(tb.node, "cleanup", "--instance", instance, "--bpffs-root",
                                str(TEST_PIN_ROOT)), capture_output=True)

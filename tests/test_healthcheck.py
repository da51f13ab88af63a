"""healthCheckNodePort servers through the real ``kpr run``, queried inside the node's
network namespace."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controller.testbed import (
    Testbed,
    in_netns,
    kpr_argv,
    service_obj,
    slice_obj,
    wait_until,
    write_objects,
)
from tests.conftest import TEST_PIN_ROOT

pytestmark = pytest.mark.kernel

HCNP = 32766


def probe(ns: str, port: int, host: str = "127.0.0.1") -> tuple[int, dict[str, Any], str] | None:
    """(status, JSON body, endpoint-weight header), or None when nothing listens."""
    def go() -> tuple[int, dict[str, Any], str] | None:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/anything", timeout=2) as r:
                return r.status, json.loads(r.read()), r.headers["X-Load-Balancing-Endpoint-Weight"]
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers["X-Load-Balancing-Endpoint-Weight"]
        except (ConnectionError, urllib.error.URLError):  # refused, or reset while closing
            return None
    return in_netns(ns, go)


def lb_objects(local_nodes: list[str]) -> list[dict[str, Any]]:
    svc = service_obj("web", "10.96.0.10", [("http", 80, "TCP")], type="LoadBalancer",
                      externalTrafficPolicy="Local", healthCheckNodePort=HCNP)
    svc["spec"]["ports"][0]["nodePort"] = 30080
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}
    sl = slice_obj("web", [f"10.244.0.{11 + i}" for i in range(len(local_nodes))],
                   [("http", 8080, "TCP")])
    for ep, node in zip(sl["endpoints"], local_nodes):
        ep["nodeName"] = node
    return [svc, sl]


def test_health_check_node_port_reports_local_endpoints(testbed: Testbed,
                                                        tmp_path: Path) -> None:
    tb = testbed
    tb.add_pod("a")
    manifest = tmp_path / "svc.yaml"
    write_objects(str(manifest), lb_objects(["node-1", "node-1", "node-2"]))
    instance = f"hc-{tb.prefix}"
    proc = subprocess.Popen(kpr_argv(
        tb.node, "run", "--source", f"file:{manifest}", "--interfaces", f"{tb.prefix}p*",
        "--instance", instance, "--bpffs-root", str(TEST_PIN_ROOT), "--hostname-override",
        "node-1", "--poll-interval", "0.1", "--min-sync-period", "50ms",
        "--metrics-bind-address", "", "--healthz-bind-address", ""),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code, body, weight = wait_until(lambda: probe(tb.node, HCNP), timeout=15)
        assert code == 200 and weight == "2"
        assert body == {"service": {"namespace": "default", "name": "web"},
                        "localEndpoints": 2, "serviceProxyHealthy": True}
        assert probe(tb.node, HCNP, "[::1]") == (code, body, weight)  # both families
        # Endpoints move to other nodes: 503, so the load balancer skips this node.
        write_objects(str(manifest), lb_objects(["node-2", "node-3"]))
        code, body, weight = wait_until(
            lambda: (r := probe(tb.node, HCNP)) and r[0] == 503 and r, timeout=15)
        assert body["localEndpoints"] == 0 and weight == "0"
        # The Service goes: the port closes.
        write_objects(str(manifest), [])
        wait_until(lambda: probe(tb.node, HCNP) is None, timeout=15)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            print(proc.communicate()[0])
        subprocess.run(kpr_argv(tb.node, "cleanup", "--instance", instance, "--bpffs-root",
                                str(TEST_PIN_ROOT)), capture_output=True)

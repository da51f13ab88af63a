"""Cold start at scale: list N Services and their EndpointSlices from an API server,
translate them, and program them into the real eBPF maps.

The API server is :mod:`controller.fakeapi` on loopback, driven through the official
client exactly as in production (paged lists of raw JSON). Phases are timed
separately so that a regression shows where it is:

* ``list``: HTTP + JSON decoding + validation into the tracker (the reflectors);
* ``translate``: the tracker's first apply (every Service);
* ``program``: the datapath's full sync (batched map updates).

The same function backs the 50,000-Service operation-counting test, which asserts
counts, never times.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.fakeapi import FakeApiServer


def vip(i: int) -> str:
    """The ClusterIP of generated Service i."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.96.0.0")) + 1 + i))


def service_of(i: int, namespace: str = "bench", name: str | None = None,
               port: int = 80, target_port: int = 8080) -> dict[str, Any]:
    """Generated Service i: a ClusterIP Service with one TCP port (named svc-i unless
    ``name`` is given)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name or f"svc-{i}", "namespace": namespace},
            "spec": {"type": "ClusterIP", "clusterIP": vip(i), "clusterIPs": [vip(i)],
                     "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": port, "protocol": "TCP",
                                "targetPort": target_port}]}}


def slice_of(i: int, addresses: list[str], namespace: str = "bench",
             name: str | None = None, port: int = 8080) -> dict[str, Any]:
    """The EndpointSlice of generated Service i (or of Service ``name``), with these
    endpoint addresses."""
    name = name or f"svc-{i}"
    eps = [{"addresses": [a], "conditions": {"ready": True, "serving": True,
                                             "terminating": False},
            "nodeName": f"node-{j}"} for j, a in enumerate(addresses)]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}


def fake_endpoints(i: int, endpoints: int) -> list[str]:
    """Endpoint addresses of generated Service i: in 10.128/9, where nothing answers."""
    ep0 = int(ipaddress.IPv4Address("10.128.0.0"))
    return [str(ipaddress.IPv4Address(ep0 + i * endpoints + j)) for j in range(endpoints)]


def objects(n: int, endpoints: int = 2, namespace: str = "bench",
            real: dict[int, list[str]] | None = None) -> list[dict[str, Any]]:
    """n ClusterIP Services (one TCP port) and one EndpointSlice each. Services in
    ``real`` get those endpoint addresses (the benchmark's live backends); the
    others get ``endpoints`` addresses nothing answers on."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.append(service_of(i, namespace))
        out.append(slice_of(i, (real or {}).get(i) or fake_endpoints(i, endpoints),
                            namespace))
    return out


@dataclass
class ColdStart:
    """What one cold start measured, and the live pieces for follow-up checks."""

    services: int
    list_s: float
    translate_s: float
    program_s: float
    ops: int
    frontends: int
    server: Any
    source: Any
    tracker: Any
    proxier: Any
    datapath: Any
    stop: threading.Event
    rss_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    """This process's resident memory after each phase (VmRSS), and its peak (VmHWM)
    at the end: where the memory goes."""

    @property
    def total_s(self) -> float:
        return self.list_s + self.translate_s + self.program_s

    def close(self) -> None:
        self.stop.set()
        self.source.interrupt()
        self.server.stop()


class ServerProcess:
    """The fake API server in a process of its own, serving generated objects."""

    def __init__(self, n: int, endpoints: int = 2,
                 real: dict[int, list[str]] | None = None) -> None:
        import json
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.fakeapi", "--generate", str(n),
             "--endpoints", str(endpoints), "--real", json.dumps(real or {})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            self.stop()
            raise RuntimeError("the fake API server did not start")
        self.port = int(line[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def kubeconfig(self) -> dict[str, Any]:
        return FakeApiServer(port=self.port).kubeconfig()

    def apply(self, obj: dict[str, Any]) -> None:
        """Create or replace one object in the server (a line of JSON on its stdin;
        it answers "ok" once stored)."""
        import json

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError("the fake API server did not store the object")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server exits when stdin closes
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 - our own child: make sure it ends
                self.proc.kill()
                self.proc.wait()


def cold_start(n: int, datapath: Any, endpoints: int = 2,
               separate_process: bool = True,
               real: dict[int, list[str]] | None = None) -> ColdStart:
    """Serve n Services, then time list -> translate -> program into ``datapath``
    (started by the caller). The caller must close() the result. With
    ``separate_process`` the API server runs in its own process, as a real one does;
    otherwise in this one (tests that change objects afterwards need that)."""
    from controller.sources.kube import KubeSource, api_client
    from controller.sync import Proxier
    from controller.tracker import ChangeTracker
    from controller.translate import NodeInfo

    server: Any
    if separate_process:
        server = ServerProcess(n, endpoints, real)
    else:
        server = FakeApiServer(bookmark_interval=5.0).start()
        server.apply_many(objects(n, endpoints, real=real))
    kubeconfig = Path(tempfile.mkdtemp(prefix="kpr-bench-")) / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(server.kubeconfig()))
    tracker = ChangeTracker(NodeInfo(name="node-0"))
    stop = threading.Event()
    source = KubeSource(api_client(str(kubeconfig)), tracker, "", resync_period=0)
    rss = {"before": _vm("VmRSS")}
    t0 = time.perf_counter()
    source.start(stop)
    source.wait_synced(stop)
    t1 = time.perf_counter()
    rss["listed"] = _vm("VmRSS")
    proxier = Proxier(datapath, tracker)
    tracker.apply()
    t2 = time.perf_counter()
    rss["translated"] = _vm("VmRSS")
    result = datapath.sync(tracker.view(), None)  # as the Proxier's full syncs do
    t3 = time.perf_counter()
    rss["programmed"] = _vm("VmRSS")
    rss["peak"] = _vm("VmHWM")
    proxier.full_sync_done()
    return ColdStart(n, t1 - t0, t2 - t1, t3 - t2, result.ops, result.frontends, server,
                     source, tracker, proxier, datapath, stop, rss)


def _vm(field: str) -> float:
    """A /proc/self/status memory field, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.bench.coldstart [N]``: one cold start on real maps (root)."""
    import argparse
    import resource
    import secrets

    from controller.datapaths.ebpf.datapath import EbpfConfig, EbpfDatapath, cleanup
    from controller.datapaths.ebpf.loader import MapSizes

    p = argparse.ArgumentParser(prog="python -m controller.bench.coldstart")
    p.add_argument("services", type=int, nargs="?", default=50_000)
    p.add_argument("--endpoints", type=int, default=2)
    args = p.parse_args(argv)
    n, e = args.services, args.endpoints
    sizes = MapSizes(services=max(65536, n), slots=max(262144, n * e),
                     backends=max(131072, n * e))
    dp = EbpfDatapath(EbpfConfig(instance=f"coldstart-{secrets.token_hex(3)}",
                                 pin_root=Path("/sys/fs/bpf/kpr-bench"), sizes=sizes))
    dp.load()
    try:
        r = cold_start(n, dp, e)
        r.close()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n} Services x {e} endpoints: list {r.list_s:.2f} s, translate "
              f"{r.translate_s:.2f} s, program {r.program_s:.2f} s, total {r.total_s:.2f} s; "
              f"{r.ops} kernel map entries; peak RSS {rss:.0f} MB")
        print("RSS after each phase: " + ", ".join(f"{k} {v:.0f} MB"
                                                   for k, v in r.rss_mb.items()))
    finally:
        cleanup(dp.cfg.pin_dir)
        root = dp.cfg.pin_root
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A node topology in network namespaces, with real servers and clients.

Used by ``kpr demo``, the integration tests and the benchmark. Layout (per testbed,
all names carry a unique prefix so several can coexist)::

    <p>-pod-a  eth0 10.244.0.11/32 fd00:244::11/128 --veth-- <p>a  (node side)
    <p>-pod-b  eth0 10.244.0.12/32 fd00:244::12/128 --veth-- <p>b           \\
    ...                                                             <p>-node (kpr runs
    <p>-ext    eth0 172.16.0.2/24 fd00:16::2/64 --veth-- <p>x 172.16.0.1    here,
                                                              fd00:16::1  forwarding)

Every link is dual-stack. Pods are wired as a point-to-point CNI does it: a /32 and
a /128 on the pod side, default routes via the gateways 169.254.1.1 and fd00:169::1
(addresses on every node-side veth), and a /32 and a /128 route per pod on the node.
The node's default routes point at the external link, so its primary addresses
(the masquerade addresses) are 172.16.0.1 and fd00:16::1.
Duplicate address detection is off in every namespace, so addresses are usable at
once. Checksum offload is off on every veth, so a receiver
verifies checksums in software: a wrong incremental checksum update by the datapath
shows up as lost packets, not as silently accepted ones.

Servers and clients run as threads of the calling process that ``setns`` into their
namespace (setns(CLONE_NEWNET) affects only the calling thread), so a test makes
hundreds of connections without a process per request. Servers answer each request
line with ``<name> <client ip>``, so a client learns which backend answered and the
backend's view of the client's address. Servers listen on both families; clients
use the family of the address they are given.

Teardown stops the servers and deletes the namespaces (which deletes the veths); it
runs on exceptions and Ctrl-C too.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from controller.netns import in_netns, setns_thread

T = TypeVar("T")
GATEWAY = "169.254.1.1"
GATEWAY6 = "fd00:169::1"
POD_NET = ipaddress.IPv4Network("10.244.0.0/24")
POD_NET6 = ipaddress.IPv6Network("fd00:244::/64")


def family(ip: str) -> socket.AddressFamily:
    """The socket family of an address literal."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def kpr_argv(ns: str, *args: str) -> list[str]:
    """argv running this kpr inside network namespace ``ns``.

    nsenter enters only the network namespace. ``ip netns exec`` would also unshare
    the mount namespace and remount /sys, hiding the host's bpffs at /sys/fs/bpf:
    kpr would then pin its maps in a private bpffs that no other process can see
    (iproute2 6.1)."""
    return ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "controller.cli",
            *args]


def wait_until(cond: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy; return that, or raise
    AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class Pod:
    """A pod: its own namespace, one address, one veth to the node."""

    name: str
    """Short name, also what its servers answer."""
    ns: str
    """Network namespace."""
    ip: str
    """Pod IPv4 address."""
    host_if: str
    """Node-side veth name."""
    ip6: str = ""
    """Pod IPv6 address."""


class Server:
    """TCP and UDP line servers on one port in a namespace, answering
    ``<name> <client ip>\\n`` to every request. ``bind`` lists the addresses to
    listen on; the default is every address of both families."""

    def __init__(self, ns: str, name: str, port: int, tcp: bool = True, udp: bool = True,
                 bind: str | tuple[str, ...] = ("0.0.0.0", "::")) -> None:
        self.ns, self.name, self.port = ns, name, port
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.conns: list[socket.socket] = []
        binds = (bind,) if isinstance(bind, str) else bind
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, args=(tcp, udp, binds, ready),
                                        daemon=True, name=f"server-{name}")
        self._thread.start()
        ready.result(10)

    def _listen(self, kind: int, addr: str) -> socket.socket:
        s = socket.socket(family(addr), kind)
        if ":" in addr:  # one socket per family: v4 peers never show as ::ffff:a.b.c.d
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, self.port))
        if kind == socket.SOCK_STREAM:
            s.listen(512)
        s.setblocking(False)
        self._socks.append(s)
        return s

    def _serve(self, tcp: bool, udp: bool, binds: tuple[str, ...],
               ready: Future[None]) -> None:
        try:
            setns_thread(self.ns)
            sel = selectors.DefaultSelector()
            for addr in binds:
                if tcp:
                    sel.register(self._listen(socket.SOCK_STREAM, addr), selectors.EVENT_READ,
                                 "accept")
                if udp:
                    sel.register(self._listen(socket.SOCK_DGRAM, addr), selectors.EVENT_READ,
                                 "udp")
        except BaseException as e:  # noqa: BLE001
            ready.set_exception(e)
            return
        ready.set_result(None)
        while not self._stop.is_set():
            for key, _ in sel.select(0.2):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if key.data == "accept":
                        c, _addr = s.accept()
                        c.setblocking(False)
                        sel.register(c, selectors.EVENT_READ, "conn")
                        self.conns.append(c)
                    elif key.data == "udp":
                        data, addr = s.recvfrom(65535)
                        s.sendto(f"{self.name} {addr[0]}\n".encode(), addr)
                    else:
                        data = s.recv(65535)
                        if not data:
                            sel.unregister(s)
                            s.close()
                            self.conns.remove(s)
                            continue
                        peer = s.getpeername()[0]
                        s.sendall(f"{self.name} {peer}\n".encode() * data.count(b"\n"))
                except OSError:
                    if key.data == "conn":
                        sel.unregister(s)
                        s.close()
                        if s in self.conns:
                            self.conns.remove(s)
        for s in list(self.conns) + self._socks:
            s.close()
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def tcp_request(ns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """One TCP connection, one request line; returns the answer line."""
    def go() -> str:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.sendall(b"hello\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.decode().strip()
    return in_netns(ns, go)


def udp_request(ns: str, ip: str, port: int, timeout: float = 2.0) -> tuple[str, str]:
    """One datagram; returns (answer, source address of the answer)."""
    def go() -> tuple[str, str]:
        with socket.socket(family(ip), socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(b"hello\n", (ip, port))
            data, addr = s.recvfrom(65535)
            return data.decode().strip(), addr[0]
    return in_netns(ns, go)


def spread(ns: str, ip: str, port: int, n: int, proto: str = "tcp",
           timeout: float = 2.0) -> dict[str, int]:
    """n requests, each on a new connection/socket; counts answers by backend name.
    Failures are counted under "<error>"."""
    def go() -> dict[str, int]:
        counts: dict[str, int] = {}
        for _ in range(n):
            try:
                if proto == "tcp":
                    with socket.create_connection((ip, port), timeout=timeout) as s:
                        s.sendall(b"hello\n")
                        name = s.recv(4096).decode().split()[0]
                else:
                    with socket.socket(family(ip), socket.SOCK_DGRAM) as s:
                        s.settimeout(timeout)
                        s.sendto(b"hello\n", (ip, port))
                        name = s.recvfrom(65535)[0].decode().split()[0]
            except (OSError, IndexError):
                name = "<error>"
            counts[name] = counts.get(name, 0) + 1
        return counts
    return in_netns(ns, go, timeout=timeout * n + 30)


REJECT = "REJECT"
DROP = "DROP"


def probe(ns: str, ip: str, port: int, proto: str = "tcp", timeout: float = 1.0,
          bind: str | None = None) -> tuple[str, str] | str:
    """One request from namespace ``ns``: (backend name, client address the backend
    saw), or REJECT when refused at once (RST or ICMP unreachable; a connected UDP
    socket reports the ICMP error), DROP when nothing answers within ``timeout``, or
    "ERROR <reason>" for another failure (a host or network unreachable)."""
    def go() -> tuple[str, str] | str:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family(ip), kind) as s:
            s.settimeout(timeout)
            if bind:
                s.bind((bind, 0))
            try:
                s.connect((ip, port))
                s.sendall(b"hello\n")
                data = s.recv(4096)
            except ConnectionRefusedError:
                return REJECT
            except TimeoutError:
                return DROP
            except OSError as e:  # e.g. ENETUNREACH: the node has no route for it
                return f"ERROR {e.strerror}"
            name, seen = data.decode().split()[:2]
            return name, seen
    return in_netns(ns, go, timeout=timeout + 30)


class Conn:
    """A long-lived TCP connection from a namespace (for "open connections keep
    working" checks). Its socket lives in the namespace it was created in."""

    def __init__(self, ns: str, ip: str, port: int, timeout: float = 2.0) -> None:
        self.sock = in_netns(ns, lambda: socket.create_connection((ip, port), timeout=timeout))

    def ask(self) -> str:
        """Send one line and read the answer; raises OSError if the flow is broken."""
        self.sock.sendall(b"ping\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("connection closed")
            buf += chunk
        return buf.decode().strip()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Testbed:
    """The topology; use as a context manager (teardown is guaranteed)."""

    __test__ = False  # not a pytest test class, despite its name

    prefix: str = field(default_factory=lambda: "k" + secrets.token_hex(3))
    pods: dict[str, Pod] = field(default_factory=dict)
    servers: list[Server] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    ext_ns: str | None = None

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    def __enter__(self) -> Testbed:
        try:
            self._ns(self.node)
            # No ICMP rate limit on the node: readiness polls that hit a Service
            # before it is programmed draw "unreachable" errors, and the per-host
            # bucket they drain (6 messages, one more per second) would then
            # swallow the port unreachable a REJECT check waits for.
            sh("ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1",
               "net.ipv6.conf.all.forwarding=1", "net.ipv4.icmp_ratelimit=0",
               "net.ipv6.icmp.ratelimit=0")
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        # before any link exists, so that every link inherits "no DAD"
        sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
           "net.ipv6.conf.default.accept_dad=0")
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def add_pod(self, name: str) -> Pod:
        """A pod namespace wired to the node; returns it."""
        i = len(self.pods)
        ns = f"{self.prefix}-{name}"
        host_if = f"{self.prefix}p{i}"
        ip = str(POD_NET.network_address + 11 + i)
        ip6 = f"{POD_NET6.network_address}{11 + i}"
        self._ns(ns)
        sh("ip", "-n", self.node, "link", "add", host_if, "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        sh("ip", "-n", self.node, "addr", "add", f"{GATEWAY}/32", "dev", host_if)
        sh("ip", "-n", self.node, "addr", "add", f"{GATEWAY6}/128", "dev", host_if, "nodad")
        sh("ip", "-n", self.node, "link", "set", host_if, "up")
        sh("ip", "-n", self.node, "route", "add", f"{ip}/32", "dev", host_if)
        sh("ip", "-n", self.node, "route", "add", f"{ip6}/128", "dev", host_if)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        sh("ip", "-n", ns, "route", "add", GATEWAY6, "dev", "eth0")
        sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off")
        sh("ip", "netns", "exec", self.node, "ethtool", "-K", host_if, "tx", "off")
        pod = Pod(name, ns, ip, host_if, ip6)
        self.pods[name] = pod
        return pod

    def add_ext(self) -> str:
        """An external client namespace on 172.16.0.0/24 and fd00:16::/64 behind the
        node."""
        ns = f"{self.prefix}-ext"
        host_if = f"{self.prefix}x"
        self._ns(ns)
        sh("ip", "-n", self.node, "link", "add", host_if, "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        sh("ip", "-n", self.node, "addr", "add", "172.16.0.1/24", "dev", host_if)
        sh("ip", "-n", self.node, "addr", "add", "fd00:16::1/64", "dev", host_if, "nodad")
        sh("ip", "-n", self.node, "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", "172.16.0.2/24", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", "fd00:16::2/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "172.16.0.1")
        sh("ip", "-n", ns, "route", "add", "default", "via", "fd00:16::1")
        # the node's default routes point out of its external link, as on a real node
        sh("ip", "-n", self.node, "route", "add", "default", "via", "172.16.0.2")
        sh("ip", "-n", self.node, "route", "add", "default", "via", "fd00:16::2")
        self.ext_ns = ns
        return ns

    def add_twin_path(self, client: Pod) -> str:
        """A second node with nothing installed, between ``client`` and a pod of its
        own: client -> veth -> twin node (forwarding) -> veth -> twin pod, built as
        the pod paths through the node are. Returns the twin pod's address
        (10.250.0.11, routed in the client pod via its eth1); its namespace is
        ``<prefix>-twinpod``. ``kpr bench`` measures its reference through it,
        interleaved with each datapath's Services: a path the datapath under test
        cannot touch, unlike a connection straight to a pod through the node, which
        an iptables datapath slows too (its nat chains see every new connection)."""
        node, pod = f"{self.prefix}-twin", f"{self.prefix}-twinpod"
        ip = "10.250.0.11"
        self._ns(node)
        self._ns(pod)
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, host_if, peer, addr in ((client.ns, f"{self.prefix}tc", "eth1", None),
                                        (pod, f"{self.prefix}tp", "eth0", ip)):
            sh("ip", "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", peer,
               "netns", ns)
            sh("ip", "-n", node, "addr", "add", f"{GATEWAY}/32", "dev", host_if)
            sh("ip", "-n", node, "link", "set", host_if, "up")
            sh("ip", "-n", node, "route", "add", f"{addr or client.ip}/32", "dev", host_if)
            if addr:
                sh("ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", peer)
            sh("ip", "-n", ns, "link", "set", peer, "up")
            sh("ip", "netns", "exec", ns, "ethtool", "-K", peer, "tx", "off")
            sh("ip", "netns", "exec", node, "ethtool", "-K", host_if, "tx", "off")
        sh("ip", "-n", pod, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        sh("ip", "-n", pod, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        # the client keeps its one address (eth0's); only the twin pod is via eth1
        sh("ip", "-n", client.ns, "route", "add", f"{ip}/32", "via", GATEWAY, "dev", "eth1",
           "onlink")
        return ip

    def serve(self, pod: str, port: int, **kw: Any) -> Server:
        srv = Server(self.pods[pod].ns, pod, port, **kw)
        self.servers.append(srv)
        return srv

    def teardown(self) -> None:
        for srv in self.servers:
            srv.stop()
        self.servers.clear()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def leftover_namespaces(prefix: str) -> list[str]:
    """Namespaces whose name starts with prefix (for teardown checks)."""
    return [n for n in os.listdir("/run/netns") if n.startswith(prefix)] \
        if os.path.isdir("/run/netns") else []


# ----- Kubernetes objects, as kubectl prints them ------------------------------------

def service_obj(name: str, cluster_ip: str, ports: list[tuple[str, int, str]],
                namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A v1/Service; ports are (name, port, protocol)."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": n, "port": p, "protocol": proto, "targetPort": p}
                           for n, p, proto in ports], **spec},
    }


def slice_obj(service: str, endpoints: list[str | tuple[str, dict[str, bool]]],
              ports: list[tuple[str, int, str]], namespace: str = "default",
              name: str | None = None, address_type: str = "IPv4") -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice; endpoints are IPs or (IP, conditions);
    ports are (name, port, protocol)."""
    eps = []
    for e in endpoints:
        ip, cond = (e, {"ready": True}) if isinstance(e, str) else e
        eps.append({"addresses": [ip], "conditions": cond})
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service}-abcde", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "endpoints": eps,
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def write_objects(path: str, objects: list[dict[str, Any]]) -> None:
    """Write objects as one multi-document YAML file, atomically (rename)."""
    import yaml

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump_all(objects, f, sort_keys=False)
    os.replace(tmp, path)

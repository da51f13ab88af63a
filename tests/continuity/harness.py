"""The continuity suite's instruments: long-lived connections beside a stream of new
ones, through a Service, while kpr is restarted, upgraded, rolled back or switched.

Every reset, refusal and timeout is counted; a long-lived connection also counts as
broken when an answer comes from a different backend than its first (the rule: a
flow's next packet never goes to another backend while the old one answers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from controller.testbed import Testbed, in_netns, kpr_argv

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Row:
    """One event's counts, a row of docs/reliability.md."""

    event: str
    datapath: str
    broken: int
    """Long-lived flows broken during the event."""
    new_ok: int
    """New connections that succeeded meanwhile."""
    new_failed: int
    """New connections that failed meanwhile."""

    def record(self) -> None:
        """Append to $KPR_CONTINUITY_REPORT (JSON lines) when set: docs/reliability.md
        is written from it (python -m tests.continuity.report)."""
        path = os.environ.get("KPR_CONTINUITY_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(self.__dict__) + "\n")


class LongLived:
    """``n`` TCP connections opened at once, each asking every ``period`` seconds,
    and ``udp`` UDP flows (one connected socket each, so one source port) asking
    as often. A UDP flow is broken when an answer is lost twice in a row (one loss
    is what a datagram may suffer) or comes from another backend."""

    def __init__(self, ns: str, ip: str, port: int, n: int = 24, period: float = 0.1,
                 timeout: float = 2.0, udp: int = 0) -> None:
        self.ns, self.ip, self.port, self.period = ns, ip, port, period
        self.socks: list[socket.socket] = []
        self.first: list[str] = []
        self.broken: dict[int, str] = {}
        """Flow index -> what broke it (exception name, or "moved to X"); UDP flows
        come after the TCP ones."""
        self.asks = 0
        self.n_tcp = n
        self._lost: dict[int, int] = {}
        for _ in range(n):
            s = in_netns(ns, lambda: socket.create_connection((ip, port), timeout=timeout))
            self.socks.append(s)
            self.first.append(self._ask(s))
        for _ in range(udp):
            def mk() -> socket.socket:
                u = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET,
                                  socket.SOCK_DGRAM)
                u.settimeout(0.5)
                u.connect((ip, port))
                return u

            u = in_netns(ns, mk)
            self.socks.append(u)
            self.first.append(self._ask(u))
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="longlived")
        self._t.start()

    @staticmethod
    def _ask(s: socket.socket) -> str:
        if s.type == socket.SOCK_DGRAM:
            for _ in range(3):
                s.send(b"ping\n")
                try:
                    return s.recv(4096).decode().split()[0]
                except TimeoutError:
                    continue
            raise TimeoutError("no UDP answer")
        s.sendall(b"ping\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed by the peer")
            buf += chunk
        return buf.decode().split()[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, s in enumerate(self.socks):
                if i in self.broken:
                    continue
                try:
                    if s.type == socket.SOCK_DGRAM:
                        s.send(b"ping\n")
                        try:
                            who = s.recv(4096).decode().split()[0]
                            self._lost[i] = 0
                        except TimeoutError:
                            self._lost[i] = self._lost.get(i, 0) + 1
                            if self._lost[i] >= 2:
                                self.broken[i] = "UDP answers lost twice in a row"
                            continue
                    else:
                        who = self._ask(s)
                    self.asks += 1
                    if who != self.first[i]:
                        self.broken[i] = f"moved from {self.first[i]} to {who}"
                except OSError as e:
                    self.broken[i] = type(e).__name__
            self._stop.wait(self.period)

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._t.join(10)
        for s in self.socks:
            s.close()
        return dict(self.broken)

    @property
    def alive(self) -> int:
        return len(self.socks) - len(self.broken)


class NewConns:
    """New TCP connections back to back (one request each); counts failures."""

    def __init__(self, ns: str, ip: str, port: int, timeout: float = 1.0) -> None:
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.when: list[str] = []  # when each failure was counted, and what it was
        self._stop = threading.Event()
        self._args = (ip, port, timeout)
        self._t = threading.Thread(target=in_netns, args=(ns, self._run),
                                   kwargs={"timeout": 3600}, daemon=True, name="newconns")
        self._t.start()

    def _run(self) -> None:
        ip, port, timeout = self._args
        while not self._stop.is_set():
            try:
                s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
                s.settimeout(timeout)
                s.connect((ip, port))
                with s:
                    s.sendall(b"hi\n")
                    if not s.recv(100):
                        raise ConnectionResetError("closed")
                self.ok += 1
            except OSError as e:
                self.failed[type(e).__name__] += 1
                # wall clock, to match kpr.log's lines
                self.when.append(f"{time.strftime('%H:%M:%S')}."
                                 f"{int(time.time() * 1000) % 1000:03d} {type(e).__name__}")
            time.sleep(0.005)

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._t.join(10)
        return self.failed


@dataclass
class Kpr:
    """``kpr run`` on a testbed node, as its DaemonSet pod runs it (nsenter --net),
    from this tree or another one (an older release's, for upgrades)."""

    tb: Testbed
    manifest: Path
    instance: str
    pin_root: Path
    log: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, *args: str, tree: Path = REPO) -> subprocess.Popen[str]:
        argv = kpr_argv(self.tb.node, "run", "--source", f"file:{self.manifest}",
                        "--interfaces", f"{self.tb.prefix}p*", "--instance", self.instance,
                        "--bpffs-root", str(self.pin_root), "--poll-interval", "0.1",
                        "--min-sync-period", "50ms", "--metrics-bind-address", "",
                        "--healthz-bind-address", "", "--cgroup-root", "none", *args)
        env = dict(os.environ, PYTHONPATH=str(tree))
        env.pop("KPR_BPF_DIR", None)
        with open(self.log, "a") as out:
            out.write(f"\n===== kpr {' '.join(args)} from {tree}\n")
            out.flush()
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True,
                                 cwd=tree, env=env)
        self.procs.append(p)
        return p

    def wait_running(self, p: subprocess.Popen[str], timeout: float = 180.0) -> None:
        """Until this process logged its first sync (programmed, attached). The VM's
        emulation takes about a minute for bcc's compile alone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise AssertionError(f"kpr exited with {p.returncode}:\n{self.tail()}")
            if self._synced_since_last_start():
                return
            time.sleep(0.05)
        raise AssertionError(f"kpr did not sync within {timeout} s:\n{self.tail()}")

    def _synced_since_last_start(self) -> bool:
        text = self.log.read_text().rsplit("\n===== kpr ", 1)[-1]
        return "sync:" in text or "full sync" in text

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    @staticmethod
    def stop(p: subprocess.Popen[str]) -> None:
        p.terminate()
        p.wait(30)

    @staticmethod
    def kill(p: subprocess.Popen[str]) -> None:
        p.kill()
        p.wait(30)

    def reap(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def cleanup(self) -> None:
        subprocess.run(kpr_argv(self.tb.node, "cleanup", "--instance", self.instance,
                                "--bpffs-root", str(self.pin_root)), capture_output=True,
                       cwd=REPO)


def release_tree(commit: str, cache: Path = Path("/tmp/kpr-releases")) -> Path:
    """The source tree of ``commit``, extracted from this repository's history (git
    archive) once per machine; reused by later tests and runs."""
    dest = cache / commit
    if (dest / ".complete").exists():
        return dest
    have = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True)
    if have.returncode != 0:
        raise AssertionError(f"commit {commit} is not in this checkout's history (a shallow "
                             f"clone?): the layout migration test builds it; fetch the "
                             f"history (git fetch --unshallow)")
    tmp = cache / f"{commit}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True,
                          check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=arch, check=True)
    (tmp / ".complete").write_text(commit + "\n")
    if dest.exists():
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    tmp.rename(dest)
    return dest


def releases() -> dict[str, str]:
    """tests/continuity/releases.txt: layout -> the commit each migration test starts
    from."""
    out: dict[str, str] = {}
    for line in (Path(__file__).parent / "releases.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, commit = line.split()[:2]
            out[name] = commit
    return out


def python() -> str:
    return sys.executable

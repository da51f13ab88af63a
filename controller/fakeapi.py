"""A local server that speaks the Kubernetes API server's list/watch protocol.

No kube-apiserver can be installed on the machines kpr is developed and tested on,
so the kube source is tested against this server through the official ``kubernetes``
client, exactly as it talks to a real API server. It implements, for Services,
EndpointSlices, Nodes (and Event creation):

* lists with ``limit``/``continue`` paging over a consistent snapshot, and the 410
  ``Expired`` answer for a continue token that is gone;
* watches as chunked JSON event streams from a ``resourceVersion``, with ``BOOKMARK``
  events when asked (``allowWatchBookmarks``), ``timeoutSeconds``, and the 410
  ``ERROR`` event for a resourceVersion older than the compaction point;
* a global, monotonically increasing resourceVersion, as etcd gives;
* ``fieldSelector=metadata.name=X`` (kube-proxy watches only its own Node).

Test hooks: :meth:`FakeApiServer.compact` (etcd compaction), :meth:`drop_watches`
(connections cut mid-stream), :meth:`fail_next` (error answers), and stop/start on the
same port (the API server restarting).

The server is also what ``kpr demo --source kube`` and ``kpr bench`` run against.
"""

from __future__ import annotations

import base64
import bisect
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource type the server serves."""

    path: str
    """Collection path for all namespaces."""
    api_version: str
    """apiVersion of its objects."""
    kind: str
    """kind of its objects."""
    namespaced: bool
    """Whether objects live in namespaces."""


RESOURCES: dict[str, Resource] = {
    "services": Resource("/api/v1/services", "v1", "Service", True),
    "endpointslices": Resource("/apis/discovery.k8s.io/v1/endpointslices",
                               "discovery.k8s.io/v1", "EndpointSlice", True),
    "nodes": Resource("/api/v1/nodes", "v1", "Node", False),
}
_BY_PATH = {r.path: name for name, r in RESOURCES.items()}
_BY_KIND = {r.kind: name for name, r in RESOURCES.items()}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApiServer:
    """The store, the event log and the HTTP server around them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 bookmark_interval: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            r: {} for r in RESOURCES}
        self._log: list[tuple[int, str, str, dict[str, Any]]] = []
        self._log_rvs: list[int] = []
        self._compacted = 0
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._failures: list[tuple[str, int]] = []
        self._watch_socks: set[socket.socket] = set()
        self.events: list[dict[str, Any]] = []
        """Event objects POSTed by clients."""
        self.requests: list[str] = []
        """"METHOD path?query" of every request, for tests."""
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle --------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        server = self

        class Handler(_Handler):
            api = server

        httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut every open watch (the API server going away)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self.drop_watches()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self) -> dict[str, Any]:
        """A kubeconfig pointing at this server (no auth, plain HTTP)."""
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }

    # ----- the store (tests call these) -----------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (by kind, namespace, name); returns it stored."""
        return self.apply_many([obj])[0]

    def apply_many(self, objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            for obj in objs:
                res = _BY_KIND[obj["kind"]]
                obj = copy.deepcopy(obj)
                meta = obj.setdefault("metadata", {})
                if RESOURCES[res].namespaced:
                    meta.setdefault("namespace", "default")
                key = (meta.get("namespace", ""), meta["name"])
                old = self._objects[res].get(key)
                self._rv += 1
                meta["resourceVersion"] = str(self._rv)
                meta.setdefault("uid", (old or {}).get("metadata", {}).get("uid")
                                or str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                self._objects[res][key] = obj
                self._log.append((self._rv, res, "MODIFIED" if old else "ADDED", obj))
                self._log_rvs.append(self._rv)
                out.append(obj)
            self._cond.notify_all()
        return out

    def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        res = _BY_KIND[kind]
        key = (namespace if RESOURCES[res].namespaced else "", name)
        with self._cond:
            obj = self._objects[res].pop(key)
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._log.append((self._rv, res, "DELETED", obj))
            self._log_rvs.append(self._rv)
            self._cond.notify_all()

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        res = _BY_KIND[kind]
        key = (namespace if RESOURCES[res].namespaced else "", name)
        with self._cond:
            return self._objects[res].get(key)

    def compact(self) -> int:
        """Forget history up to now, as etcd compaction does: a watch from an older
        resourceVersion gets 410 Gone, and so does a continue token."""
        with self._cond:
            self._compacted = self._rv
            self._log = []
            self._log_rvs = []
            self._snapshots.clear()
            return self._rv

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream."""
        with self._cond:
            socks = list(self._watch_socks)
            self._watch_socks.clear()
            self._cond.notify_all()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def fail_next(self, path_prefix: str, code: int = 500, count: int = 1) -> None:
        """Answer the next ``count`` requests under ``path_prefix`` with ``code``."""
        with self._cond:
            self._failures += [(path_prefix, code)] * count

    def watchers(self) -> int:
        with self._cond:
            return len(self._watch_socks)

    # ----- protocol (the handler calls these) -----------------------------------------------

    def _take_failure(self, path: str) -> int | None:
        with self._cond:
            for i, (prefix, code) in enumerate(self._failures):
                if path.startswith(prefix):
                    del self._failures[i]
                    return code
        return None

    def _list(self, res: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        r = RESOURCES[res]
        selector = _name_selector(query.get("fieldSelector", ""))
        token = query.get("continue", "")
        with self._cond:
            if token:
                try:
                    t = json.loads(base64.urlsafe_b64decode(token))
                    items = self._snapshots[t["id"]]
                    rv, start = int(t["rv"]), int(t["start"])
                except (ValueError, KeyError, TypeError):
                    return 410, _status(410, "Expired", "the provided continue parameter is "
                                        "too old to display a consistent list result")
            else:
                items = [o for k, o in sorted(self._objects[res].items())
                         if selector is None or k[1] == selector]
                rv, start = self._rv, 0
        limit = int(query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items[start:start + limit] if limit else items[start:]
        if limit and start + limit < len(items):
            sid = uuid.uuid4().hex
            with self._cond:
                self._snapshots[sid] = items
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"id": sid, "rv": rv, "start": start + limit}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        return 200, {"kind": f"{r.kind}List", "apiVersion": r.api_version, "metadata": meta,
                     "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                               for o in page]}

    def _watch(self, res: str, query: dict[str, str], sock: socket.socket) -> Iterator[
            dict[str, Any] | None]:
        """Watch events as dicts; None means "nothing for a while" (flush point)."""
        r = RESOURCES[res]
        selector = _name_selector(query.get("fieldSelector", ""))
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        raw_rv = query.get("resourceVersion", "")
        with self._cond:
            self._watch_socks.add(sock)
            if raw_rv in ("", "0"):
                # "any": start with the current objects as ADDED events
                initial = [{"type": "ADDED", "object": o}
                           for k, o in sorted(self._objects[res].items())
                           if selector is None or k[1] == selector]
                rv = self._rv
            else:
                rv = int(raw_rv)
                initial = []
                if rv < self._compacted:
                    yield {"type": "ERROR", "object": _status(
                        410, "Expired", f"too old resource version: {rv} ({self._compacted})")}
                    return
        yield from initial
        last_bookmark = time.monotonic()
        while True:
            with self._cond:
                if sock not in self._watch_socks:
                    return  # dropped
                first = bisect.bisect_right(self._log_rvs, rv)
                pending = [(erv, t, o) for erv, res2, t, o in self._log[first:]
                           if res2 == res and
                           (selector is None or o["metadata"]["name"] == selector)]
                if not pending:
                    now = time.monotonic()
                    wait = min(deadline, last_bookmark + self.bookmark_interval) - now
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                current = self._rv
            for erv, t, o in pending:
                rv = erv
                yield {"type": t, "object": o}
            now = time.monotonic()
            if now >= deadline:
                return
            if not pending and bookmarks and now - last_bookmark >= self.bookmark_interval:
                last_bookmark = now
                rv = max(rv, current)
                yield {"type": "BOOKMARK", "object": {
                    "kind": r.kind, "apiVersion": r.api_version,
                    "metadata": {"resourceVersion": str(rv)}}}
            yield None

    def _forget(self, sock: socket.socket) -> None:
        with self._cond:
            self._watch_socks.discard(sock)


def _name_selector(selector: str) -> str | None:
    for part in selector.split(","):
        if part.startswith("metadata.name="):
            return part.split("=", 1)[1]
    return None


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        self.api.requests.append(f"GET {self.path}")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        code = self.api._take_failure(url.path)
        if code is not None:
            self._send_json(code, _status(code, "InternalError", "injected failure"))
            return
        res = _BY_PATH.get(url.path)
        if res is None:
            self._send_json(404, _status(404, "NotFound", f"no resource at {url.path}"))
            return
        if query.get("watch") in ("true", "1"):
            self._stream(res, query)
        else:
            code, body = self.api._list(res, query)
            self._send_json(code, body)

    def _stream(self, res: str, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sock = self.connection
        try:
            buf: list[bytes] = []
            for ev in self.api._watch(res, query, sock):
                if ev is not None:
                    buf.append(json.dumps(ev, separators=(",", ":")).encode() + b"\n")
                    if len(buf) < 256:
                        continue
                if buf:
                    data = b"".join(buf)
                    buf = []
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
            if buf:
                data = b"".join(buf)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass
        finally:
            self.api._forget(sock)
            self.close_connection = True

    def do_POST(self) -> None:
        url = urlparse(self.path)
        self.api.requests.append(f"POST {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if url.path.endswith("/events"):
            self.api.events.append(body)
            self._send_json(201, body)
            return
        self._send_json(405, _status(405, "MethodNotAllowed", "only events can be created"))


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.fakeapi --generate N``: serve N generated Services from a
    process of its own (so that a measurement of kpr does not share its interpreter
    with the server). Prints ``ready PORT`` once serving; then each line of JSON on
    stdin is an object to create or replace (answered "ok"); stops on SIGTERM or
    when stdin closes."""
    import argparse
    import json
    import sys

    from controller.bench.coldstart import objects

    p = argparse.ArgumentParser(prog="python -m controller.fakeapi")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--generate", type=int, default=0, metavar="N")
    p.add_argument("--endpoints", type=int, default=2)
    p.add_argument("--real", default="{}", help="JSON: Service index -> endpoint addresses")
    args = p.parse_args(argv)
    real = {int(k): v for k, v in json.loads(args.real).items()}
    srv = FakeApiServer(args.host, args.port, bookmark_interval=5.0)
    srv.apply_many(objects(args.generate, args.endpoints, real=real))
    srv.start()
    print(f"ready {srv.port}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip():
                srv.apply(json.loads(line))
                print("ok", flush=True)
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

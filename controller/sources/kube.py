"""``--source kube``: Services, EndpointSlices and this Node from the API server.

One :class:`Reflector` per resource does what client-go's reflector does for
kube-proxy's informers, with the official ``kubernetes`` client underneath (its
configuration loading, auth, TLS and request building):

* **List** in pages (``limit``/``continue``), then **watch** from the list's
  resourceVersion with ``allowWatchBookmarks``, so a quiet resource still advances
  its resourceVersion and a reconnect does not replay history.
* **410 Gone** (etcd compacted past our resourceVersion, or an expired continue
  token) means "relist": the new list *replaces* the old one. Objects missing from it
  are deleted, every other object is an update that the tracker drops when it is a
  no-op, so what is programmed is never dropped in between.
* **Errors** (connection refused, dropped stream, 5xx) are logged, counted, and
  retried with jittered exponential backoff (0.5 s doubling to 30 s); the datapath
  keeps forwarding with what it has.
* **Resync**: every ``resync_period`` the reflector relists. client-go's informer
  resync replays its own cache and can never catch a missed event; a relist can.
* Responses are read as raw JSON and validated by objects.py: the client's model
  deserialization costs about 100 µs per object, which at 50,000 Services and
  their slices would dominate a cold start.
* Requests go through the client's ``ApiClient`` (``param_serialize`` and
  ``call_api``: configuration, auth, TLS, query encoding) but not its generated
  per-group classes: importing ``CoreV1Api`` alone cost 21 MB of resident memory
  (kubernetes client 37), for three list paths and one POST.

Ready means every reflector has finished its first list (kube-proxy waits for its
informers' caches to sync before the first sync).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from controller.alloc import bulk_allocation
from controller.objects import (
    Node,
    ObjectError,
    ObjectKey,
    object_ref,
    parse_node,
    parse_service,
    parse_slice,
)
from controller.tracker import ChangeTracker

log = logging.getLogger(__name__)

PAGE_SIZE = 2000
"""Objects per list page: large enough that a 50,000-Service list is a few dozen
requests, small enough that one page is never a memory spike."""


class Gone(Exception):
    """HTTP 410: the resourceVersion or continue token is no longer available."""


class SourceObserver(Protocol):
    """What the source reports (metrics.py implements it)."""

    def source_error(self, resource: str, reason: str) -> None: ...
    def relist(self, resource: str, reason: str) -> None: ...
    def invalid_object(self, kind: str) -> None: ...


class _NoObserver:
    def source_error(self, resource: str, reason: str) -> None:
        pass

    def relist(self, resource: str, reason: str) -> None:
        pass

    def invalid_object(self, kind: str) -> None:
        pass


@dataclass
class Backoff:
    """Jittered exponential backoff."""

    initial: float = 0.5
    """First delay, seconds."""
    maximum: float = 30.0
    """Cap, seconds."""
    _next: float = 0.0

    def next(self) -> float:
        self._next = self.initial if self._next == 0 else min(self._next * 2, self.maximum)
        return self._next * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = 0.0


class Reflector:
    """List and watch one resource; hand whole lists and single events on."""

    def __init__(self, resource: str, list_fn: Callable[..., Any],
                 on_list: Callable[[list[Any]], None],
                 on_event: Callable[[str, dict[str, Any]], None],
                 observer: SourceObserver, *, field_selector: str | None = None,
                 page_size: int = PAGE_SIZE, watch_timeout: int = 300,
                 resync_period: float = 900.0,
                 digest: Callable[[list[dict[str, Any]]], list[Any]] = lambda items: items
                 ) -> None:
        self.resource = resource
        self.list_fn = list_fn
        self.on_list = on_list
        self.digest = digest
        self.on_event = on_event
        self.observer = observer
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.resync_period = resync_period
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.backoff = Backoff()
        self._resp: Any = None
        self._last_list = 0.0

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.field_selector:
            kw["field_selector"] = self.field_selector
        return kw

    def list(self) -> None:
        """A full, paged list; replaces what the consumer holds.

        Each page is digested (parsed and validated) as it arrives and its raw JSON
        dropped: holding every raw page until the last one kept the whole list's
        decoded JSON alive at once, the largest transient of a 50,000-Service cold
        start. The consumer still sees the list only whole, so a list that fails
        half-way changes nothing."""
        items: list[Any] = []
        token: str | None = None
        rv = ""
        while True:
            kw = self._kwargs()
            kw["limit"] = self.page_size
            if token:
                kw["_continue"] = token
            resp = _call(self.list_fn, kw, timeout=(10, 120))
            with bulk_allocation():
                body = json.loads(resp.data)
                items += self.digest(body.get("items") or [])
            meta = body.get("metadata") or {}
            body["items"] = None
            rv = meta.get("resourceVersion") or rv
            token = meta.get("continue")
            if not token:
                break
        with bulk_allocation():
            self.on_list(items)
        self.resource_version = rv
        self._last_list = time.monotonic()
        self.synced.set()
        log.info("listed %d %s at resourceVersion %s", len(items), self.resource, rv)

    def watch(self, stop: threading.Event) -> None:
        """Watch from resource_version until the server ends the stream."""
        kw = self._kwargs()
        kw.update(watch=True, allow_watch_bookmarks=True,
                  resource_version=self.resource_version,
                  timeout_seconds=self.watch_timeout)
        # The read timeout catches a server that vanished without closing: bookmarks
        # (about every minute from a real API server) keep a healthy stream busy.
        resp = _call(self.list_fn, kw, timeout=(10, self.watch_timeout + 60))
        self._resp = resp
        try:
            partial = b""
            for chunk in resp.stream(amt=None, decode_content=False):
                if stop.is_set():
                    return
                # one split per chunk: a chunk may carry hundreds of events
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(json.loads(line))
                if lines:
                    self.backoff.reset()
                if self._resync_due():
                    return
        finally:
            self._resp = None
            resp.release_conn()

    def _resync_due(self) -> bool:
        return bool(self.resync_period) and (
            time.monotonic() - self._last_list >= self.resync_period)

    def _event(self, ev: dict[str, Any]) -> None:
        etype = ev.get("type")
        obj = ev.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone(obj.get("message", "gone"))
            raise RuntimeError(f"watch error {code}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self.on_event(etype, obj)
        elif etype != "BOOKMARK":
            log.warning("%s watch: unknown event type %r ignored", self.resource, etype)
        if rv:
            self.resource_version = rv

    def run(self, stop: threading.Event) -> None:
        """List, then watch, forever: relist on 410 or resync, back off on errors."""
        while not stop.is_set():
            try:
                if self.resource_version is None or self._resync_due():
                    if self.resource_version is not None:
                        self.observer.relist(self.resource, "resync")
                    self.list()
                self.watch(stop)
            except Gone as e:
                log.info("%s: %s; relisting", self.resource, e)
                self.observer.relist(self.resource, "gone")
                self.resource_version = None
            except Exception as e:  # noqa: BLE001 - any fault: count, back off, retry
                reason = _reason(e)
                if stop.is_set():
                    return
                delay = self.backoff.next()
                status = getattr(e, "status", None)
                what = f"HTTP {status} {getattr(e, 'reason', '')}" if status else str(e)
                log.warning("%s: %s (%s); retrying in %.1f s", self.resource, reason,
                            what.strip(), delay)
                self.observer.source_error(self.resource, reason)
                stop.wait(delay)

    def interrupt(self) -> None:
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


_QUERY = {"limit": "limit", "_continue": "continue", "field_selector": "fieldSelector",
          "watch": "watch", "allow_watch_bookmarks": "allowWatchBookmarks",
          "resource_version": "resourceVersion", "timeout_seconds": "timeoutSeconds"}
"""The list/watch options Reflector passes, by the generated methods' names, and
their query parameters (the API's names)."""


def _request(api_client: Any, method: str, path: str, timeout: tuple[float, float],
             query: list[tuple[str, Any]] | None = None, body: Any = None) -> Any:
    """One request through the client; the raw urllib3 response (as the generated
    methods return it with ``_preload_content=False``). A non-2xx answer raises
    ApiException, as they do."""
    from kubernetes.client.exceptions import ApiException

    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = api_client.param_serialize(method=method, resource_path=path, query_params=query,
                                     header_params=headers, body=body,
                                     auth_settings=["BearerToken"])
    resp = api_client.call_api(*req, _request_timeout=timeout)
    if not 200 <= resp.status <= 299:
        resp.read()
        raise ApiException.from_response(http_resp=resp, body=None, data=None)
    return resp.response


def lister(api_client: Any, path: str) -> Callable[..., Any]:
    """A list/watch call for a collection path (e.g. /api/v1/services), taking the
    options of the generated list methods (limit, _continue, watch, ...)."""
    def call(_request_timeout: tuple[float, float], **kw: Any) -> Any:
        query = [(_QUERY[k], v) for k, v in kw.items() if v is not None]
        return _request(api_client, "GET", path, _request_timeout, query)
    return call


def _call(fn: Callable[..., Any], kw: dict[str, Any], timeout: tuple[float, float]) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        resp = fn(_request_timeout=timeout, **kw)
    except ApiException as e:
        if e.status == 410:
            raise Gone(str(e.reason)) from e
        raise
    status = getattr(resp, "status", 200)
    if status == 410:
        raise Gone(resp.data.decode(errors="replace")[:200])
    if not 200 <= status < 300:
        raise RuntimeError(f"HTTP {status}: {resp.data.decode(errors='replace')[:200]}")
    return resp


def _reason(e: Exception) -> str:
    inner = getattr(e, "reason", None)  # urllib3's MaxRetryError wraps the cause
    if isinstance(inner, Exception):
        return _reason(inner)
    name = type(e).__name__
    if "Timeout" in name:
        return "timeout"
    if isinstance(e, (ConnectionError, OSError)) or "Connection" in name or "Protocol" in name:
        return "connection"
    if isinstance(e, json.JSONDecodeError):
        return "decode"
    return "error"


class KubeSource:
    """The three reflectors, feeding one ChangeTracker."""

    def __init__(self, api_client: Any, tracker: ChangeTracker, node_name: str,
                 on_change: Callable[[], None] = lambda: None,
                 on_node: Callable[[Node | None], None] = lambda n: None,
                 observer: SourceObserver | None = None, resync_period: float = 900.0,
                 page_size: int = PAGE_SIZE, watch_timeout: int = 300) -> None:
        self.tracker = tracker
        self.node_name = node_name
        self.on_change = on_change
        self.on_node = on_node
        self.observer: SourceObserver = observer or _NoObserver()
        self.node: Node | None = None
        self._api = api_client
        kw: dict[str, Any] = dict(page_size=page_size, watch_timeout=watch_timeout,
                                  resync_period=resync_period)
        self.reflectors = [
            Reflector("services", lister(api_client, "/api/v1/services"),
                      self._services_listed, self._service_event, self.observer,
                      digest=self._digest("Service", parse_service), **kw),
            Reflector("endpointslices",
                      lister(api_client, "/apis/discovery.k8s.io/v1/endpointslices"),
                      self._slices_listed, self._slice_event, self.observer,
                      digest=self._digest("EndpointSlice", parse_slice), **kw),
        ]
        if node_name:
            self.reflectors.append(Reflector(
                "nodes", lister(api_client, "/api/v1/nodes"), self._nodes_listed, self._node_event, self.observer,
                field_selector=f"metadata.name={node_name}",
                digest=self._digest("Node", parse_node), **kw))
        self._threads: list[threading.Thread] = []

    # ----- lifecycle --------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        for r in self.reflectors:
            t = threading.Thread(target=r.run, args=(stop,), name=f"kpr-{r.resource}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def wait_synced(self, stop: threading.Event, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not stop.is_set():
            if self.synced():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            stop.wait(0.05)
        return False

    def interrupt(self) -> None:
        for r in self.reflectors:
            r.interrupt()

    # ----- handlers ---------------------------------------------------------------------

    def _parse(self, kind: str, parse: Callable[[Any], Any], raw: dict[str, Any]) -> Any:
        try:
            return parse(raw)
        except ObjectError as e:
            # The last valid version (if any) stays programmed.
            log.error("ignoring invalid object: %s", e)
            self.observer.invalid_object(kind)
            return None

    def _digest(self, kind: str, parse: Callable[[Any], Any]
                ) -> Callable[[list[dict[str, Any]]], list[tuple[ObjectKey, Any]]]:
        """A list page's raw items -> (key, parsed object or None if invalid)."""
        def digest(items: list[dict[str, Any]]) -> list[tuple[ObjectKey, Any]]:
            out: list[tuple[ObjectKey, Any]] = []
            for raw in items:
                obj = self._parse(kind, parse, raw)
                if obj is None:
                    ns, _, name = object_ref(raw).partition("/")
                    out.append((ObjectKey(ns, name), None))
                else:  # a Node has no namespace, hence no key of its own
                    out.append((getattr(obj, "key", None) or ObjectKey("", obj.name), obj))
            return out
        return digest

    def _replace(self, items: list[tuple[ObjectKey, Any]], known: set[ObjectKey],
                 update: Callable[[ObjectKey, Any], bool]) -> None:
        seen: set[ObjectKey] = set()
        changed = False
        for key, obj in items:
            seen.add(key)
            if obj is not None:
                changed |= update(key, obj)
            # else: keep it alive, an invalid new version must not delete the old one
        for key in known - seen:
            changed |= update(key, None)
        if changed:
            self.on_change()

    def _services_listed(self, items: list[tuple[ObjectKey, Any]]) -> None:
        self._replace(items, self.tracker.known()[0], self.tracker.update_service)

    def _slices_listed(self, items: list[tuple[ObjectKey, Any]]) -> None:
        self._replace(items, self.tracker.known()[1], self.tracker.update_slice)

    def _event(self, kind: str, parse: Callable[[Any], Any], etype: str, raw: dict[str, Any],
               update: Callable[[ObjectKey, Any], bool]) -> None:
        if etype == "DELETED":
            ns, _, name = object_ref(raw).partition("/")
            changed = update(ObjectKey(ns, name), None)
        else:
            obj = self._parse(kind, parse, raw)
            changed = obj is not None and update(obj.key, obj)
        if changed:
            self.on_change()

    def _service_event(self, etype: str, raw: dict[str, Any]) -> None:
        self._event("Service", parse_service, etype, raw, self.tracker.update_service)

    def _slice_event(self, etype: str, raw: dict[str, Any]) -> None:
        self._event("EndpointSlice", parse_slice, etype, raw, self.tracker.update_slice)

    def _set_node(self, node: Node | None) -> None:
        self.node = node
        self.on_node(node)

    def _nodes_listed(self, items: list[tuple[ObjectKey, Any]]) -> None:
        nodes = [n for _, n in items if n is not None]
        mine = next((n for n in nodes if n.name == self.node_name), None)
        if mine is None:
            log.warning("node %s not found: endpoints are not marked local until it is",
                        self.node_name)
        self._set_node(mine)

    def _node_event(self, etype: str, raw: dict[str, Any]) -> None:
        if etype == "DELETED":
            self._set_node(None)
            return
        node = self._parse("Node", parse_node, raw)
        if node is not None and node.name == self.node_name:
            self._set_node(node)

    # ----- events -----------------------------------------------------------------------

    def post_event(self, reason: str, message: str, event_type: str = "Normal") -> None:
        """Record a Node event, as kube-proxy does at start ("Starting kpr")."""
        if not self.node_name:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{self.node_name}.", "namespace": "default"},
                "involvedObject": {"kind": "Node", "name": self.node_name,
                                   "uid": self.node_name},
                "reason": reason, "message": message, "type": event_type,
                "source": {"component": "kpr", "host": self.node_name},
                "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            # read to the end, so that the connection goes back to the pool
            _request(self._api, "POST", "/api/v1/namespaces/default/events", (5, 5),
                     body=body).read()
        except Exception as e:  # noqa: BLE001 - events are best effort
            log.warning("could not post the %s event: %s", reason, e)
            self.observer.source_error("events", _reason(e))


def api_client(kubeconfig: str = "", master: str = "", qps: float = 0) -> Any:
    """An ApiClient from --kubeconfig/--master, else in-cluster config, else ~/.kube."""
    from kubernetes import client, config

    if master and not kubeconfig:
        cfg = client.Configuration()
        cfg.host = master
    elif kubeconfig or not _in_cluster():
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig or None, client_configuration=cfg)
    else:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
    if master:
        cfg.host = master
    return client.ApiClient(cfg)


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))

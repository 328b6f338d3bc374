"""List, then watch: one kind of object followed into the index, with the server doing the filtering.

An informer lists its kind once (with a label selector, so the API server
sends only runner pods and Jobs), hands the listing to the index, then
follows the watch from the listing's resourceVersion. Each event updates
the index and is passed on (a pod's death is the controller's hot path).

- Every request has a timeout: a listing the client's own (kube.py), a
  watch asks the server to end it after `WATCH_SECONDS` and gives up reading
  after that plus a margin, so a hung API server cannot hold the thread.
- A watch that ends is resumed from the last resourceVersion seen (bookmarks
  keep it fresh); a `410 Gone` or any error means a fresh listing, after a
  backoff that grows while the API server keeps failing.
- Objects that vanished while no watch was open (found missing from a fresh
  listing) are passed on as DELETED events, so nothing is missed; an object
  the index learned from a read newer than the listing is not among them
  (index.py).

Runs in its own thread; `stop()` ends it within one read timeout.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from .. import log
from .index import SLIM, ClusterIndex

WATCH_SECONDS = 240  # the server closes each watch after this; we reconnect at once
READ_MARGIN_S = 30  # ... and we stop reading one that went silent past it
CONNECT_TIMEOUT_S = 5
BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0
# A listing is read in pages of this many objects (client-go's pager uses the same), each slimmed before
# the next is fetched: a restarted controller lists thousands of pods and Jobs, and held whole at once
# their parsed JSON would take a hundred MiB or more, which the process would keep as its high-water mark.
LIST_PAGE = 500

OnEvent = Callable[[str, dict[str, Any]], None]  # (event type, object)
OnListing = Callable[[list[dict[str, Any]]], None]  # a fresh listing's objects, at once


@dataclass(frozen=True)
class Source:
    """Where a kind comes from: its list function for one namespace (or the cluster) and a selector."""

    kind: str  # index kind: pods, jobs, nodes
    list_fn: Callable[..., Any]  # a kubernetes client list function; namespace bound already
    label_selector: str | None = None
    namespace: str | None = None  # None: every namespace (or a cluster-scoped kind)

    def describe(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.kind}{where}" + (f" ({self.label_selector})" if self.label_selector else "")


class Informer:
    def __init__(self, source: Source, index: ClusterIndex, on_event: OnEvent | None = None,
                 watch_seconds: int = WATCH_SECONDS, read_margin_s: float = READ_MARGIN_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, progress: Callable[[], None] | None = None,
                 on_listing: OnListing | None = None):
        self.source = source
        self.index = index
        self.on_event = on_event or (lambda _type, _obj: None)
        # A listing's objects go to `on_listing` in one call when given (so a handler can batch its
        # reads: the watch, and with it every new event, waits until the listing is handed over),
        # else to `on_event` one by one as ADDED.
        self.on_listing = on_listing
        self.watch_seconds = watch_seconds
        self.read_timeout_s = watch_seconds + read_margin_s
        self.connect_timeout_s = connect_timeout_s
        self.progress = progress or (lambda: None)
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.log = log.get(component="controller")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.source.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._watch(resource_version)
                self._failures = 0
            except ApiException as exc:
                if exc.status == 410:  # too old to resume: list afresh, at once
                    resource_version = None
                    continue
                resource_version = self._failed(exc)
            except Exception as exc:  # a timeout, a refused connection, a broken stream
                resource_version = self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Log, mark the index unsynced, back off; the next round lists afresh."""
        self._failures += 1
        self.index.unsynced(self.source.kind)
        self.synced.clear()
        delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (self._failures - 1)) * random.uniform(0.5, 1.0)
        self.log.warning("controller.watch_failed", watch=self.source.describe(), attempt=self._failures,
                         retry_in_s=round(delay, 2), error=f"{type(exc).__name__}: {exc}"[:300])
        self.progress()  # failing and retrying on schedule is progress: a restart would not help
        self._stop.wait(delay)
        return None

    def _list(self) -> str:
        """List the kind page by page into the index, then deliver what changed; returns the version to watch from."""
        slim = SLIM[self.source.kind]
        items: list[dict[str, Any]] = []
        page_token: str | None = None
        while True:
            # No timeout of its own: a page is an ordinary request, bounded by the client's (kube.py).
            # A continue token that expired mid-listing is a 410: the failure path lists again.
            resp = self.source.list_fn(**self._selector(), limit=LIST_PAGE, _continue=page_token,
                                       _preload_content=False)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items += map(slim, body.get("items") or [])
            meta = body.get("metadata") or {}
            page_token = meta.get("continue")
            if not page_token:
                break
        resource_version = meta.get("resourceVersion") or ""
        gone = self.index.replace(self.source.kind, items, resource_version)
        self.synced.set()
        self.progress()
        for obj in gone:  # deleted while we were not watching
            self._deliver("DELETED", obj)
        if self.on_listing is not None:  # slim, as the index holds them: handlers read only what it keeps
            self._deliver_listing(self.on_listing, items)
        else:
            for obj in items:
                self._deliver("ADDED", obj)
        return resource_version

    def _watch(self, resource_version: str) -> str:
        """Follow the watch until the server ends it; returns the resourceVersion to resume from."""
        for event in self._events(resource_version):
            kind = event.get("type")
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if kind == "ERROR":
                raise ApiException(status=obj.get("code") or 500, reason=obj.get("message") or "watch error")
            if rv:
                resource_version = rv
            if kind == "BOOKMARK":
                self.index.watched_to(self.source.kind, rv)
                continue
            self.index.apply(self.source.kind, kind, obj)
            self._deliver(kind, obj)
        self.progress()
        return resource_version

    def _events(self, resource_version: str) -> Iterator[dict[str, Any]]:
        resp = self.source.list_fn(
            **self._selector(), watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds, _preload_content=False,
            _request_timeout=(self.connect_timeout_s, self.read_timeout_s))
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if line:
                    yield json.loads(line)
        finally:
            resp.close()
            resp.release_conn()

    def _selector(self) -> dict[str, Any]:
        return {"label_selector": self.source.label_selector} if self.source.label_selector else {}

    def _deliver_listing(self, on_listing: OnListing, items: list[dict[str, Any]]) -> None:
        try:
            on_listing(items)
        except Exception as exc:  # as for one event: logged, and the watch goes on (the sweep covers the rest)
            self.log.error("controller.event_failed", watch=self.source.describe(), object=f"listing of {len(items)}",
                           error=f"{type(exc).__name__}: {exc}")

    def _deliver(self, event_type: str, obj: dict[str, Any]) -> None:
        try:
            self.on_event(event_type, obj)
        except Exception as exc:  # one bad object must not stop the watch of the others
            self.log.error("controller.event_failed", watch=self.source.describe(),
                           object=(obj.get("metadata") or {}).get("name"), error=f"{type(exc).__name__}: {exc}")

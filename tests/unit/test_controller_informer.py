"""The informers against stand-in API servers: list then watch, resume, relist on 410, and a hung server.

A real API server is what the cluster tests use; here the server's answers
are scripted, or it never answers at all, which a real one cannot be made
to do on demand.
"""

from __future__ import annotations

import threading
import time

import pytest
from controller_fakes import NAMESPACE, World, suite, ts
from kube_stub import HungServer, ScriptedServer, api_client, pod

from evalrunner.controller import informer as informer_mod
from evalrunner.controller.index import POD, ClusterIndex
from evalrunner.controller.informer import Informer, Source
from evalrunner.controller.kube import RUNNER_SELECTOR, Kube


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def __call__(self, event_type: str, obj: dict) -> None:
        with self.changed:
            self.events.append((event_type, obj["metadata"]["name"]))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> list[tuple[str, str]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.events) >= count, timeout), self.events
            return list(self.events)


def pods_source(url: str, timeout: float = 5.0) -> Source:
    """The controller's own source of runner pods, through its own client settings."""
    source = Kube(api_client(url), request_timeout=(timeout, timeout)).sources(())[0]
    assert (source.kind, source.label_selector) == (POD, RUNNER_SELECTOR)
    return source


def watches_opened(server: ScriptedServer, count: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while len([q for q in server.requests if q.get("watch") == ["true"]]) < count:
        assert time.monotonic() < deadline, server.requests
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(informer_mod, "BACKOFF_START_S", 0.05)


def test_it_lists_then_follows_the_watch_and_resumes_from_the_last_version():
    server = ScriptedServer([pod("a", "90")], watches=[
        [{"type": "ADDED", "object": pod("b", "101")}, {"type": "BOOKMARK", "object": {"metadata": {
            "resourceVersion": "105"}}}],
        [{"type": "DELETED", "object": pod("a", "106")}],
    ])
    index, seen = ClusterIndex(), Seen()
    watcher = Informer(pods_source(server.url), index, seen).start()
    try:
        assert seen.wait_for(3) == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]
        assert index.synced(POD) and [p["metadata"]["name"] for p in index.all(POD)] == ["b"]
        watches_opened(server, 3)
        watches = [q for q in server.requests if q.get("watch") == ["true"]]
        assert [w["resourceVersion"] for w in watches[:3]] == [["100"], ["105"], ["106"]], "resumed, not relisted"
        assert all(q["labelSelector"] == [RUNNER_SELECTOR] for q in server.requests), "the server selects"
    finally:
        watcher.stop()
        server.close()


def test_a_long_listing_is_read_in_pages_and_only_slim_objects_are_kept(monkeypatch):
    """A restarted controller lists thousands of pods at once: page by page, keeping only what the index keeps,
    so the listing's full objects never all sit in memory together."""
    monkeypatch.setattr(informer_mod, "LIST_PAGE", 4)
    big = [pod(f"p{i:02d}", str(i)) for i in range(10)]
    for p in big:
        p["spec"]["volumes"] = [{"name": "bulk", "configMap": {"name": "x" * 1000}}]  # not kept by the index
    server = ScriptedServer(big, resource_version="300", watches=[[{"type": "ADDED", "object": pod("q", "301")}]])
    index, seen = ClusterIndex(), Seen()
    delivered: list[dict] = []

    def on_event(event_type: str, obj: dict) -> None:
        delivered.append(obj)
        seen(event_type, obj)

    watcher = Informer(pods_source(server.url), index, on_event).start()
    try:
        assert seen.wait_for(11) == [("ADDED", f"p{i:02d}") for i in range(10)] + [("ADDED", "q")]
        lists = [q for q in server.requests if q.get("watch") != ["true"]]
        assert [(q["limit"], q.get("continue")) for q in lists] == [(["4"], None), (["4"], ["4"]), (["4"], ["8"])]
        watch = next(q for q in server.requests if q.get("watch") == ["true"])
        assert watch["resourceVersion"] == ["300"], "the watch resumes from the listing's version"
        assert len(index.all(POD)) == 11
        assert all("volumes" not in obj["spec"] for obj in delivered[:10]), "handlers get the slim objects"
    finally:
        watcher.stop()
        server.close()


def test_a_listing_goes_to_its_handler_at_once_and_the_watch_events_after_it():
    server = ScriptedServer([pod("a", "90"), pod("b", "91")], watches=[[{"type": "ADDED", "object": pod("c", "101")}]])
    listings: list[list[str]] = []
    index, seen = ClusterIndex(), Seen()
    watcher = Informer(pods_source(server.url), index, seen,
                       on_listing=lambda objs: listings.append([o["metadata"]["name"] for o in objs])).start()
    try:
        assert seen.wait_for(1) == [("ADDED", "c")]
        assert listings == [["a", "b"]]
    finally:
        watcher.stop()
        server.close()


def test_a_410_relists_and_a_pod_deleted_meanwhile_is_delivered_as_deleted():
    server = ScriptedServer([pod("a", "90"), pod("b", "91")], watches=[410])
    index, seen = ClusterIndex(), Seen()
    watcher = Informer(pods_source(server.url), index, seen).start()
    try:
        seen.wait_for(2)
        server.items = [pod("b", "120")]  # "a" went away while no watch was open
        assert seen.wait_for(4)[2:] == [("DELETED", "a"), ("ADDED", "b")]
        assert [p["metadata"]["name"] for p in index.all(POD)] == ["b"]
    finally:
        watcher.stop()
        server.close()


def test_a_pod_read_before_the_first_listing_is_not_taken_for_deleted_by_it():
    """A restarted controller serves runners before its pod listing lands, and checking a runner's token reads
    its pod from the API into the index. A pod created after the listing's snapshot is then in the index and
    not in the listing: it must not be delivered as DELETED, which would close its live row as pod_deleted."""
    world = World.build(indexed=True)
    try:
        world.created(world.kube.add_evalrun("er", [suite("s", timeoutSeconds=600)]))
        live = world.kube.pod_of(world.job("er", "s"), "Running", {"running": {"startedAt": ts(world.clock.now)}},
                                 resourceVersion="105")
        name = live["metadata"]["name"]
        run = world.runner_opens(live)
        assert world.controller.kube.get_pod(NAMESPACE, name) is not None  # the token check's read
        server = ScriptedServer([], resource_version="100", watches=[[{"type": "ADDED", "object": live}]])
        seen = Seen()

        def deliver(event_type: str, obj: dict) -> None:  # as the controller's informer hands events on
            world.controller.on_runner_pod_event(obj, event_type)
            seen(event_type, obj)

        watcher = Informer(pods_source(server.url), world.controller.index, deliver).start()
        try:
            watches_opened(server, 2)  # the listing, then the first watch, were both handled
            assert seen.events == [("ADDED", name)], "the pod newer than the listing was taken for deleted"
            row = world.store.get_run(run.id)
            assert (row.status, row.cause) == ("running", None)
            assert world.controller.index.get(POD, NAMESPACE, name) is not None
        finally:
            watcher.stop()
            server.close()
    finally:
        world.close()


def test_a_pod_missing_from_a_listing_newer_than_its_read_is_deleted():
    """The other side of the same line: a pod read at version 95 and absent from a listing at 100 is gone."""
    server = ScriptedServer([pod("a", "90")], resource_version="100", watches=[])
    index, seen = ClusterIndex(), Seen()
    index.learn(POD, pod("b", "95"))  # read from the API, then deleted before the listing
    watcher = Informer(pods_source(server.url), index, seen).start()
    try:
        assert seen.wait_for(2) == [("DELETED", "b"), ("ADDED", "a")]
        assert [p["metadata"]["name"] for p in index.all(POD)] == ["a"]
    finally:
        watcher.stop()
        server.close()


def test_a_hung_api_server_times_out_every_request_and_never_holds_a_thread():
    server = HungServer()
    try:
        kube = Kube(api_client(server.url), request_timeout=(1.0, 1.0))
        began = time.monotonic()
        with pytest.raises(Exception) as raised:
            kube.get_pod("team", "p")
        assert time.monotonic() - began < 5, "the GET waited for an answer that never comes"
        assert "timed out" in str(raised.value).lower() or "timeout" in type(raised.value).__name__.lower()

        index, failures = ClusterIndex(), []
        watcher = Informer(pods_source(server.url, timeout=1.0), index, watch_seconds=1, read_margin_s=0.5,
                           connect_timeout_s=1, progress=lambda: failures.append(time.monotonic())).start()
        deadline = time.monotonic() + 10
        while len(failures) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(failures) >= 2, "the listing hung instead of timing out and retrying"
        assert not index.synced(POD)
        watcher.stop()
        watcher.join(5)
        assert not watcher._thread.is_alive(), "stop() did not end the informer"
    finally:
        server.close()

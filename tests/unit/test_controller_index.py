"""The controller reading pods, Jobs and nodes from its index: the death and sweep paths without API reads.

The index is fed as the informers feed it (a listing, then watch events);
`FakeKube.calls` counts what the controller still asks the API.
"""

from __future__ import annotations

import pytest
from controller_fakes import NAMESPACE, World, suite, terminated

from evalrunner.controller import builders
from evalrunner.controller.index import ClusterIndex, slim_pod
from evalrunner.timing import HEARTBEAT_LEASE_S


@pytest.fixture
def indexed():
    built = World.build(indexed=True)
    yield built
    built.close()


def start(world: World, names: list[str]) -> dict:
    for name in names:
        world.created(world.kube.add_evalrun(name, [suite("s", timeoutSeconds=600)], concurrencyPolicy="Allow"))
    rows = {name: world.started_pod(name, "s") for name in names}
    world.sync_index()
    world.kube.calls.clear()
    return rows


def test_a_sweep_of_many_running_rows_asks_the_api_nothing(indexed):
    rows = start(indexed, [f"er-{i}" for i in range(30)])
    indexed.clock.advance(HEARTBEAT_LEASE_S + 1)  # every lease lapsed: each row's pod is what keeps it open
    for _ in range(3):
        assert indexed.controller.sweeper.sweep().terminated == []
        indexed.controller.scan()
    assert not indexed.kube.calls, dict(indexed.kube.calls)
    assert all(indexed.store.get_run(run.id).status == "running" for _, run in rows.values())


def test_a_pod_gone_from_the_index_is_confirmed_with_one_read_then_closed(indexed):
    rows = start(indexed, ["gone", "new"])
    gone_pod, gone_run = rows["gone"]
    indexed.kube.delete_pod(NAMESPACE, gone_pod["metadata"]["name"])
    indexed.controller.index.apply("pods", "DELETED", gone_pod)  # its DELETED event was missed by the handler
    new_pod, new_run = rows["new"]
    indexed.controller.index.forget("pods", NAMESPACE, new_pod["metadata"]["name"])  # newer than the watch
    indexed.kube.calls.clear()

    closed = indexed.controller.sweeper.sweep().terminated
    assert [(r.id, r.cause) for r in closed] == [(gone_run.id, "pod_deleted")]
    assert indexed.store.get_run(new_run.id).status == "running", "a pod the watch has not shown yet is alive"
    assert indexed.kube.calls[("get", "Pod")] == 2, "one confirming read per pod the index lacks"
    indexed.kube.calls.clear()
    indexed.controller.sweeper.sweep()
    assert indexed.kube.calls[("get", "Pod")] == 0, "the pod read once is in the index now"


def test_a_death_event_closes_the_row_with_the_job_and_node_from_the_index(indexed):
    rows = start(indexed, ["oom"])
    pod, run = rows["oom"]
    dead = {**pod, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "runner", "state": terminated(137, indexed.clock.now, reason="OOMKilled"), "restartCount": 0}]}}
    indexed.kube.set_pod(dead)
    indexed.watch_event("MODIFIED", dead)
    row = indexed.store.get_run(run.id)
    assert (row.status, row.cause) == ("failed", "oom_killed")
    reads = {k: v for k, v in indexed.kube.calls.items() if k[0] in ("get", "list") and k[1] != "EvalRun"}
    assert reads == {}, f"the hot path read {reads} from the API"


def test_a_node_that_goes_not_ready_closes_its_pods_rows_once_the_grace_passes(indexed):
    rows = start(indexed, ["a", "b"])
    indexed.kube.add_node("node-0", ready="Unknown")
    node = indexed.kube.objects[("Node", "", "node-0")]
    indexed.controller.index.apply("nodes", "MODIFIED", node)
    indexed.controller.on_node_event(node, "MODIFIED")
    indexed.clock.advance(HEARTBEAT_LEASE_S + 60)
    indexed.controller.scan()
    causes = {indexed.store.get_run(run.id).cause for _, run in rows.values()}
    assert causes == {"node_lost"}
    assert indexed.kube.calls[("get", "Node")] == 0


def test_the_sweep_does_not_read_per_row_while_the_pod_watch_is_down(indexed):
    rows = start(indexed, ["a", "b", "c"])
    indexed.controller.index.unsynced("pods")  # the watch broke: absence proves nothing now
    for pod, _ in rows.values():
        indexed.controller.index.forget("pods", NAMESPACE, pod["metadata"]["name"])
    indexed.clock.advance(HEARTBEAT_LEASE_S - 1)
    assert indexed.controller.sweeper.sweep().terminated == []
    assert indexed.kube.calls[("get", "Pod")] == 0
    indexed.clock.advance(2)  # the lease is what decides meanwhile
    assert {r.cause for r in indexed.controller.sweeper.sweep().terminated} == {"heartbeat_lost"}


def test_finished_jobs_are_deleted_after_their_ttl_once_their_rows_closed(indexed):
    rows = start(indexed, ["done", "open"])
    for name in ("done", "open"):
        job = indexed.job(name, "s")
        indexed.kube.finish_job(NAMESPACE, job["metadata"]["name"], "Complete", "Completed")
        indexed.kube.objects[("Job", NAMESPACE, job["metadata"]["name"])]["status"]["conditions"][0][
            "lastTransitionTime"] = indexed.clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")
    indexed.runner_finishes(rows["done"][1])
    indexed.sync_index()
    janitor = indexed.controller.janitor
    assert janitor.collect() == [], "before the TTL"
    indexed.clock.advance(janitor.job_ttl_s + 1)
    indexed.store.heartbeat(rows["open"][1].id)
    done_job = indexed.job("done", "s")["metadata"]["name"]
    assert janitor.collect() == [f"{NAMESPACE}/{done_job}"]
    assert indexed.job("done", "s") is None and indexed.job("open", "s") is not None, "a running row keeps its Job"
    assert indexed.store.get_run(rows["done"][1].id).status == "completed", "the rows stay"


def test_a_read_answered_after_its_pod_was_deleted_does_not_bring_the_pod_back(indexed):
    """A read that misses the index asks the API; if the pod's DELETED event lands while that read is in
    flight, the read's answer is older than the deletion and must not put the pod back in the index (where
    a deleted pod would look alive to the scan and to the token check until the next listing)."""
    indexed.created(indexed.kube.add_evalrun("er", [suite("s", timeoutSeconds=600)], concurrencyPolicy="Allow"))
    indexed.sync_index(resource_version="100")
    pod = indexed.kube.pod_of(indexed.job("er", "s"), "Running", resourceVersion="105")
    name = pod["metadata"]["name"]
    api_read = indexed.kube.get_pod

    def read_racing_the_deletion(namespace: str, pod_name: str) -> dict | None:
        answer = api_read(namespace, pod_name)
        indexed.kube.delete_pod(namespace, pod_name)
        gone = {**pod, "metadata": {**pod["metadata"], "resourceVersion": "110"}}
        indexed.watch_event("ADDED", pod)  # the watch catches up meanwhile: created, then deleted
        indexed.watch_event("DELETED", gone)
        return answer

    indexed.kube.get_pod = read_racing_the_deletion
    indexed.controller.kube.get_pod(NAMESPACE, name)
    indexed.kube.get_pod = api_read
    assert indexed.controller.index.get("pods", NAMESPACE, name) is None, "the stale read resurrected the pod"
    assert indexed.controller.kube.get_pod(NAMESPACE, name) is None


def test_the_index_keeps_what_the_classifier_reads_and_drops_the_rest():
    pod = {"metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"a": "b"}, "managedFields": [1] * 50},
           "spec": {"nodeName": "node-0", "activeDeadlineSeconds": 90, "volumes": [{"name": "v"}] * 20,
                    "containers": [{"name": "runner", "env": [{"name": "X"}] * 40,
                                    "resources": {"limits": {"memory": "64Mi"}}}]},
           "status": {"phase": "Running"}}
    slim = slim_pod(pod)
    assert slim["spec"] == {"nodeName": "node-0", "activeDeadlineSeconds": 90,
                            "containers": [{"name": "runner", "resources": {"limits": {"memory": "64Mi"}}}]}
    assert "managedFields" not in slim["metadata"] and slim["status"] == {"phase": "Running"}
    index = ClusterIndex()
    assert not index.synced("pods")
    assert index.replace("pods", [pod]) == [] and index.synced("pods")
    assert [p["metadata"]["name"] for p in index.replace("pods", [])] == ["p"], "vanished while unwatched"


def test_the_index_never_goes_back_in_time_for_an_object():
    def pod(version: str, phase: str = "Running") -> dict:
        return {"metadata": {"name": "p", "namespace": "n", "resourceVersion": version}, "status": {"phase": phase}}

    index = ClusterIndex()
    index.replace("pods", [], "100")
    index.learn("pods", pod("120", "Failed"))  # a read ahead of the watch
    index.apply("pods", "MODIFIED", pod("110"))  # the watch catching up
    assert index.get("pods", "n", "p")["status"]["phase"] == "Failed"
    index.learn("pods", pod("115"))  # a slower read
    assert index.get("pods", "n", "p")["metadata"]["resourceVersion"] == "120"
    assert index.replace("pods", [], "118") == [], "newer than the listing: not gone"
    assert index.replace("pods", [], "125") != [], "no newer than the listing: gone"
    index.learn("pods", pod("124"))  # read before that listing, answered after it
    assert index.get("pods", "n", "p") is None
    index.learn("pods", {"metadata": {"name": "p", "namespace": "n", "resourceVersion": "x"}})
    assert index.get("pods", "n", "p") is not None, "versions that do not compare: the read is kept, as ever"


def test_a_listing_reads_its_pods_rows_at_once_and_closes_only_what_died(indexed):
    """A restarted controller's pod listing: one store read for every listed pod's row, not one per pod (new
    deaths wait behind the listing), with the same outcome as an ADDED event per pod."""
    names = [f"done-{i}" for i in range(20)] + ["oom", "live", "unopened"]
    for name in names:
        indexed.created(indexed.kube.add_evalrun(name, [suite("s", timeoutSeconds=600)], concurrencyPolicy="Allow"))
    pods = {}
    for name in names[:-1]:
        pods[name], run = indexed.started_pod(name, "s")
        if name.startswith("done-"):
            indexed.runner_finishes(run)
            pods[name]["status"] = {"phase": "Succeeded", "containerStatuses": [
                {"name": "runner", "state": terminated(0, indexed.clock.now, "Completed"), "restartCount": 0}]}
    pods["oom"]["status"] = {"phase": "Failed", "containerStatuses": [
        {"name": "runner", "state": terminated(137, indexed.clock.now, "OOMKilled"), "restartCount": 0}]}
    pods["unopened"] = indexed.kube.pod_of(indexed.job("unopened", "s"), "Failed",
                                           terminated(1, indexed.clock.now))  # died before its runner opened
    for pod in pods.values():
        indexed.kube.set_pod(pod)
    indexed.sync_index()

    point_reads = []
    get_run = indexed.store.get_run
    indexed.store.get_run = lambda run_id: point_reads.append(run_id) or get_run(run_id)
    indexed.controller.on_runner_pods_listed(list(pods.values()))
    indexed.store.get_run = get_run

    rows = {name: indexed.store.get_run(builders.run_id_for(indexed.kube.evalrun(name)["metadata"]["uid"], "s", 1))
            for name in names}
    assert (rows["oom"].status, rows["oom"].cause) == ("failed", "oom_killed")
    assert (rows["unopened"].status, rows["unopened"].cause) == ("failed", "error")
    assert rows["live"].status == "running"
    assert {rows[n].status for n in names if n.startswith("done-")} == {"completed"}
    assert len(point_reads) <= 3, f"a row read per listed pod: {len(point_reads)} for {len(pods)} pods"
    assert {key[1] for key in indexed.controller.queue.drain()} == set(names), "each pod's EvalRun gets its status"

"""The controller's sweep: running rows against the pods that exist, with a fake API and a fixed clock."""

from __future__ import annotations

from controller_fakes import NAMESPACE, World, suite, terminated

from evalrunner.owner import Owner
from evalrunner.store import RunRequest
from evalrunner.timing import HEARTBEAT_LEASE_S


def test_rows_whose_pods_died_unseen_are_closed_with_their_cause(world):
    for name in ("gone", "killed", "silent", "live", "late"):
        world.created(world.kube.add_evalrun(name, [suite("s", timeoutSeconds=600)], deadlineGraceSeconds=0,
                                            concurrencyPolicy="Allow"))
    rows = {name: world.started_pod(name, "s") for name in ("gone", "killed", "silent", "live", "late")}

    gone_pod, _ = rows["gone"]
    world.kube.delete_pod(NAMESPACE, gone_pod["metadata"]["name"])  # while no controller watched
    killed_pod, _ = rows["killed"]
    world.kube.set_pod({**killed_pod, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "runner", "state": terminated(137, world.clock.now), "restartCount": 0}]}})
    silent_pod, _ = rows["silent"]
    world.kube.set_pod({**silent_pod, "status": {"phase": "Unknown"}})

    world.clock.advance(HEARTBEAT_LEASE_S + 1)  # every heartbeat lapsed; only "live" and "late" have live pods
    world.store.heartbeat(rows["late"][1].id)
    result = world.controller.sweeper.sweep()
    causes = {r.scope.name: r.cause for r in result.terminated}
    assert causes == {"gone": "pod_deleted", "killed": "killed", "silent": "node_lost"}, causes
    assert world.store.get_run(rows["live"][1].id).status == "running", "a live pod outlasts a lapsed lease"

    world.clock.advance(2 * 600)  # past the deadline of everything still running
    late = {r.scope.name: r.cause for r in world.controller.sweeper.sweep().terminated}
    assert late == {"live": "deadline_exceeded", "late": "deadline_exceeded"}
    assert world.controller.sweeper.sweep().terminated == []  # each row closed exactly once


def test_a_lapsed_heartbeat_with_no_live_pod_is_heartbeat_lost(world):
    world.created(world.kube.add_evalrun("er", [suite("s", timeoutSeconds=600)]))
    pod, run = world.started_pod("er", "s")
    world.kube.set_pod({**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2026-12-01T12:00:30Z"},
                        "status": {"phase": "Running"}})  # terminating, not yet classified
    world.clock.advance(HEARTBEAT_LEASE_S + 1)
    [closed] = world.controller.sweeper.sweep().terminated
    assert closed.cause in ("pod_deleted", "heartbeat_lost")


def test_the_sweep_repairs_case_rows_left_running_under_closed_runs(world):
    world.created(world.kube.add_evalrun("er", [suite("s")]))
    _, run = world.started_pod("er", "s")
    world.runner_reports(run, completed=("c0",), running=("c1",))
    world.store._cur().execute("UPDATE eval_runs SET status = 'failed', error = 'Manual recovery' WHERE id = ?",
                               [run.id])  # the runbook's SQL
    result = world.controller.sweeper.sweep()
    assert [(s.run_id, s.count, s.cause) for s in result.repaired] == [(run.id, 1, "manual")]
    assert {c.name: c.status for c in world.store.cases(run.id)} == {"c0": "completed", "c1": "failed"}
    assert len(world.controller.queue) == 1  # its EvalRun's status is rebuilt


def test_rows_of_pods_outside_the_watched_namespaces_are_left_alone():
    world = World.build(namespaces=("elsewhere",))
    try:
        owner = Owner(kind="pod", namespace=NAMESPACE, pod="p")  # "team" is another controller's
        run = world.store.start_run(RunRequest("s", ("a",), 10, owner)).run
        world.clock.advance(3600)
        assert world.controller.sweeper.sweep().terminated == []
        assert world.store.get_run(run.id).status == "running"
    finally:
        world.close()

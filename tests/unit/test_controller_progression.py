"""EvalRun progression: admit, start, retry and the status, with a fake Kubernetes API, a real
in-memory store and a fixed clock (tests/unit/controller_fakes.py). Each defect the churn exposed has
its test here: a row of another scope under the EvalRun's run id, refusals that outlived their EvalRun, Forbid and Replace
blind to Jobs whose runner had not opened a row, an attempt Pending forever, stale status fields."""

from __future__ import annotations

import dataclasses

from controller_fakes import NAMESPACE, World, suite, terminated

from evalrunner.controller import builders, queue
from evalrunner.controller.children import RunnerJob
from evalrunner.controller.progression import Attempt, CloseLost, Start, Wait, attempt_step, wanted_attempt
from evalrunner.models import Cause, RunStatus
from evalrunner.owner import Owner
from evalrunner.scope import Scope
from evalrunner.store import RunRequest


# ---------------------------------------------------------------- the pure decisions


def test_wanted_attempt_is_the_first_or_the_retry_of_a_failed_one(world):
    assert wanted_attempt(None, retries=1) == Attempt(1, None)
    evalrun = world.kube.add_evalrun("er", [suite("s")], retries=1)
    world.created(evalrun)
    _, run = world.started_pod("er", "s")
    assert wanted_attempt(run, retries=1) is None  # running
    killed = world.store.terminate_run(run.id, Cause.KILLED, "SIGKILL", "controller")
    assert wanted_attempt(killed, retries=1) == Attempt(2, run.id)
    assert wanted_attempt(killed, retries=0) is None  # no attempts left
    assert wanted_attempt(dataclasses.replace(killed, cause="replaced"), retries=5) is None  # a policy decided


def test_attempt_step_follows_the_job():
    job = {"metadata": {"name": "j", "namespace": "ns", "annotations": {builders.ANNOTATION_RUN_ID: "r"},
                        "ownerReferences": [{"uid": "u", "name": "er", "controller": True}]}}
    attempt = Attempt(1, None)
    assert attempt_step(attempt, None) == Start(attempt)
    assert attempt_step(attempt, RunnerJob.of(job)) == Wait()
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    assert isinstance(attempt_step(attempt, RunnerJob.of(job)), CloseLost)


# ---------------------------------------------------------------- starting


def test_an_evalrun_gets_its_configmap_and_job_and_a_status_and_no_secret(world):
    evalrun = world.kube.add_evalrun("nightly", [suite("qa")])
    world.created(evalrun)
    job = world.job("nightly", "qa")
    assert job is not None and job["metadata"]["annotations"][builders.ANNOTATION_RUN_ID].endswith("-qa-a1")
    assert world.kube.get_job(NAMESPACE, "nightly-qa-1") is not None
    assert ("ConfigMap", NAMESPACE, "nightly-qa") in world.kube.objects
    # The runner's credential is its pod's own projected token: nothing to create, leak or revoke.
    assert not [key for key in world.kube.objects if key[0] == "Secret"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    projected = volumes[builders.TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]
    assert projected["audience"] == builders.DEFAULT_TOKEN_AUDIENCE
    assert world.kube.status("nightly")["phase"] == "Pending"
    assert world.kube.reasons("nightly") == ["Started"]

    _, run = world.started_pod("nightly", "qa")
    world.settle()
    assert world.kube.suite_status("nightly", "qa")["phase"] == "Running"
    world.runner_finishes(run)
    world.settle()
    assert world.kube.status("nightly")["phase"] == "Succeeded"


def test_a_row_under_the_evalruns_run_id_but_another_scope_is_not_its_attempt(world):
    """A row made under this EvalRun's next run id by someone else (another namespace's token, before
    runs were bound to pods) was taken for the suite's attempt: the status showed the intruder's
    results and no Job started."""
    evalrun = world.kube.add_evalrun("er", [suite("s")])
    run_id = builders.run_id_for(evalrun["metadata"]["uid"], "s", 1)
    intruder = Scope("other-team", "theirs", "uid-theirs")
    world.store.start_run(RunRequest(suite="s", case_names=("c0",), timeout_seconds=5.0, run_id=run_id,
                                     owner=Owner(kind="pod", namespace="other-team", pod="p", pod_uid="u"),
                                     scope=intruder, admitted=True))
    world.store.finish_run(run_id, RunStatus.COMPLETED, None, None, {})
    world.created(evalrun)
    assert world.job("er", "s") is not None, "the intruder's row stood in for the suite's attempt"
    assert world.kube.status("er")["phase"] == "Pending"


def test_a_failed_attempt_is_retried_and_resumes_it(world):
    evalrun = world.kube.add_evalrun("er", [suite("s")], retries=1)
    world.created(evalrun)
    pod, run = world.started_pod("er", "s")
    world.runner_reports(run, completed=("c0",), running=("c1",))
    world.kube.set_pod({**pod, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "runner", "state": terminated(137, world.clock.now), "restartCount": 0}]}})
    world.controller.on_runner_pod_event(world.kube.get_pod(NAMESPACE, pod["metadata"]["name"]), "MODIFIED")
    world.settle()
    retry = world.job("er", "s", 2)
    assert retry is not None
    command = retry["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--resume") + 1] == run.id
    assert "Retrying" in world.kube.reasons("er")
    entry = world.kube.suite_status("er", "s")
    assert (entry["attempt"], entry["phase"], entry["cause"]) == (1, "Running", "killed")


# ---------------------------------------------------------------- the suite lock


def test_forbid_sees_a_job_whose_runner_has_not_opened_its_row(world):
    """Item 7: two EvalRuns of one suite created at once under Forbid: one runs, the other is refused."""
    first = world.kube.add_evalrun("first", [suite("shared")], concurrencyPolicy="Forbid")
    second = world.kube.add_evalrun("second", [suite("shared")], concurrencyPolicy="Forbid")
    world.controller.on_evalrun_event(first, "ADDED")
    world.controller.on_evalrun_event(second, "ADDED")
    world.settle()
    started = [name for name in ("first", "second") if world.job(name, "shared") is not None]
    assert len(started) == 1, started
    refused = "second" if started == ["first"] else "first"
    entry = world.kube.suite_status(refused, "shared")
    assert entry["phase"] == "Failed" and entry["message"].startswith("refused:"), entry
    assert "Refused" in world.kube.reasons(refused)
    assert world.kube.status(refused)["phase"] == "Failed"


def test_replace_closes_the_live_attempt_and_deletes_its_job(world):
    first = world.kube.add_evalrun("first", [suite("shared")])
    world.created(first)
    pod, run = world.started_pod("first", "shared")
    world.runner_reports(run, completed=("c0",), running=("c1",))
    second = world.kube.add_evalrun("second", [suite("shared")], concurrencyPolicy="Replace")
    world.created(second)
    world.settle()

    replaced = world.store.get_run(run.id)
    assert (replaced.status, replaced.cause) == ("failed", "replaced")
    assert {c.name: c.status for c in world.store.cases(run.id)} == {"c0": "completed", "c1": "failed"}
    assert world.job("first", "shared") is None and world.kube.get_pod(NAMESPACE, pod["metadata"]["name"]) is None
    assert world.job("second", "shared") is not None
    assert "Replaced" in world.kube.reasons("second")
    entry = world.kube.suite_status("first", "shared")
    assert (entry["phase"], entry["cause"]) == ("Failed", "replaced")


def test_replace_also_closes_an_attempt_whose_runner_never_opened_its_row(world):
    first = world.kube.add_evalrun("first", [suite("shared")])
    world.created(first)  # a Job, no row yet (its pod is still being scheduled)
    run_id = world.job("first", "shared")["metadata"]["annotations"][builders.ANNOTATION_RUN_ID]
    second = world.kube.add_evalrun("second", [suite("shared")], concurrencyPolicy="Replace")
    world.created(second)
    world.settle()

    row = world.store.get_run(run_id)
    assert row is not None and (row.status, row.cause) == ("failed", "replaced")
    assert world.job("first", "shared") is None
    assert world.kube.suite_status("first", "shared")["phase"] == "Failed", "the replaced EvalRun is never Pending forever"


def test_a_refusal_does_not_outlive_its_evalrun(world):
    """Item 6: deleted after a Forbid refusal and created again under the same name, it is judged anew."""
    first = world.kube.add_evalrun("first", [suite("shared")])
    world.created(first)
    _, run = world.started_pod("first", "shared")
    second = world.kube.add_evalrun("second", [suite("shared")], concurrencyPolicy="Forbid")
    world.created(second)
    assert world.kube.suite_status("second", "shared")["message"].startswith("refused:")

    world.runner_finishes(run)
    world.kube.delete_evalrun(NAMESPACE, "second")  # its DELETED event may be missed (a controller restart)
    again = world.kube.add_evalrun("second", [suite("shared")], concurrencyPolicy="Forbid")
    world.created(again)
    assert world.job("second", "shared") is not None, "refused at once with the deleted EvalRun's message"
    assert world.kube.suite_status("second", "shared")["phase"] == "Pending"


def test_forgetting_a_deleted_evalrun_drops_its_refusals(world):
    first = world.kube.add_evalrun("first", [suite("shared")])
    world.created(first)
    world.started_pod("first", "shared")
    second = world.kube.add_evalrun("second", [suite("shared")], concurrencyPolicy="Forbid")
    world.created(second)
    deleted = world.kube.delete_evalrun(NAMESPACE, "second")
    world.controller.on_evalrun_event(deleted, "DELETED")
    assert world.controller.progression._refusals == {}


# ---------------------------------------------------------------- attempts that vanished


def test_a_pod_deleted_while_pending_and_unseen_gets_a_new_attempt(world):
    """Item 8: the pod went while the controller was down: no row, no pod, a Failed Job."""
    evalrun = world.kube.add_evalrun("er", [suite("s")], retries=1)
    world.created(evalrun)
    run_id = world.job("er", "s")["metadata"]["annotations"][builders.ANNOTATION_RUN_ID]
    world.kube.finish_job(NAMESPACE, "er-s-1")  # the Job controller counted the vanished pod as failed

    world.controller.on_evalrun_event(world.kube.evalrun("er"), "ADDED")  # the restart's re-list
    world.settle()
    lost = world.store.get_run(run_id)
    assert lost is not None and (lost.status, lost.cause) == ("failed", "pod_deleted")
    assert world.job("er", "s", 2) is not None
    assert world.kube.suite_status("er", "s")["phase"] == "Running"


def test_a_vanished_last_attempt_fails_the_suite_instead_of_leaving_it_pending(world):
    evalrun = world.kube.add_evalrun("er", [suite("s")])
    world.created(evalrun)
    world.kube.finish_job(NAMESPACE, "er-s-1", reason="DeadlineExceeded")
    world.controller.on_runner_job_event(world.kube.get_job(NAMESPACE, "er-s-1"), "MODIFIED")
    world.settle()
    entry = world.kube.suite_status("er", "s")
    assert (entry["phase"], entry["cause"]) == ("Failed", "deadline_exceeded")
    assert world.kube.status("er")["phase"] == "Failed"


def test_a_finished_job_whose_pod_remains_is_judged_by_its_pod(world):
    evalrun = world.kube.add_evalrun("er", [suite("s")], startTimeoutSeconds=5)
    world.created(evalrun)
    job = world.job("er", "s")
    world.kube.pod_of(job, "Failed", terminated(1, world.clock.now))
    world.kube.finish_job(NAMESPACE, "er-s-1")
    world.controller.on_runner_job_event(world.kube.get_job(NAMESPACE, "er-s-1"), "MODIFIED")
    world.settle()
    row = world.store.get_run(job["metadata"]["annotations"][builders.ANNOTATION_RUN_ID])
    assert (row.status, row.cause) == ("failed", "error") and "exited with code 1" in row.error


# ---------------------------------------------------------------- status


def test_status_patches_remove_stale_fields_and_skip_no_ops(world):
    """Item 9: a merge patch never removed `completedAt`; an unchanged status was patched on every refresh."""
    evalrun = world.kube.add_evalrun("er", [suite("s")])
    world.created(evalrun)
    _, run = world.started_pod("er", "s")
    world.runner_finishes(run)
    world.settle()
    assert world.kube.status("er")["phase"] == "Succeeded" and "completedAt" in world.kube.status("er")

    patches = len(world.kube.patches)
    for _ in range(3):
        world.controller.on_evalrun_event(world.kube.evalrun("er"), "MODIFIED")  # every patch comes back
        world.controller.refresh()
    assert len(world.kube.patches) == patches, world.kube.patches[patches:]

    world.kube.edit_spec(NAMESPACE, "er", suites=[suite("s"), suite("added")])
    world.controller.on_evalrun_event(world.kube.evalrun("er"), "MODIFIED")
    world.settle()
    status = world.kube.status("er")
    assert status["phase"] == "Pending" or status["phase"] == "Running"
    assert "completedAt" not in status, status
    assert status["observedGeneration"] == 2


def test_an_invalid_spec_is_reported_once(world):
    evalrun = world.kube.add_evalrun("bad", [suite("s", timeoutSeconds=-1)])
    for _ in range(3):
        world.controller.on_evalrun_event(world.kube.evalrun("bad"), "MODIFIED")
        world.controller.refresh()
    assert world.kube.status("bad")["phase"] == "Failed"
    assert world.kube.reasons("bad") == ["InvalidSpec"]
    assert evalrun["metadata"]["name"] == "bad"


def test_a_failing_reconcile_is_logged_and_retried(logs, world):
    evalrun = world.kube.add_evalrun("er", [suite("s")])
    world.kube.fail_next("get", "EvalRun", status=500)
    world.created(evalrun)
    assert [e["evalrun"] for e in logs.events("controller.reconcile_failed")] == [f"{NAMESPACE}/er"]
    world.clock.advance(queue.BACKOFF_START_S)
    world.settle()
    assert world.job("er", "s") is not None


def test_api_errors_are_errors_not_absences(world):
    """A 500 on reading a Job must not read as "no Job" (which would start a second attempt)."""
    evalrun = world.kube.add_evalrun("er", [suite("s")])
    world.created(evalrun)
    world.kube.fail_next("get", "Job", status=500)
    world.controller.on_evalrun_event(world.kube.evalrun("er"), "MODIFIED")
    world.controller.refresh()
    assert [k for k in world.kube.objects if k[0] == "Job"] == [("Job", NAMESPACE, "er-s-1")]
    assert len(world.controller.queue) == 1


# ---------------------------------------------------------------- datasets and the ConfigMap limit


def too_large(name: str) -> dict:
    """An inline suite whose file is over the 1 MiB a ConfigMap holds (an EvalRun itself may be up to ~1.5 MiB)."""
    big = "x" * (builders.CONFIGMAP_MAX_BYTES // 4)
    return suite(name) | {"cases": [{"id": f"c{i}", "input": big, "expected": "x"} for i in range(4)]}


def test_a_suite_too_large_for_its_configmap_fails_alone_saying_what_to_do(world):
    evalrun = world.kube.add_evalrun("er", [too_large("huge"), suite("small")])
    world.created(evalrun)
    world.settle()
    assert world.job("er", "huge") is None and ("ConfigMap", NAMESPACE, "er-huge") not in world.kube.objects
    entry = world.kube.suite_status("er", "huge")
    assert entry["phase"] == "Failed"
    assert entry["message"].startswith("refused: suite huge: its suite file is ")
    assert "dataset.persistentVolumeClaim" in entry["message"] and "dataset.imagePath" in entry["message"]
    assert world.kube.reasons("er").count("InvalidSpec") == 1

    assert world.job("er", "small") is not None  # the other suite runs
    _, run = world.started_pod("er", "small")
    world.runner_finishes(run)
    world.settle()
    assert world.kube.status("er")["phase"] == "Failed"

    # A restarted controller reads the refusal back from the status and starts nothing.
    restarted = World(world.clock, world.kube, world.store,
                      type(world.controller)(world.store, world.kube, world.controller.settings, world.clock))
    restarted.created(world.kube.evalrun("er"))
    assert world.job("er", "huge") is None
    assert world.kube.reasons("er").count("InvalidSpec") == 1


def test_a_suite_too_large_to_start_replaces_nobody(world):
    first = world.kube.add_evalrun("first", [suite("shared")])
    world.created(first)
    _, run = world.started_pod("first", "shared")
    second = world.kube.add_evalrun("second", [too_large("shared")], concurrencyPolicy="Replace")
    world.created(second)
    world.settle()
    assert world.store.get_run(run.id).status == "running"
    assert world.job("first", "shared") is not None
    assert world.kube.suite_status("second", "shared")["phase"] == "Failed"


def test_a_dataset_suite_starts_with_its_dataset_mounted(world):
    dataset = {"configMapRef": {"name": "qa-data", "key": "cases.jsonl"}, "input": "question"}
    evalrun = world.kube.add_evalrun("er", [{k: v for k, v in suite("qa").items() if k != "cases"}
                                            | {"dataset": dataset}])
    world.created(evalrun)
    job = world.job("er", "qa")
    assert job is not None and "activeDeadlineSeconds" not in job["spec"]  # its size is in the file
    pod = job["spec"]["template"]["spec"]
    assert {"name": "dataset", "configMap": {"name": "qa-data", "items": [{"key": "cases.jsonl",
                                                                           "path": "cases.jsonl"}]}} in pod["volumes"]
    suite_file = world.kube.objects[("ConfigMap", NAMESPACE, "er-qa")]["data"][builders.SUITE_KEY]
    assert "path: /etc/evalrunner/dataset/cases.jsonl" in suite_file
    assert world.kube.reasons("er") == ["Started"]


def test_a_failing_evalrun_backs_off_and_an_event_still_reaches_it_at_once(logs, world):
    """An API server that refuses every call is asked again after 0.5 s, 1 s, 2 s ..., not five times a second."""
    evalrun = world.kube.add_evalrun("er", [suite("s")])
    world.kube.fail_next("get", "EvalRun", status=500, times=4)
    world.created(evalrun)
    waits = []
    for _ in range(3):
        assert world.controller.refresh() == 0, "retried before its backoff"
        waits.append(queue.backoff_delay(world.controller.queue.failures((NAMESPACE, "er"))))
        world.clock.advance(waits[-1])
        world.controller.refresh()
    assert waits == [0.5, 1.0, 2.0]
    assert len(logs.events("controller.reconcile_failed")) == 4
    world.controller.on_evalrun_event(evalrun, "MODIFIED")  # an edit may be the fix: no waiting for it
    world.controller.refresh()
    assert world.job("er", "s") is not None
    assert world.controller.queue.failures((NAMESPACE, "er")) == 0, "a success resets the backoff"


def test_a_suite_that_finishes_between_two_refreshes_still_gets_its_suite_started_event(world):
    world.created(world.kube.add_evalrun("fast", [suite("s")]))
    pod = world.kube.pod_of(world.job("fast", "s"), "Running", {"running": {"startedAt": "2026-12-01T12:00:00Z"}})
    run = world.store.start_run(RunRequest(
        suite="s", case_names=("c0", "c1"), timeout_seconds=30, run_id=world.job("fast", "s")["metadata"][
            "annotations"][builders.ANNOTATION_RUN_ID],
        owner=Owner(kind="pod", namespace=NAMESPACE, pod=pod["metadata"]["name"], pod_uid=pod["metadata"]["uid"]),
        scope=Scope.of(world.kube.evalrun("fast")), admitted=True)).run
    world.store.finish_run(run.id, RunStatus.COMPLETED)  # opened and closed before any refresh saw it running
    world.controller.on_run_changed(run.scope)
    world.settle()
    reasons = world.kube.reasons("fast")
    assert "SuiteStarted" in reasons and "SuiteCompleted" in reasons, reasons
    assert reasons.index("SuiteStarted") < reasons.index("SuiteCompleted")


def test_a_finished_evalrun_whose_rows_retention_deleted_is_not_run_again(world):
    """`--retain-days` deletes old rows; the EvalRun object (kept by GitOps) must not start its suites anew."""
    evalrun = world.kube.add_evalrun("nightly", [suite("qa")])
    world.created(evalrun)
    _, run = world.started_pod("nightly", "qa")
    world.runner_finishes(run)
    world.settle()
    assert world.kube.status("nightly")["phase"] == "Succeeded"
    world.kube.delete_job(NAMESPACE, "nightly-qa-1")  # the janitor, long ago
    world.clock.advance(40 * 86400)
    assert world.store.delete_expired_runs(world.clock.now).runs == 1

    world.created(world.kube.evalrun("nightly"))  # a restarted controller lists it again
    world.settle()
    assert world.job("nightly", "qa") is None, "its suite was started again"
    status = world.kube.status("nightly")
    assert status["phase"] == "Succeeded" and world.kube.suite_status("nightly", "qa")["phase"] == "Succeeded", status

"""Runner pods' tokens: a token writes exactly its pod's run, and ends with its pod.

The controller side (EvalRun -> Job -> pod) is the in-memory fake API of
controller_fakes.py; the TokenReview is answered by that fake as the API
server would (a bound token is valid while its pod exists with that uid).
The store service is real, on 127.0.0.1, over a real DuckDB file; the cluster
test (tests/cluster/test_tenant_isolation.py) does the same against a real
API server, with tokens it issued.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest
from controller_fakes import Clock, FakeKube, suite
from service_support import ServiceThread

from evalrunner.controller import builders
from evalrunner.controller.pod_tokens import (POD_NAME_EXTRA, POD_UID_EXTRA, PodTokens, Refused, reviewed_pod,
                                              runner_grant)
from evalrunner.faults import Faults
from evalrunner.scope import Scope
from evalrunner.store import DuckDBStore

AUDIENCE = "evalrunner-store.ops.er"
ADMIN = "admin-token-for-pod-token-tests"


class ReviewingKube(FakeKube):
    """The fake API, plus TokenReview: a token names a pod, and is valid while that pod exists."""

    def __init__(self, clock: Clock):
        super().__init__(clock)
        self.issued: dict[str, tuple[str, str, str, str]] = {}  # token -> (namespace, pod, uid, audience)

    def issue(self, pod: dict, audience: str = AUDIENCE) -> str:
        meta = pod["metadata"]
        token = f"header.{meta['uid']}-{audience.replace('.', '-')}.signature"  # a JWT's shape
        self.issued[token] = (meta["namespace"], meta["name"], meta["uid"], audience)
        return token

    def review_token(self, token: str, audiences: list[str]) -> dict:
        self.calls[("create", "TokenReview")] += 1
        held = self.issued.get(token)
        if held is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        namespace, name, uid, audience = held
        pod = self.objects.get(("Pod", namespace, name))
        if pod is None or pod["metadata"]["uid"] != uid:
            return {"authenticated": False, "error": "pod does not exist"}
        if audience not in audiences:
            return {"authenticated": False, "error": "token audiences is invalid for the target audiences"}
        return {"authenticated": True, "audiences": [audience], "user": {
            "username": f"system:serviceaccount:{namespace}:default",
            "extra": {POD_NAME_EXTRA: [name], POD_UID_EXTRA: [uid]}}}


def started(kube: ReviewingKube, namespace: str, name: str, suite_name: str = "s") -> tuple[dict, dict, dict]:
    """An EvalRun in `namespace`, the Job the controller builds for it, and that Job's Running pod."""
    evalrun = kube.add_evalrun(name, [suite(suite_name)], namespace=namespace)
    from evalrunner.models import EvalRunSpec

    spec = EvalRunSpec.model_validate(evalrun["spec"])
    job = builders.build_job(evalrun, spec.suites[0], 1, None, "http://store", spec, token_audience=AUDIENCE)
    job, _ = kube.create_owned(job, evalrun)
    pod = kube.pod_of(job, "Running")
    return evalrun, job, pod


@pytest.fixture
def kube():
    return ReviewingKube(Clock())


# ---------------------------------------------------------------- whom a review names


def test_a_review_names_the_pod_or_is_refused():
    status = {"authenticated": True, "audiences": [AUDIENCE], "user": {
        "username": "system:serviceaccount:team-a:default", "extra": {POD_NAME_EXTRA: ["p"], POD_UID_EXTRA: ["u"]}}}
    assert reviewed_pod(status, AUDIENCE).namespace == "team-a"
    with pytest.raises(Refused, match="did not accept"):
        reviewed_pod({"authenticated": False, "error": "expired"}, AUDIENCE)
    with pytest.raises(Refused, match="not for this store"):
        reviewed_pod({**status, "audiences": ["https://kubernetes.default.svc"]}, AUDIENCE)
    unbound = copy.deepcopy(status)
    unbound["user"]["extra"] = {}
    with pytest.raises(Refused, match="not bound to a pod"):
        reviewed_pod(unbound, AUDIENCE)


def test_a_runner_pod_is_granted_exactly_its_run(kube):
    evalrun, job, pod = started(kube, "team-a", "nightly")
    who = reviewed_pod(kube.review_token(kube.issue(pod), [AUDIENCE]), AUDIENCE)
    caller = runner_grant(who, pod, job, evalrun)
    assert caller.scope == Scope.of(evalrun)
    assert caller.grant.run_id == builders.run_id_for(evalrun["metadata"]["uid"], "s", 1)
    assert caller.may_write(caller.grant.run_id, caller.scope)
    assert not caller.may_write(builders.run_id_for(evalrun["metadata"]["uid"], "s", 2), caller.scope)


def test_a_hand_made_pod_cannot_claim_another_namespaces_run(kube):
    """A tenant copies the victim's Job and pod annotations into its own namespace: refused at each link."""
    victim, victim_job, victim_pod = started(kube, "team-b", "victim")
    mine, my_job, my_pod = started(kube, "team-a", "mine")
    forged = copy.deepcopy(my_pod)
    forged["metadata"]["annotations"] = dict(victim_pod["metadata"]["annotations"])
    who = reviewed_pod(kube.review_token(kube.issue(my_pod), [AUDIENCE]), AUDIENCE)
    with pytest.raises(Refused, match="names another run than its Job"):
        runner_grant(who, forged, my_job, mine)
    # ... and with a Job forged to match, owned by the victim's EvalRun (owner references cannot cross namespaces)
    forged_job = copy.deepcopy(my_job)
    forged_job["metadata"]["annotations"] = dict(victim_job["metadata"]["annotations"])
    forged_job["metadata"]["ownerReferences"] = copy.deepcopy(victim_job["metadata"]["ownerReferences"])
    forged["metadata"]["annotations"][builders.ANNOTATION_EVALRUN] = "victim"
    with pytest.raises(Refused, match="not controlled by EvalRun victim of its namespace"):
        runner_grant(who, forged, forged_job, victim)
    with pytest.raises(Refused, match="not controlled by EvalRun"):
        runner_grant(who, forged, forged_job, None)


def test_a_finished_or_replaced_pod_is_refused(kube):
    evalrun, job, pod = started(kube, "team-a", "nightly")
    who = reviewed_pod(kube.review_token(kube.issue(pod), [AUDIENCE]), AUDIENCE)
    with pytest.raises(Refused, match="has finished"):
        runner_grant(who, {**pod, "status": {"phase": "Succeeded"}}, job, evalrun)
    other = copy.deepcopy(pod)
    other["metadata"]["uid"] = "another-uid"
    with pytest.raises(Refused, match="no longer exists"):
        runner_grant(who, other, job, evalrun)
    with pytest.raises(Refused, match="no longer exists"):
        runner_grant(who, None, job, evalrun)


# ---------------------------------------------------------------- PodTokens: caching, and the end of a pod


def test_a_review_is_cached_but_a_deleted_pods_token_is_refused_at_once(kube):
    evalrun, job, pod = started(kube, "team-a", "nightly")
    tokens = PodTokens(kube, AUDIENCE, clock=lambda: 0.0)
    token = kube.issue(pod)
    for _ in range(5):
        assert tokens.caller(token).grant.pod == pod["metadata"]["name"]
    assert kube.calls[("create", "TokenReview")] == 1, "a review per request"
    assert kube.calls[("get", "EvalRun")] <= 1

    kube.delete_pod("team-a", pod["metadata"]["name"])
    with pytest.raises(Refused, match="no longer exists"):
        tokens.caller(token)  # the review is still cached; the pod is not
    reviews = kube.calls[("create", "TokenReview")]
    with pytest.raises(Refused):
        tokens.caller(token)
    assert kube.calls[("create", "TokenReview")] == reviews, "a refused token costs no further request for a while"


def test_unknown_tokens_and_other_audiences_and_namespaces_are_refused(kube):
    evalrun, job, pod = started(kube, "team-a", "nightly")
    with pytest.raises(Refused, match="did not accept"):
        PodTokens(kube, AUDIENCE).caller("header.forged.signature")
    with pytest.raises(Refused, match="did not accept"):
        PodTokens(kube, "another-release").caller(kube.issue(pod))
    with pytest.raises(Refused, match="does not serve"):
        PodTokens(kube, AUDIENCE, namespaces=("team-b",)).caller(kube.issue(pod))


# ---------------------------------------------------------------- through the store service


@pytest.fixture
def service(tmp_path, kube):
    store = DuckDBStore.open(tmp_path / "tenants.duckdb", faults=Faults(""))
    svc = ServiceThread(store, ADMIN, pod_tokens=PodTokens(kube, AUDIENCE).caller)
    yield svc
    svc.stop()
    store.close()


def call(service, method: str, path: str, body: dict | None, token: str) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{service.origin}/api/v1{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_body(run_id: str | None, pod: dict, **extra) -> dict:
    meta = pod["metadata"]
    owner = {"kind": "pod", "namespace": meta["namespace"], "pod": meta["name"], "pod_uid": meta["uid"]}
    body = {"suite": "s", "case_names": ["c0", "c1"], "timeout_seconds": 5, "owner": owner, **extra}
    if run_id is not None:
        body["run_id"] = run_id
    return body


def case(run_id: str, name: str, output: str, status: str = "completed") -> dict:
    return {"row_id": f"{run_id}/{name}", "run_id": run_id, "name": name, "status": status, "output": output,
            "passed": True, "score": 1.0, "started_at": "2026-12-01T12:00:00+00:00",
            "completed_at": "2026-12-01T12:00:01+00:00"}


def test_a_pods_token_writes_its_own_run_and_nothing_of_another_tenant(service, kube):
    _, _, pod_a = started(kube, "team-a", "mine")
    _, _, pod_b = started(kube, "team-b", "theirs")
    _, _, pod_c = started(kube, "team-a", "neighbour")  # A's namespace, the same suite
    token_a, token_b = kube.issue(pod_a), kube.issue(pod_b)
    run_a, run_b, run_c = (pod["metadata"]["annotations"][builders.ANNOTATION_RUN_ID] for pod in (pod_a, pod_b, pod_c))
    assert call(service, "POST", "/runs", start_body(run_c, pod_c), kube.issue(pod_c))[0] == 201

    # Before B's runner starts: A may not pre-create B's run id (B would then get RunIdTaken).
    assert call(service, "POST", "/runs", start_body(run_b, pod_a), token_a)[0] == 403
    assert service.store.get_run(run_b) is None
    assert call(service, "POST", "/runs", start_body(run_b, pod_b), token_b)[0] == 201
    # Its own run, assigned; the Replace it asks for is recorded, never applied: the controller decides that.
    assert call(service, "POST", "/runs", start_body(None, pod_a, lock_policy="Replace"), token_a)[0] == 201
    assert service.store.get_run(run_c).status == "running"
    assert service.store.get_run(run_a).scope.namespace == "team-a"
    assert call(service, "POST", f"/runs/{run_b}/cases", {"events": [case(run_b, "c0", "mine")]}, token_b)[0] == 200
    before = (service.store.get_run(run_b), service.store.cases(run_b))

    attacks = {
        "cases": ("POST", f"/runs/{run_b}/cases", {"events": [case(run_b, "c1", "PWNED")]}),
        "finish": ("POST", f"/runs/{run_b}/finish", {"status": "failed", "cause": "manual"}),
        "heartbeat": ("POST", f"/runs/{run_b}/heartbeat", {}),
        "read": ("GET", f"/runs/{run_b}", None),
        "start with its run id": ("POST", "/runs", start_body(run_b, pod_a)),
        "resume it": ("POST", "/runs", start_body(None, pod_a, parent_run_id=run_b)),
    }
    answers = {name: call(service, method, path, body, token_a)[0] for name, (method, path, body) in attacks.items()}
    assert answers == {"cases": 403, "finish": 403, "heartbeat": 403, "read": 403, "start with its run id": 403,
                       "resume it": 403}, answers
    assert (service.store.get_run(run_b), service.store.cases(run_b)) == before


def test_a_pods_token_cannot_write_a_sibling_attempt_of_its_own_evalrun(service, kube):
    evalrun, job, pod = started(kube, "team-a", "mine")
    token = kube.issue(pod)
    run_1 = pod["metadata"]["annotations"][builders.ANNOTATION_RUN_ID]
    run_2 = builders.run_id_for(evalrun["metadata"]["uid"], "s", 2)
    assert call(service, "POST", "/runs", start_body(run_2, pod), token)[0] == 403
    assert call(service, "POST", "/runs", start_body(run_1, pod, parent_run_id=run_2), token)[0] == 403
    status, body = call(service, "POST", "/runs", start_body(run_1, pod), token)
    assert status == 201 and body["run"]["owner"]["pod_uid"] == pod["metadata"]["uid"]


def test_a_deleted_pods_token_is_refused(service, kube):
    _, _, pod = started(kube, "team-a", "mine")
    token = kube.issue(pod)
    run_id = pod["metadata"]["annotations"][builders.ANNOTATION_RUN_ID]
    assert call(service, "POST", "/runs", start_body(run_id, pod), token)[0] == 201
    kube.delete_pod("team-a", pod["metadata"]["name"])
    status, body = call(service, "POST", f"/runs/{run_id}/heartbeat", {}, token)
    assert status == 401 and "no longer exists" in body["error"]
    assert service.store.get_run(run_id).status == "running"  # untouched: the controller closes it as pod_deleted

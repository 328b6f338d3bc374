"""A runner pod's service-account token -> the one run that pod may write.

Runner pods get no Secret. Each has a projected service-account token whose
audience is the store's own (`builders.build_job`); the kubelet requests it
bound to the pod, rotates it, and it dies with the pod. The store asks the API
server to review it (a TokenReview), which names the pod (name and uid). The
pod, its Job and its EvalRun then say which run that is:

- the pod still exists with that uid and has not finished;
- its controlling owner is the Job the controller made, whose run id it carries;
- that Job's controlling owner is an EvalRun that exists, in the same namespace,
  with that uid; and the run id is the one the controller derives from
  (EvalRun uid, suite, attempt).

A pod made by hand with copied labels and annotations cannot claim another
namespace's run: owner references do not cross namespaces, and the run id is
a function of the EvalRun's uid. Within one namespace, whoever may create
pods there could run the EvalRun's suite anyway.

A review is an API call, so its answer is cached for a short time; what it
names is checked against the index on every request, so a deleted pod's token
is refused at once. Refusals are cached briefly too, so a stream of bad tokens
costs no stream of API calls.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..scope import Scope
from ..crd import KIND
from ..service.auth import Caller, RunnerGrant, TokenRefused
from . import builders
from .children import RunnerPod

DEFAULT_AUDIENCE = builders.DEFAULT_TOKEN_AUDIENCE
REVIEW_TTL_S = 60.0  # a valid token's review is trusted this long; the pod is checked every time
REFUSED_TTL_S = 10.0
MAX_CACHED = 20_000
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class ReviewedPod:
    """Whom the API server says a token belongs to."""

    namespace: str
    name: str
    uid: str


Refused = TokenRefused  # a token that names no runner pod of ours, or whose pod may no longer write


def reviewed_pod(status: dict[str, Any], audience: str) -> ReviewedPod:
    """The pod a TokenReview's status names; Refused for any other answer."""
    if not status.get("authenticated"):
        raise Refused(f"the API server did not accept the token: {status.get('error') or 'not authenticated'}")
    if audience not in (status.get("audiences") or []):
        raise Refused(f"the token is not for this store (audience {audience!r})")
    user = status.get("user") or {}
    username = user.get("username") or ""
    extra = user.get("extra") or {}
    name, uid = (extra.get(POD_NAME_EXTRA) or [None])[0], (extra.get(POD_UID_EXTRA) or [None])[0]
    if not username.startswith(SERVICE_ACCOUNT_PREFIX) or not name or not uid:
        raise Refused("the token is not bound to a pod")
    namespace = username[len(SERVICE_ACCOUNT_PREFIX):].split(":", 1)[0]
    return ReviewedPod(namespace, name, uid)


def _controller_ref(obj: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)


def runner_grant(who: ReviewedPod, pod: dict[str, Any] | None, job: dict[str, Any] | None,
                 evalrun: dict[str, Any] | None) -> Caller:
    """The caller a reviewed pod is, from the pod, its Job and its EvalRun as they are now; Refused otherwise."""
    where = f"pod {who.namespace}/{who.name}"
    if pod is None or (pod.get("metadata") or {}).get("uid") != who.uid:
        raise Refused(f"{where} no longer exists: its token ended with it")
    if (pod.get("status") or {}).get("phase") in FINISHED_PHASES:
        raise Refused(f"{where} has finished: its token may write no more")
    runner = RunnerPod.of(pod)
    if runner is None or runner.suite is None or runner.job_name is None:
        raise Refused(f"{where} is not a runner pod of an EvalRun")
    pod_owner = _controller_ref(pod)
    if (pod_owner is None or pod_owner.get("kind") != "Job" or pod_owner.get("name") != runner.job_name
            or job is None or (job.get("metadata") or {}).get("uid") != pod_owner.get("uid")):
        raise Refused(f"{where} is not controlled by its Job {runner.job_name}")
    job_annotations = (job.get("metadata") or {}).get("annotations") or {}
    if (job_annotations.get(builders.ANNOTATION_RUN_ID) != runner.run_id
            or job_annotations.get(builders.ANNOTATION_PARENT_RUN_ID) != runner.parent_run_id):
        raise Refused(f"{where} names another run than its Job")
    job_owner = _controller_ref(job)
    meta = (evalrun or {}).get("metadata") or {}
    if (job_owner is None or job_owner.get("kind") != KIND or evalrun is None
            or meta.get("uid") != job_owner.get("uid") or meta.get("name") != runner.evalrun
            or meta.get("namespace") != who.namespace):
        raise Refused(f"{where}: its Job is not controlled by EvalRun {runner.evalrun} of its namespace")
    try:
        attempt = int(((pod.get("metadata") or {}).get("labels") or {}).get(builders.LABEL_ATTEMPT, ""))
    except ValueError:
        raise Refused(f"{where} has no attempt label") from None
    if runner.run_id != builders.run_id_for(meta["uid"], runner.suite, attempt):
        raise Refused(f"{where} names run {runner.run_id}, which its EvalRun did not assign")
    grant = RunnerGrant(run_id=runner.run_id, parent_run_id=runner.parent_run_id, suite=runner.suite,
                        namespace=who.namespace, pod=who.name, pod_uid=who.uid)
    return Caller(Scope(who.namespace, meta["name"], meta["uid"]), grant=grant)


class PodTokens:
    """Resolves runner pods' tokens to callers for the store service. Call it off the event loop.

    `kube` is the controller's `IndexedKube`: pods and Jobs come from the index
    (a pod newer than the watch is fetched), EvalRuns from the API once per
    EvalRun. `namespaces` are the controller's: a pod elsewhere is not ours.
    """

    def __init__(self, kube: Any, audience: str = DEFAULT_AUDIENCE, namespaces: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.monotonic, review_ttl_s: float = REVIEW_TTL_S,
                 refused_ttl_s: float = REFUSED_TTL_S, max_cached: int = MAX_CACHED):
        self.kube = kube
        self.audience = audience
        self.namespaces = namespaces
        self._clock = clock
        self._review_ttl_s = review_ttl_s
        self._refused_ttl_s = refused_ttl_s
        self._max = max_cached
        self._lock = threading.Lock()
        self._reviews: dict[bytes, tuple[ReviewedPod, float]] = {}
        self._refused: dict[bytes, tuple[str, float]] = {}
        self._evalruns: dict[tuple[str, str, str], dict[str, Any]] = {}  # (ns, name, uid) -> seen to exist

    def caller(self, token: str) -> Caller:
        """The runner pod's caller, or Refused saying why."""
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        now = self._clock()
        with self._lock:
            refused = self._refused.get(key)
            if refused is not None and refused[1] > now:
                raise Refused(refused[0])
            review = self._reviews.get(key)
        try:
            if review is None or review[1] <= now:
                who = reviewed_pod(self.kube.review_token(token, [self.audience]), self.audience)
                self._remember(self._reviews, key, (who, now + self._review_ttl_s))
            else:
                who = review[0]
            return self._grant(who)
        except Refused as exc:
            self._remember(self._refused, key, (str(exc), now + self._refused_ttl_s))
            with self._lock:
                self._reviews.pop(key, None)
            raise

    def _grant(self, who: ReviewedPod) -> Caller:
        if self.namespaces and who.namespace not in self.namespaces:
            raise Refused(f"pod {who.namespace}/{who.name} is in a namespace this controller does not serve")
        pod = self.kube.get_pod(who.namespace, who.name)
        runner = RunnerPod.of(pod) if pod is not None else None
        job = self.kube.get_job(who.namespace, runner.job_name) if runner and runner.job_name else None
        evalrun = self._evalrun(who.namespace, runner.evalrun, job) if runner and job else None
        return runner_grant(who, pod, job, evalrun)

    def _evalrun(self, namespace: str, name: str, job: dict[str, Any]) -> dict[str, Any] | None:
        """The EvalRun the Job names as its controller, fetched once per EvalRun (it never changes uid)."""
        owner = _controller_ref(job)
        if owner is None:
            return None
        key = (namespace, name, owner.get("uid") or "")
        with self._lock:
            known = self._evalruns.get(key)
        if known is not None:
            return known
        evalrun = self.kube.get_evalrun(namespace, name)
        if evalrun is None:
            return None
        slim = {"metadata": {k: evalrun["metadata"].get(k) for k in ("namespace", "name", "uid")}}
        if slim["metadata"]["uid"] == key[2]:
            self._remember(self._evalruns, key, slim)
        return slim

    def _remember(self, cache: dict, key: Any, value: Any) -> None:
        with self._lock:
            cache[key] = value
            if len(cache) > self._max:  # oldest first: dicts keep insertion order
                for stale in list(cache)[: len(cache) - self._max]:
                    cache.pop(stale, None)

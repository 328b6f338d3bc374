"""The controller's calls to the Kubernetes API, and nothing else.

The chart's RBAC (charts/evalrunner/templates/rbac.yaml) grants exactly the
verbs used here; add a call, add its verb there.

Synchronous client, used from the controller's threads (informers, loops,
kopf's sync handlers), never from the event loop. Objects go in and come out
as plain dicts, so the builders and the classifier never see client classes.

Every request has a timeout (`REQUEST_TIMEOUT`): the client's default is
none, and one hung GET would hold a thread, and with it a loop, forever.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from typing import Any

from kubernetes import client
from kubernetes.client import rest
from kubernetes.client.rest import ApiException

from ..crd import GROUP, KIND, VERSION
from ..timing import API_CONNECT_TIMEOUT_S, API_REQUEST_TIMEOUT_S
from .builders import LABEL_MANAGED_BY, LABEL_SUITE, MANAGER, owned_by
from .index import JOB, NODE, POD
from .informer import Source

PLURAL = "evalruns"
REQUEST_TIMEOUT = (API_CONNECT_TIMEOUT_S, API_REQUEST_TIMEOUT_S)  # for every call that does not set its own
RUNNER_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER}"


def bound_requests(api_client: client.ApiClient, timeout: tuple[float, float] = REQUEST_TIMEOUT) -> client.ApiClient:
    """Give every request of `api_client` a timeout unless the call sets one (a watch sets its own).

    urllib3 would also retry a timed-out read three times on its own, turning a
    30 s timeout into two minutes; our callers retry (with backoff) themselves.
    """
    api_client.configuration.retries = False
    api_client.rest_client = rest.RESTClientObject(api_client.configuration)
    call_api = api_client.call_api

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = timeout
        return call_api(*args, **kwargs)

    api_client.call_api = bounded  # type: ignore[method-assign]
    return api_client


class Kube:
    def __init__(self, api_client: client.ApiClient, request_timeout: tuple[float, float] = REQUEST_TIMEOUT):
        self.api_client = bound_requests(api_client, request_timeout)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.authn = client.AuthenticationV1Api(api_client)

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(obj)

    # ------------------------------------------------------------ children

    def create_owned(self, obj: dict[str, Any], evalrun: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create `obj`, or adopt the existing one of the same fixed name if this EvalRun owns it.

        Returns (object, created). A name taken by someone else's object is an
        error: an object is never adopted without reading its owner.
        """
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        create, read = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
        }[kind]
        try:
            return self._plain(create(ns, obj)), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self._plain(read(name, ns))
        if not owned_by(existing, evalrun):
            raise RuntimeError(f"{kind} {ns}/{name} exists and belongs to another object; rename the EvalRun or suite")
        return existing, False

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_pod, name, namespace)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.batch.read_namespaced_job, name, namespace)

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_node, name)

    def sources(self, namespaces: tuple[str, ...]) -> list[Source]:
        """What the informers follow: runner pods and Jobs (selected by the server) in `namespaces`, and nodes."""
        if not namespaces:
            kinds = [Source(POD, self.core.list_pod_for_all_namespaces, RUNNER_SELECTOR),
                     Source(JOB, self.batch.list_job_for_all_namespaces, RUNNER_SELECTOR)]
        else:
            kinds = [Source(kind, functools.partial(fn, ns), RUNNER_SELECTOR, ns) for ns in namespaces
                     for kind, fn in ((POD, self.core.list_namespaced_pod), (JOB, self.batch.list_namespaced_job))]
        return kinds + [Source(NODE, self.core.list_node)]

    def runner_pods(self, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        """Runner pods in `namespaces` (every namespace when empty)."""
        selector = RUNNER_SELECTOR
        if not namespaces:
            return [self._plain(p) for p in self.core.list_pod_for_all_namespaces(label_selector=selector).items]
        out = []
        for namespace in namespaces:
            out += [self._plain(p) for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]
        return out

    def suite_jobs(self, namespace: str, suite: str) -> list[dict[str, Any]]:
        """Runner Jobs of a suite in a namespace, of every EvalRun (a suite's lock applies per namespace)."""
        selector = f"{LABEL_MANAGED_BY}={MANAGER},{LABEL_SUITE}={suite}"
        return [self._plain(j) for j in self.batch.list_namespaced_job(namespace, label_selector=selector).items]

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The pods of a Job (the Job controller labels them with its name)."""
        selector = f"batch.kubernetes.io/job-name={job_name}"
        return [self._plain(p) for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ------------------------------------------------------------ the EvalRun

    def get_evalrun(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(
            lambda n, ns: self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n), name, namespace
        )

    def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The API server's TokenReview of `token` for `audiences`: its `status` (authenticated, user, error)."""
        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        return self._plain(self.authn.create_token_review(review)).get("status") or {}

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    def post_event(self, evalrun: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event about the EvalRun (what `kubectl describe evalrun` shows)."""
        meta = evalrun["metadata"]
        now = datetime.now(timezone.utc)
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGER},
            "reportingComponent": MANAGER,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException:
            pass  # an event is a courtesy; losing one must not fail a reconcile

    def _read(self, fn: Any, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            obj = fn(name, namespace) if namespace is not None else fn(name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj if isinstance(obj, dict) else self._plain(obj)

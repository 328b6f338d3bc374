"""The Helm chart, its RBAC and the GitOps path, on the real API server.

No kubelet runs containers here, so the chart's Deployment cannot start its
pod (it is installed with replicaCount=0). Instead the controller runs as a
local process with the arguments of the chart's own Deployment, logged in
with the chart's ServiceAccount token from the TokenRequest API: whatever it
can do, the chart's RBAC allowed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from operator_support import (
    REPO, RUN_ID, ControllerProcess, EvalRuns, create_namespace, evalrun_manifest, kubeconfig_for_token, service_account_token, slow_suite,
    smoke_suite, tool_path, wait_for,
)

pytestmark = pytest.mark.cluster
CHART = REPO / "charts" / "evalrunner"


@pytest.fixture(scope="module")
def helm():
    return tool_path("tools/helm/build", "helm")


@pytest.fixture(scope="module")
def kubectl():
    return tool_path("tools/k8s/build", "kubectl")


def run(cmd: list[str], kubeconfig: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **({"KUBECONFIG": kubeconfig} if kubeconfig else {}))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_namespace(api_client, prefix: str) -> str:
    return create_namespace(api_client, f"{prefix}-{uuid.uuid4().hex[:6]}")


def rendered_deployment_args(helm: str, release: str, namespace: str, values: list[str]) -> list[str]:
    out = run([helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.34.4", *values]).stdout
    deployment = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


class Release:
    """`helm install` of the chart, plus the controller run locally as the chart's ServiceAccount."""

    def __init__(self, cluster, helm: str, namespace: str, tmp: Path, watch: list[str], name: str = "er"):
        self.cluster, self.helm, self.namespace, self.tmp = cluster, helm, namespace, tmp
        self.name = name
        self.values = ["--set", "replicaCount=0", "--set", "persistence.enabled=false"]
        if watch:
            self.values += ["--set", "watchNamespaces={" + ",".join(watch) + "}"]
        run([helm, "install", self.name, str(CHART), "--namespace", namespace, "--skip-crds", *self.values],
            kubeconfig=cluster.kubeconfig)
        self.service_account = f"{name}-evalrunner"
        with cluster.api_client() as api:
            token = service_account_token(api, namespace, self.service_account)
        self.kubeconfig = kubeconfig_for_token(cluster.kubeconfig, token, tmp / "sa.kubeconfig")
        args = rendered_deployment_args(helm, self.name, namespace, self.values)
        self.watched = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
        self.controller = ControllerProcess(self.kubeconfig, self.watched, tmp)

    def uninstall(self) -> None:
        self.controller.stop()
        run([self.helm, "uninstall", self.name, "--namespace", self.namespace], kubeconfig=self.cluster.kubeconfig,
            check=False)


@pytest.fixture
def api(cluster):
    client = cluster.api_client()
    yield client
    client.close()


@pytest.fixture
def release_ns(api, evalrun_crd):
    return make_namespace(api, "evalrunner-system")


# ---------------------------------------------------------------- the chart itself


def test_lint_is_clean_and_render_passes_server_side_dry_run(cluster, helm, kubectl, release_ns, tmp_path):
    for values in ([], ["--set", "watchNamespaces={team-a,team-b}"]):
        result = run([helm, "lint", str(CHART), "--strict", *values])
        assert "0 chart(s) failed" in result.stdout
        rendered = run([helm, "template", "er", str(CHART), "--namespace", release_ns, "--kube-version", "1.34.4",
                        *values]).stdout
        (tmp_path / "chart.yaml").write_text(rendered)
        for ns in ("team-a", "team-b"):
            run([kubectl, "create", "namespace", ns], kubeconfig=cluster.kubeconfig, check=False)
        dry = run([kubectl, "apply", "--dry-run=server", "-f", str(tmp_path / "chart.yaml")], kubeconfig=cluster.kubeconfig)
        assert "deployment.apps/er-evalrunner created (server dry run)" in dry.stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"  # loops turning, not the API server
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the store answers
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    from evalrunner.cli import build_parser

    assert container["command"] == ["evalrunner"]
    build_parser().parse_args(container["args"])  # the image's CLI accepts what the chart runs


def test_runner_image_and_storage_values_are_rendered(helm, cluster):
    """A newcomer's values: their registry's image reaches the runners; their StorageClass or claim the data."""
    def render(*values: str) -> list[dict]:
        out = run([helm, "template", "er", str(CHART), "--namespace", "evals", "--kube-version", "1.34.4",
                   *values]).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    docs = render("--set", "image.repository=registry.example.com/evalrunner", "--set", "image.tag=0.3.1",
                  "--set", "persistence.storageClassName=fast-ssd")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/evalrunner:0.3.1"
    assert "--runner-image=registry.example.com/evalrunner:0.3.1" in container["args"]
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast-ssd"

    docs = render("--set", "controller.retainDays=30")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--retain-days=30" in args, "retention reaches the controller"

    docs = render("--set", "persistence.existingClaim=evals-data")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "an existing claim is used, not made"
    volumes = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "evals-data"}} in volumes

    notes = run([helm, "install", "er", str(CHART), "--dry-run=client", "--namespace", "evals",
                 "--set", "image.repository=registry.example.com/evalrunner", "--set", "image.tag=0.3.1"],
                kubeconfig=cluster.kubeconfig).stdout
    assert "registry.example.com/evalrunner:0.3.1" in notes.split("NOTES:")[1], "NOTES.txt names the image"


def test_values_schema_refuses_a_second_replica(helm):
    result = run([helm, "template", "er", str(CHART), "--set", "replicaCount=2"], check=False)
    assert result.returncode != 0 and "replicaCount" in result.stderr


def test_read_token_and_secure_cookie_values_reach_the_controller(helm):
    """Rendering only (no cluster): the read token's Secret and env, and --secure-cookies, each when asked for."""
    from evalrunner.cli import build_parser

    def render(*values: str) -> tuple[list[dict], dict]:
        out = run([helm, "template", "er", str(CHART), "--namespace", "evals", "--kube-version", "1.34.4",
                   *values]).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        return docs, deployment["spec"]["template"]["spec"]["containers"][0]

    def read_env(container: dict) -> list[dict]:
        return [e for e in container["env"] if e["name"] == "EVALRUNNER_READ_TOKEN"]

    docs, container = render()
    assert not read_env(container) and "--secure-cookies" not in container["args"], "off by default: as before"
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["er-evalrunner-admin"]

    docs, container = render("--set", "readToken.enabled=true", "--set", "page.secureCookies=true")
    assert read_env(container) == [{"name": "EVALRUNNER_READ_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "er-evalrunner-read", "key": "token"}}}]
    read_secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "er-evalrunner-read")
    assert len(read_secret["data"]["token"]) >= 48
    assert "--secure-cookies" in container["args"]
    args = build_parser().parse_args(container["args"])
    assert args.secure_cookies is True and args.read_token_env == "EVALRUNNER_READ_TOKEN"

    docs, container = render("--set", "readToken.existingSecret=team-read")
    assert read_env(container)[0]["valueFrom"]["secretKeyRef"] == {"name": "team-read", "key": "token"}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["er-evalrunner-admin"], "not made"


# ---------------------------------------------------------------- install, RBAC, watch modes


def test_installed_chart_runs_an_evalrun_with_only_its_own_permissions(cluster, helm, api, release_ns, tmp_path):
    team = make_namespace(api, "team")
    release = Release(cluster, helm, release_ns, tmp_path, watch=[team])
    try:
        release.controller.start()
        runs = EvalRuns(api, team)
        runs.create(evalrun_manifest("nightly", [smoke_suite("smoke"), slow_suite("slow", cases=8, seconds=0.4)],
                                     retries=1))
        # A death on the way exercises the failure path's verbs too (pods, jobs, nodes, events).
        pod = runs.running_pod("nightly", "slow")
        wait_for("a completed case", lambda: any(c["status"] == "completed"
                                                  for c in release.controller.cases(pod.metadata.annotations["evals.workshop.dev/run-id"]))
                 if release.controller.run(pod.metadata.annotations["evals.workshop.dev/run-id"]) else False)
        os.killpg(cluster.pod_pid(team, pod.metadata.name), signal.SIGKILL)
        status = runs.wait_phase("nightly", ("Succeeded", "Failed"), timeout=120)
        assert status["phase"] == "Succeeded", status
        slow = next(s for s in status["suites"] if s["name"] == "slow")
        assert slow["attempt"] == 2
        reasons = [r for r, _ in runs.events("nightly")]
        assert "RunTerminated" in reasons and "Retrying" in reasons
        forbidden = [line for line in release.controller.logs().splitlines()
                         if re.search(r"\b403\b|Forbidden", line)]  # not "...791403Z" in a timestamp
        assert forbidden == [], forbidden[:5]
    finally:
        release.uninstall()


def test_permission_matrix_of_the_chart_service_account(cluster, helm, api, release_ns, tmp_path):
    from kubernetes import client

    team, other = make_namespace(api, "team"), make_namespace(api, "other")
    release = Release(cluster, helm, release_ns, tmp_path, watch=[team])
    user = f"system:serviceaccount:{release_ns}:{release.service_account}"
    authz = client.AuthorizationV1Api(api)

    def can(verb: str, resource: str, namespace: str | None = None, group: str = "", sub: str | None = None) -> bool:
        attrs = {"verb": verb, "resource": resource, "group": group}
        if namespace:
            attrs["namespace"] = namespace
        if sub:
            attrs["subresource"] = sub
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{release_ns}",
                                                    "system:authenticated"], "resourceAttributes": attrs}}
        return authz.create_subject_access_review(review).status.allowed

    evals = "evals.workshop.dev"
    must = [("watch", "evalruns", team, evals, None), ("patch", "evalruns", team, evals, "status"),
            ("create", "jobs", team, "batch", None), ("delete", "pods", team, "", None),
            ("create", "events", team, "", None), ("get", "nodes", None, "", None),
            ("create", "tokenreviews", None, "authentication.k8s.io", None)]
    # Runner pods' tokens are projected by the kubelet: the controller needs no right on Secrets at all.
    must_not = [("create", "secrets", team, "", None), ("get", "secrets", team, "", None),
                ("list", "secrets", team, "", None), ("create", "serviceaccounts", team, "", "token"),
                ("get", "secrets", release_ns, "", None), ("get", "secrets", other, "", None),
                ("patch", "evalruns", team, evals, None), ("delete", "evalruns", team, evals, None),
                ("create", "pods", team, "", None), ("watch", "evalruns", other, evals, None),
                ("create", "jobs", other, "batch", None), ("patch", "nodes", None, "", None),
                ("create", "clusterroles", None, "rbac.authorization.k8s.io", None),
                ("delete", "namespaces", None, "", None), ("list", "pods", None, "", None)]
    try:
        allowed = {spec: can(*spec) for spec in must + must_not}
        assert [s for s in must if not allowed[s]] == [], "the controller lacks a right it uses"
        assert [s for s in must_not if allowed[s]] == [], "the chart grants more than the controller uses"
    finally:
        release.uninstall()


def test_watching_every_namespace(cluster, helm, api, release_ns, tmp_path):
    first, second = make_namespace(api, "all-a"), make_namespace(api, "all-b")
    release = Release(cluster, helm, release_ns, tmp_path, watch=[])
    try:
        assert release.watched == []
        release.controller.start()
        for ns in (first, second):
            EvalRuns(api, ns).create(evalrun_manifest("e", [smoke_suite("s")]))
        for ns in (first, second):
            assert EvalRuns(api, ns).wait_phase("e", ("Succeeded", "Failed"))["phase"] == "Succeeded"
    finally:
        release.uninstall()


def test_releases_sharded_by_namespace_each_keep_their_own_runs_and_leave_the_rest_alone(
        cluster, helm, api, release_ns, tmp_path):
    """Beyond one controller: one release per set of namespaces, each with its own database."""
    from kubernetes import client

    team_a, team_b, ignored = (make_namespace(api, p) for p in ("team-a", "team-b", "ignored"))
    second_release_ns = make_namespace(api, "evalrunner-b")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    releases = [Release(cluster, helm, release_ns, tmp_path / "a", watch=[team_a], name="er-a"),
                Release(cluster, helm, second_release_ns, tmp_path / "b", watch=[team_b], name="er-b")]
    try:
        for release in releases:
            release.controller.start()
        for ns in (ignored, team_a, team_b):
            EvalRuns(api, ns).create(evalrun_manifest("e", [smoke_suite("s")]))
        for ns in (team_a, team_b):
            assert EvalRuns(api, ns).wait_phase("e", ("Succeeded", "Failed"))["phase"] == "Succeeded"
        assert EvalRuns(api, ignored).status("e") == {}  # untouched: no status, no Jobs
        assert client.BatchV1Api(api).list_namespaced_job(ignored).items == []
        for release, ns in zip(releases, (team_a, team_b)):
            runs = release.controller.api("/runs?limit=50")["runs"]
            assert [r["status"] for r in runs] == ["completed"], runs
            assert ns in runs[0]["scope"], runs  # this release's namespace only
    finally:
        for release in releases:
            release.uninstall()


# ---------------------------------------------------------------- GitOps and kubectl


def test_gitops_apply_is_stable_and_deletion_collects_children_but_keeps_results(cluster, kubectl, controller,
                                                                                    evalruns, tmp_path):
    manifest = evalrun_manifest("gitops", [smoke_suite("smoke")])
    manifest["metadata"]["namespace"] = evalruns.namespace
    path = tmp_path / "evalrun.yaml"
    path.write_text(yaml.safe_dump(manifest))
    apply = [kubectl, "apply", "--server-side", "--field-manager=gitops", "-f", str(path)]
    assert "serverside-applied" in run(apply, kubeconfig=cluster.kubeconfig).stdout
    first = evalruns.get("gitops")
    run(apply, kubeconfig=cluster.kubeconfig)
    again = evalruns.get("gitops")  # (its status may have moved on meanwhile: the controller's)
    assert (again["metadata"]["generation"], again["spec"]) == (first["metadata"]["generation"], first["spec"])

    status = evalruns.wait_phase("gitops", ("Succeeded", "Failed"))
    after = evalruns.get("gitops")
    # The controller wrote only status: every other field manager touched the status subresource alone.
    managers = after["metadata"]["managedFields"]
    assert {m["manager"] for m in managers if m.get("subresource") != "status"} == {"gitops"}
    assert after["metadata"].get("annotations") in (None, {}), "the controller annotated the EvalRun"
    # Re-applying the original manifest after reconciliation: no drift, nothing changes.
    diff = run([kubectl, "diff", "--server-side", "--field-manager=gitops", "-f", str(path)],
               kubeconfig=cluster.kubeconfig, check=False)
    assert diff.returncode == 0, diff.stdout
    run(apply, kubeconfig=cluster.kubeconfig)
    reapplied = evalruns.get("gitops")
    assert (reapplied["metadata"]["generation"], reapplied["spec"], reapplied["status"]["phase"]) == (
        after["metadata"]["generation"], after["spec"], "Succeeded")

    run_id = status["suites"][0]["runId"]
    run([kubectl, "delete", "evalrun", "gitops", "-n", evalruns.namespace, "--wait=true"], kubeconfig=cluster.kubeconfig)

    def children() -> list[str]:
        out = []
        for kind in ("jobs", "configmaps", "secrets"):
            listed = json.loads(run([kubectl, "get", kind, "-n", evalruns.namespace, "-l",
                                     "evals.workshop.dev/evalrun=gitops", "-o", "json"],
                                    kubeconfig=cluster.kubeconfig).stdout)["items"]
            out += [f"{kind}/{i['metadata']['name']}" for i in listed]
        return out

    wait_for("garbage collection of the EvalRun's children", lambda: children() == [], timeout=60)
    assert controller.run(run_id)["status"] == "completed"  # the results outlive the resource


def test_editing_the_spec_starts_added_suites_and_leaves_started_ones(controller, evalruns, cluster, kubectl):
    evalruns.create(evalrun_manifest("edit", [slow_suite("first", cases=4, seconds=0.3)]))
    evalruns.running_pod("edit", "first")
    body = evalruns.get("edit")
    body["spec"]["suites"].append(smoke_suite("added"))
    evalruns.custom.replace_namespaced_custom_object("evals.workshop.dev", "v1alpha1", evalruns.namespace,
                                                     "evalruns", "edit", body)
    status = evalruns.wait_phase("edit", ("Succeeded", "Failed"))
    assert {s["name"] for s in status["suites"]} == {"first", "added"}
    assert status["observedGeneration"] == 2 and status["phase"] == "Succeeded"
    first = next(s for s in status["suites"] if s["name"] == "first")
    assert first["attempt"] == 1  # the running suite was not restarted by the edit


def test_kubectl_get_describe_and_explain(cluster, kubectl, controller, evalruns):
    evalruns.create(evalrun_manifest("kube", [smoke_suite("smoke"), slow_suite("slow", cases=10, seconds=0.5)]))
    pod = evalruns.running_pod("kube", "slow")
    run_id = pod.metadata.annotations[RUN_ID]
    # Killed with a case in flight: its `running` row is durable within a flush interval of its start.
    wait_for("a case of the slow suite in flight",
             lambda: controller.run(run_id) and any(c["status"] == "running" for c in controller.cases(run_id)),
             interval=0.05)
    os.killpg(cluster.pod_pid(evalruns.namespace, pod.metadata.name), signal.SIGKILL)
    evalruns.wait_phase("kube", ("Succeeded", "Failed"))
    wait_for("the Events", lambda: any(r == "RunTerminated" for r, _ in evalruns.events("kube")))

    got = run([kubectl, "get", "evalruns", "-n", evalruns.namespace], kubeconfig=cluster.kubeconfig).stdout
    header, row = got.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "SUITES", "PASSED", "FAILED", "ERRORED", "AGE"]
    assert row.split()[:5] == ["kube", "Failed", "2/2", "2", "1"], _runner_logs(cluster, evalruns, "kube")
    assert int(row.split()[5]) >= 1, row  # the killed runner's case in flight
    short = run([kubectl, "get", "er", "-n", evalruns.namespace], kubeconfig=cluster.kubeconfig).stdout
    assert short.splitlines()[1].startswith("kube")

    described = run([kubectl, "describe", "evalrun", "kube", "-n", evalruns.namespace], kubeconfig=cluster.kubeconfig).stdout
    assert "RunTerminated" in described and "killed" in described and "SuiteFailed" in described

    explained = run([kubectl, "explain", "evalrun.spec.suites"], kubeconfig=cluster.kubeconfig).stdout
    for field in ("timeoutSeconds", "concurrency", "target", "cases", "configMapRef", "concurrencyPolicy"):
        assert field in explained
    assert "Per-case timeout" in explained or "per-case timeout" in explained


def _runner_logs(cluster, evalruns: EvalRuns, name: str) -> str:
    """The EvalRun's runner pods' output, for a failure message."""
    pods = evalruns.core.list_namespaced_pod(evalruns.namespace,
                                             label_selector=f"evals.workshop.dev/evalrun={name}").items
    return "\n".join(f"--- {p.metadata.name} ({p.status.phase})\n{cluster.pod_log(evalruns.namespace, p.metadata.name)[-3000:]}"
                     for p in pods)

"""The users' path on a real node: `helm install`, `kubectl apply`, runners in containers, deaths by the kubelet.

A real node (`tools/k8s/cluster up --node real`: containerd, runc, the CNI
bridge, the kubelet, kube-proxy, CoreDNS) runs the image built from the
project's own Dockerfile (`tools/images/build`, no registry: imported into
containerd). The chart is installed unmodified apart from image values; its
controller runs in a pod under the chart's security context with its DuckDB
file on a PersistentVolume, and runner containers reach it through the
Service by DNS. Then what only a real node proves: the kubelet's OOM kill, a
pod deleted mid-run, a container restarted by the kubelet, a node whose
kubelet stops, `helm upgrade` and `helm uninstall` mid-life, and the /evals
page through `kubectl port-forward` in Chromium. Needs root, as CI has.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import localcluster  # tools/k8s/localcluster.py (conftest puts tools/k8s on sys.path)
from operator_support import REPO, EvalRuns, slow_suite, target_suite, tool_path, wait_for

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "evalrunner"
RELEASE, SYSTEM, TEAM = "evalrunner", "evalrunner-system", "team"
IMAGE = "evalrunner:0.1.0"
EXAMPLE_TARGETS = "/opt/evalrunner/examples/suites"  # where the image ships the example targets
VALUES = ["--set", "image.repository=evalrunner", "--set", "image.tag=0.1.0", "--set", "image.pullPolicy=Never"]


def run(argv: list[str], kubeconfig: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, KUBECONFIG=kubeconfig))
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class PortForward:
    """`kubectl port-forward` to the chart's Service, restarted when its pod goes (upgrade, restart)."""

    def __init__(self, kubectl: str, kubeconfig: str):
        self.kubectl, self.kubeconfig = kubectl, kubeconfig
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> PortForward:
        self.stop()
        self.proc = subprocess.Popen(
            [self.kubectl, "port-forward", "-n", SYSTEM, f"svc/{RELEASE}", ":8080", "--address", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, KUBECONFIG=self.kubeconfig))
        line = self.proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line}"
        self.url = f"http://127.0.0.1:{match.group(1)}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@dataclass
class Release:
    state_dir: Path
    kubeconfig: str
    helm: str
    kubectl: str
    evalruns: EvalRuns
    forward: PortForward
    token: str = ""
    # The store API at the controller pod's address on the node's bridge. Not through port-forward,
    # which goes through the kubelet, nor the Service: a node that loses its kubelet has its pods
    # marked unready and its Services emptied, and a test stops the kubelet.
    url: str = ""
    runs_seen: list[str] = field(default_factory=list)

    def helm_run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run([self.helm, *args], self.kubeconfig, timeout=timeout)

    def kubectl_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([self.kubectl, *args], self.kubeconfig, check=check)

    def controller_pod(self) -> dict:
        pods = json.loads(self.kubectl_run("get", "pods", "-n", SYSTEM, "-l",
                                           "app.kubernetes.io/name=evalrunner", "-o", "json").stdout)["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == 1, [p["metadata"]["name"] for p in pods]
        return live[0]

    def wait_controller_ready(self, timeout: float = 120) -> dict:
        def ready():
            try:
                pod = self.controller_pod()
            except AssertionError:
                return None
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            return pod if conditions.get("Ready") == "True" else None
        pod = wait_for("the controller pod to be Ready", ready, timeout=timeout, interval=0.5)
        localcluster.wait_for_service_endpoints(self.state_dir, SYSTEM, RELEASE)  # what runner pods use
        self.url = f"http://{pod['status']['podIP']}:8080"
        wait_for("the store API", lambda: self.healthy(), timeout=30, interval=0.5)
        return pod

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=3) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str) -> dict | None:
        request = urllib.request.Request(f"{self.url}/api/v1{path}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def run_row(self, run_id: str) -> dict | None:
        return self.api(f"/runs/{run_id}")

    def cases(self, run_id: str) -> list[dict]:
        return self.api(f"/runs/{run_id}/cases")["cases"]

    def wait_terminal(self, run_id: str, timeout: float = 60) -> dict:
        return wait_for(f"run {run_id} to terminate",
                        lambda: (r := self.run_row(run_id)) and r["status"] != "running" and r, timeout=timeout)

    def running_rows(self) -> list[dict]:
        return self.api("/runs?status=running&limit=500")["runs"]


def _build(script: str) -> str:
    result = subprocess.run([str(REPO / script)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    return result.stdout.strip().splitlines()[-1]


def _evalrunner_image_archive() -> Path:
    """The archive of `evalrunner:0.1.0` that tools/images/build made (cached)."""
    where = Path(_build("tools/images/build"))
    archives = [where] if where.is_file() else sorted(where.glob("evalrunner-*.tar"))
    archive = next((a for a in archives if a.name.startswith("evalrunner-") and "base" not in a.name), None)
    assert archive is not None, f"no evalrunner image archive in {where}"
    return archive


@pytest.fixture(scope="module")
def release():
    """A real-node cluster of its own, with the chart installed (which installs the CRD too)."""
    if os.geteuid() != 0:
        pytest.fail("the real node runs containers, iptables and mounts: run as root", pytrace=False)
    _build("tools/k8s/build")
    archive = _evalrunner_image_archive()
    helm, kubectl = tool_path("tools/helm/build", "helm"), str(localcluster.bin_dir() / "kubectl")
    state_dir = Path(tempfile.mkdtemp(prefix="evalrunner-realnode-"))
    try:
        st = localcluster.up(state_dir, node="real", quiet=True)
    except localcluster.ClusterError as exc:
        shutil.rmtree(state_dir, ignore_errors=True)
        pytest.fail(f"could not start the real node: {exc}", pytrace=False)
    forward = PortForward(kubectl, st.kubeconfig)
    try:
        localcluster.import_image(state_dir, archive)
        api_client = _api_client(st.kubeconfig)
        release = Release(state_dir, st.kubeconfig, helm, kubectl, EvalRuns(api_client, TEAM), forward)
        release.kubectl_run("create", "namespace", TEAM)
        _data_volume(release)
        release.helm_run("install", RELEASE, str(CHART), "--namespace", SYSTEM, "--create-namespace", *VALUES,
                         "--wait", "--timeout", "4m")
        release.token = _admin_token(release)
        release.wait_controller_ready()
        yield release
    finally:
        forward.stop()
        localcluster.down(state_dir, quiet=True)
        if os.environ.get("EVALRUNNER_KEEP_CLUSTER_DIR"):
            print(f"\nreal-node cluster state and logs kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def _api_client(kubeconfig: str):
    from kubernetes import config

    return config.new_client_from_config(config_file=kubeconfig)


def _data_volume(release: Release) -> None:
    """A PersistentVolume on the node's disk for the chart's claim: local storage, as a single node has.

    The directory belongs to uid 65532, as the chart's pod runs: a hostPath
    volume does not apply the pod's fsGroup.
    """
    path = release.state_dir / "volumes" / "evalrunner-data"
    path.mkdir(parents=True)
    os.chown(path, 65532, 65532)
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "evalrunner-data"},
          "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteOnce"],
                   "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(path), "type": "Directory"}}}
    (release.state_dir / "pv.yaml").write_text(yaml.safe_dump(pv))
    release.kubectl_run("apply", "-f", str(release.state_dir / "pv.yaml"))


def _admin_token(release: Release) -> str:
    secret = json.loads(release.kubectl_run("get", "secret", "-n", SYSTEM, "-l", "app.kubernetes.io/name=evalrunner",
                                            "-o", "json").stdout)["items"]
    tokens = [s["data"]["token"] for s in secret if "token" in s.get("data", {})]
    assert len(tokens) == 1, "the chart's admin-token Secret"
    return base64.b64decode(tokens[0]).decode()


def manifest(name: str, suites: list[dict], **spec) -> dict:
    """An EvalRun of the image's example targets."""
    env = [{"name": "PYTHONPATH", "value": EXAMPLE_TARGETS}]
    return {"apiVersion": "evals.workshop.dev/v1alpha1", "kind": "EvalRun", "metadata": {"name": name},
            "spec": {"image": IMAGE, "suites": suites, "env": env, **spec}}


def running_pod(release: Release, name: str, suite: str, attempt: int = 1, completed: int = 2):
    """A Running runner pod of the suite, once its runner has completed `completed` cases; and its run id."""
    selector = (f"evals.workshop.dev/evalrun={name},evals.workshop.dev/suite={suite},"
                f"evals.workshop.dev/attempt={attempt}")

    def running():
        pods = release.evalruns.core.list_namespaced_pod(TEAM, label_selector=selector).items
        return next((p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp), None)

    pod = wait_for(f"a Running pod of {name}/{suite}", running, timeout=120, interval=0.2)
    run_id = pod.metadata.annotations["evals.workshop.dev/run-id"]
    wait_for(f"{completed} completed cases of {run_id}", lambda: release.run_row(run_id) and sum(
        c["status"] == "completed" for c in release.cases(run_id)) >= completed, timeout=60, interval=0.2)
    return pod, run_id


# ---------------------------------------------------------------- the install


def test_the_controller_runs_in_a_pod_under_the_charts_security_context(release):
    pod = release.controller_pod()
    container = pod["spec"]["containers"][0]
    assert container["image"] == IMAGE and container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    name = pod["metadata"]["name"]
    uid = release.kubectl_run("exec", "-n", SYSTEM, name, "--", "id", "-u").stdout.strip()
    assert uid == "65532"
    readonly = release.kubectl_run("exec", "-n", SYSTEM, name, "--", "touch", "/etc/x", check=False)
    assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr
    files = release.kubectl_run("exec", "-n", SYSTEM, name, "--", "ls", "/data").stdout.split()
    assert "evalrunner.duckdb" in files  # on the PersistentVolume
    claim = json.loads(release.kubectl_run("get", "pvc", "-n", SYSTEM, "-o", "json").stdout)["items"][0]
    assert claim["status"]["phase"] == "Bound" and claim["spec"]["volumeName"] == "evalrunner-data"


def test_example_evalruns_succeed_with_runners_reaching_the_store_by_service_dns(release):
    example = REPO / "examples" / "gitops" / "evalruns" / "smoke.yaml"
    release.kubectl_run("apply", "-n", TEAM, "-f", str(example))
    status = release.evalruns.wait_phase("smoke", ("Succeeded", "Failed"), timeout=180)
    assert status["phase"] == "Succeeded", status
    for suite in status["suites"]:
        row = release.run_row(suite["runId"])
        assert row["status"] == "completed" and row["owner"]["kind"] == "pod" and row["owner"]["namespace"] == TEAM
        release.runs_seen.append(row["id"])
    job = release.evalruns.job(status["suites"][0]["jobName"])
    command = job.spec.template.spec.containers[0].command
    store_url = command[command.index("--store-url") + 1]
    assert f"{RELEASE}.{SYSTEM}.svc" in store_url, store_url  # the Service's DNS name, resolved by CoreDNS

    # Its cases from a dataset file in the image (after smoke: both run a suite `arithmetic` under Forbid).
    release.kubectl_run("apply", "-n", TEAM, "-f", str(REPO / "examples" / "gitops" / "evalruns" /
                                                       "arithmetic-dataset.yaml"))
    status = release.evalruns.wait_phase("arithmetic-dataset", ("Succeeded", "Failed"), timeout=180)
    assert status["phase"] == "Succeeded" and status["passed"] == 12, status


# ---------------------------------------------------------------- deaths by the kubelet's hand


def test_the_kubelets_oom_kill_is_oom_killed(release):
    # c0 and c1 finish at once; c2 allocates 600 MB under a 160 MiB limit.
    release.evalruns.create(manifest("oom", [target_suite("hog", "hog", [0, 0, 600])],
                                     resources={"limits": {"memory": "160Mi"}}))
    pod = release.evalruns.any_pod("oom", "hog", timeout=120)
    run_id = pod.metadata.annotations["evals.workshop.dev/run-id"]
    dead = release.evalruns.wait_pod_phase(pod.metadata.name, ("Failed",), timeout=120)
    terminated = dead.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled"), terminated
    row = release.wait_terminal(run_id)
    assert (row["status"], row["cause"]) == ("failed", "oom_killed"), row
    cases = {c["name"]: c["status"] for c in release.cases(run_id)}
    assert cases["c0"] == cases["c1"] == "completed" and cases["c2"] == "failed"
    assert wait_for("the status to show it", lambda: release.evalruns.suite("oom", "hog").get("cause") == "oom_killed")


def test_a_pod_deleted_mid_run_is_pod_deleted(release):
    release.evalruns.create(manifest("deleted", [slow_suite("slow", cases=30, seconds=0.5)]))
    pod, run_id = running_pod(release, "deleted", "slow")
    release.evalruns.core.delete_namespaced_pod(pod.metadata.name, TEAM)
    row = release.wait_terminal(run_id, timeout=30)
    assert (row["status"], row["cause"]) == ("failed", "pod_deleted"), row
    assert "running" not in {c["status"] for c in release.cases(run_id)}


def test_a_controller_container_restarted_by_the_kubelet_loses_no_run(release):
    """The controller's container is killed; the kubelet restarts it in the same pod; the runners carry on."""
    release.evalruns.create(manifest("restart", [slow_suite("slow", cases=16, seconds=0.5)]))
    _, run_id = running_pod(release, "restart", "slow")
    pod = release.controller_pod()
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    localcluster.kill_container(release.state_dir, container_id)
    wait_for("the kubelet to restart the controller container", lambda: release.controller_pod()["status"][
        "containerStatuses"][0].get("restartCount", 0) >= 1, timeout=60, interval=0.5)
    assert release.controller_pod()["metadata"]["uid"] == pod["metadata"]["uid"], "the same pod, restarted in place"
    release.wait_controller_ready()
    status = release.evalruns.wait_phase("restart", ("Succeeded", "Failed"), timeout=120)
    assert status["phase"] == "Succeeded", status
    row = release.run_row(run_id)
    assert row["status"] == "completed" and row["passed"] == 16, {k: row[k] for k in ("status", "cause", "error", "terminated_by", "attempt")}


def test_a_node_whose_kubelet_stops_loses_its_runs_as_node_lost(release):
    release.evalruns.create(manifest("lost", [slow_suite("slow", cases=120, seconds=0.5)]))
    _, run_id = running_pod(release, "lost", "slow")
    localcluster.stop_kubelet(release.state_dir)
    try:
        # The node-lifecycle controller marks the node NotReady after its grace period (20 s here);
        # the controller, still running in its container, closes the row at once.
        row = release.wait_terminal(run_id, timeout=90)
        assert (row["status"], row["cause"]) == ("failed", "node_lost"), row
    finally:
        localcluster.start_kubelet(release.state_dir)
    release.wait_controller_ready()
    assert release.run_row(run_id)["cause"] == "node_lost"  # the runner's late writes were fenced
    assert release.evalruns.wait_phase("lost", ("Succeeded", "Failed"), timeout=60)["phase"] == "Failed"


# ---------------------------------------------------------------- the release's life


def test_helm_upgrade_mid_run_keeps_the_runs_going(release):
    release.evalruns.create(manifest("upgrade", [slow_suite("slow", cases=24, seconds=0.5)]))
    _, run_id = running_pod(release, "upgrade", "slow")
    before = release.controller_pod()["metadata"]["uid"]
    release.helm_run("upgrade", RELEASE, str(CHART), "--namespace", SYSTEM, *VALUES,
                     "--set", "controller.logLevel=debug", "--wait", "--timeout", "4m")
    release.wait_controller_ready()
    assert release.controller_pod()["metadata"]["uid"] != before, "the Deployment was recreated"
    status = release.evalruns.wait_phase("upgrade", ("Succeeded", "Failed"), timeout=120)
    row = release.run_row(run_id)
    assert row["status"] != "running"
    if status["phase"] != "Succeeded":  # a death during the gap is reconciled with its cause, never left running
        assert row["cause"] in ("shutdown_requested", "status_write_failed", "heartbeat_lost"), row
    assert release.running_rows() == []


def test_the_evals_page_through_port_forward(release):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    release.forward.start()  # kubectl port-forward, as a user reaches the page
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{release.forward.url}/evals")
        rows = driver.find_elements("css selector", "tr.run")
        shown = {r.get_attribute("data-run-id") for r in rows}
        assert set(release.runs_seen) <= shown, (release.runs_seen, shown)
        (REPO / "artifacts" / "browser").mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(REPO / "artifacts" / "browser" / "real-node-evals.png"))
    finally:
        driver.quit()
        release.forward.stop()


def test_helm_uninstall_keeps_the_data_for_the_next_install(release):
    seen = list(release.runs_seen)
    release.helm_run("uninstall", RELEASE, "--namespace", SYSTEM, "--wait")
    claims = json.loads(release.kubectl_run("get", "pvc", "-n", SYSTEM, "-o", "json").stdout)["items"]
    assert [c["metadata"]["name"] for c in claims] == [f"{RELEASE}-data"], "the data volume is kept"
    assert (release.state_dir / "volumes" / "evalrunner-data" / "evalrunner.duckdb").exists()

    release.helm_run("install", RELEASE, str(CHART), "--namespace", SYSTEM, *VALUES, "--wait", "--timeout", "4m")
    release.token = _admin_token(release)
    release.wait_controller_ready()
    for run_id in seen:
        assert release.run_row(run_id)["status"] == "completed", run_id

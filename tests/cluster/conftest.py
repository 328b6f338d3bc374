"""Fixtures for tests against a real Kubernetes control plane.

``cluster`` (session scope) starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the node agent from ``tools/k8s`` once per test session, in
a fresh state directory, and stops them at the end. With
``EVALRUNNER_KUBECONFIG`` set it uses that existing cluster instead (kind, or
any cluster); pods then run wherever that cluster runs them, and the
pod-process helpers need the node agent's state directory in
``EVALRUNNER_CLUSTER_DIR`` (see tools/k8s/README.md).

``namespace`` (function scope) gives each test its own namespace, with its
default ServiceAccount ready, and deletes it afterwards.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S_TOOLS = REPO / "tools" / "k8s"
sys.path.insert(0, str(K8S_TOOLS))

import localcluster  # noqa: E402  (tools/k8s/localcluster.py)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs a Kubernetes API server (the `cluster` fixture starts one)")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Cluster:
    """Handle on the cluster under test."""

    def __init__(self, kubeconfig: str, state_dir: Path | None, managed: bool,
                 ready_seconds: float | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.managed = managed
        self.ready_seconds = ready_seconds
        self.node_name = localcluster.NODE_NAME

    def api_client(self):
        """A new kubernetes.client.ApiClient for the admin user."""
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    @functools.cached_property
    def agent_without_state(self) -> bool:
        """EVALRUNNER_KUBECONFIG names a cluster whose pods run under tools/k8s's node agent, but
        EVALRUNNER_CLUSTER_DIR does not say where its state is: the pods' files cannot be found."""
        if self.state_dir is not None:
            return False
        from kubernetes import client

        with self.api_client() as api:
            nodes = client.CoreV1Api(api).list_node(label_selector="evalrunner/node-agent=true").items
        return bool(nodes)

    def require_node_files(self) -> None:
        """Skip, saying why, a test that reads the local node agent's per-pod files it cannot locate."""
        if self.agent_without_state:
            pytest.skip("the cluster's pods run under the tools/k8s node agent, which keeps their logs and mount "
                        "roots in its state directory: set EVALRUNNER_CLUSTER_DIR to it (see tools/k8s/README.md)")

    def _pod_dir(self, namespace: str, name: str) -> Path:
        self.require_node_files()
        if self.state_dir is None:
            # Only on a cluster given by EVALRUNNER_KUBECONFIG (kind, say), never in CI: its pods
            # run inside kubelets' containers, so there is no local process to SIGKILL or read.
            pytest.skip("this test kills or reads a pod's process on this machine, which only the local node "
                        "agent's pods are; on EVALRUNNER_KUBECONFIG's cluster set EVALRUNNER_CLUSTER_DIR to the "
                        "agent's state directory, or run it against tools/k8s")
        return self.state_dir / "pods" / _safe(namespace) / _safe(name)

    def pod_pid(self, namespace: str, name: str, timeout: float = 30.0) -> int:
        """Local process id (and process-group id) of the pod's container process."""
        pidfile = self._pod_dir(namespace, name) / "pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return int(pidfile.read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.1)
        raise TimeoutError(f"no process for pod {namespace}/{name} after {timeout}s ({pidfile})")

    @property
    def local_node(self) -> bool:
        """Pods run as local processes under our node agent (pids, log files)."""
        return self.state_dir is not None

    def pod_log(self, namespace: str, name: str) -> str:
        """The container's stdout and stderr.

        The local node agent has no kubelet API for `kubectl logs`, so this
        reads its log file; on an existing cluster it asks the API server.
        """
        if self.state_dir is None:
            self.require_node_files()  # the agent serves no kubelet API for `kubectl logs`
            from kubernetes import client

            with self.api_client() as api:
                return client.CoreV1Api(api).read_namespaced_pod_log(name, namespace)
        path = self._pod_dir(namespace, name) / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_pause(self) -> None:
        """Stop the node's heartbeats: after ~20 s the node goes NotReady (Unknown)."""
        localcluster.set_node_paused(True, self._require_state())

    def node_resume(self) -> None:
        localcluster.set_node_paused(False, self._require_state())

    def _require_state(self) -> Path:
        if self.state_dir is None:
            # As above: only on an existing cluster, never in CI.
            pytest.skip("node loss is simulated by pausing the local node agent's heartbeats; an existing "
                        "cluster's real nodes cannot be paused from here")
        return self.state_dir


@pytest.fixture(scope="session")
def cluster():
    existing = os.environ.get("EVALRUNNER_KUBECONFIG")
    if existing:
        state = os.environ.get("EVALRUNNER_CLUSTER_DIR")
        yield Cluster(existing, Path(state) if state else None, managed=False)
        return

    try:
        localcluster.check_binaries()
    except localcluster.ClusterError as e:
        pytest.fail(f"{e}\n(or point EVALRUNNER_KUBECONFIG at an existing cluster)", pytrace=False)
    state_dir = Path(tempfile.mkdtemp(prefix="evalrunner-cluster-"))
    try:
        st = localcluster.up(state_dir, quiet=True)
    except localcluster.ClusterError as e:
        shutil.rmtree(state_dir, ignore_errors=True)
        pytest.fail(f"could not start the test cluster: {e}", pytrace=False)
    try:
        yield Cluster(st.kubeconfig, state_dir, managed=True, ready_seconds=st.ready_seconds)
    finally:
        localcluster.down(state_dir, quiet=True)
        if os.environ.get("EVALRUNNER_KEEP_CLUSTER_DIR"):
            print(f"\ncluster state and logs kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def namespace(cluster, request):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from operator_support import create_namespace

    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    api_client = cluster.api_client()
    name = create_namespace(api_client, f"{base}-{uuid.uuid4().hex[:6]}")
    api = client.CoreV1Api(api_client)
    try:
        yield name
    finally:
        try:
            api.delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise
        api.api_client.close()


# ---------------------------------------------------------------- the operator under test


@pytest.fixture(scope="session")
def evalrun_crd(cluster):
    """The generated EvalRun CRD, installed once per session."""
    from operator_support import install_crd

    with cluster.api_client() as api:
        install_crd(api)


@pytest.fixture
def controller(cluster, evalrun_crd, namespace, tmp_path):
    """A real `evalrunner controller` process watching the test's namespace."""
    from operator_support import ControllerProcess

    proc = ControllerProcess(cluster.kubeconfig, namespace, tmp_path).start()
    yield proc
    proc.stop()
    # Shown by pytest only when the test failed: the controller's errors, or all of it on request.
    lines = proc.logs().splitlines()
    shown = lines if os.environ.get("EVALRUNNER_SHOW_CONTROLLER_LOG") else [
        line for line in lines if '"level": "error"' in line or "Traceback" in line or "Error" in line]
    print("\n".join(shown[-60:]))


@pytest.fixture
def evalruns(cluster, evalrun_crd, namespace):
    from operator_support import EvalRuns

    api = cluster.api_client()
    yield EvalRuns(api, namespace)
    api.close()

"""Self-tests of the real node: containerd, runc and the CNI bridge, the
kubelet, kube-proxy and CoreDNS (`tools/k8s/cluster up --node real`).

The `node` fixture builds the node (`tools/k8s/build`, cached), starts
a cluster with it in a fresh state directory and imports the node's self-test
image (tools/k8s/nodetest: one static binary, from scratch). The tests run
that image in real containers; the last one stops the cluster and checks that
the host is as it was. Needs root, as CI has.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import localcluster  # tools/k8s/localcluster.py (conftest puts tools/k8s on sys.path)
import nodehost
from operator_support import wait_for
import pytest
from kubernetes import client, config

pytestmark = pytest.mark.cluster

K8S_TOOLS = Path(localcluster.__file__).resolve().parent


@dataclass
class RealNode:
    state_dir: Path
    kubeconfig: str
    image: str                 # the self-test image, imported into the node's containerd
    ip_forward_before: str     # the host's net.ipv4.ip_forward before `up`

    def api(self) -> client.CoreV1Api:
        return client.CoreV1Api(config.new_client_from_config(config_file=self.kubeconfig))

    def kubectl_argv(self, *args: str) -> list[str]:
        # Its discovery cache in the state directory, not in ~/.kube.
        return [str(localcluster.bin_dir() / "kubectl"), f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.state_dir / 'kubectl-cache'}", *args]

    def kubectl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.kubectl_argv(*args), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def node():
    if os.geteuid() != 0:
        pytest.fail("the real node runs containers, iptables and mounts: run as root", pytrace=False)
    build = subprocess.run([str(K8S_TOOLS / "build")], capture_output=True, text=True, check=False)
    if build.returncode != 0:
        pytest.fail(f"tools/k8s/build failed:\n{build.stderr[-3000:]}", pytrace=False)
    ip_forward = nodehost.read_sysctls(["net.ipv4.ip_forward"])["net.ipv4.ip_forward"]
    state_dir = Path(tempfile.mkdtemp(prefix="evalrunner-realnode-"))
    try:
        st = localcluster.up(state_dir, node="real", quiet=True)
        image = localcluster.import_image(state_dir, localcluster.node_dir() / "images" / "nodetest.tar")[0]
    except localcluster.ClusterError as e:
        localcluster.down(state_dir, quiet=True)
        pytest.fail(f"could not start the real node: {e}", pytrace=False)
    try:
        yield RealNode(state_dir, st.kubeconfig, image, ip_forward)
    finally:
        localcluster.down(state_dir, quiet=True)
        if os.environ.get("EVALRUNNER_KEEP_CLUSTER_DIR"):
            print(f"\nreal node state and logs kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def ns(node, request):
    from operator_support import create_namespace

    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    api = node.api()
    name = create_namespace(api.api_client, f"{base}-{uuid.uuid4().hex[:6]}")
    yield name
    api.delete_namespace(name)  # not waited for: the cluster goes at the end of the module


def pod(name, image, args, *, restart="Never", labels=None, **container_extra):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            # The image exists only in the node's containerd: never pull.
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "args": args,
                            **container_extra}],
        },
    }


def terminated(api, ns, name):
    """The container's terminated state, once it has one."""
    def probe():
        statuses = api.read_namespaced_pod(name, ns).status.container_statuses or []
        return statuses and statuses[0].state.terminated
    return wait_for(f"pod {ns}/{name} to terminate", probe)


def running(api, ns, name):
    def probe():
        p = api.read_namespaced_pod(name, ns)
        return p.status.phase == "Running" and all(s.ready for s in p.status.container_statuses or []) and p
    return wait_for(f"pod {ns}/{name} to run", probe)


def log(api, ns, name):
    return api.read_namespaced_pod_log(name, ns)


def test_node_is_a_kubelet_on_containerd(node):
    n = node.api().read_node(localcluster.NODE_NAME)
    info = n.status.node_info
    assert info.kubelet_version == localcluster.read_versions()["K8S_VERSION"]
    assert info.container_runtime_version == "containerd://" + localcluster.read_versions()["CONTAINERD_VERSION"]
    assert n.metadata.labels.get(localcluster.NODE_LABEL) == "true"
    internal = [a.address for a in n.status.addresses if a.type == "InternalIP"]
    assert internal and not internal[0].startswith("127.")
    assert any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)


def test_exit_code_and_termination_message_are_the_containers(node, ns):
    api = node.api()
    api.create_namespaced_pod(ns, pod("fails", node.image, ["exit", "3", "gave up: no input"]))
    api.create_namespaced_pod(ns, pod("succeeds", node.image, ["exit", "0", "all done"]))
    failed, done = terminated(api, ns, "fails"), terminated(api, ns, "succeeds")
    assert (failed.exit_code, failed.reason, failed.message) == (3, "Error", "gave up: no input")
    assert (done.exit_code, done.reason, done.message) == (0, "Completed", "all done")
    assert failed.container_id.startswith("containerd://")
    assert log(api, ns, "fails") == "gave up: no input\n"
    wait_for("phase Failed", lambda: api.read_namespaced_pod("fails", ns).status.phase == "Failed")


def test_memory_limit_ends_in_oomkilled(node, ns):
    api = node.api()
    api.create_namespaced_pod(ns, pod("hog", node.image, ["alloc", "512"],
                                      resources={"limits": {"memory": "64Mi"}}))
    state = terminated(api, ns, "hog")
    assert (state.reason, state.exit_code) == ("OOMKilled", 137)
    assert "allocated 512 MiB" not in log(api, ns, "hog")


def test_service_answers_by_dns_name_from_another_pod(node, ns):
    api = node.api()
    api.create_namespaced_pod(ns, pod("web", node.image, ["serve", "8080", "hello"], restart="Always",
                                      labels={"app": "web"}, ports=[{"containerPort": 8080}]))
    api.create_namespaced_service(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    })
    running(api, ns, "web")
    endpoints = localcluster.wait_for_service_endpoints(node.state_dir, ns, "web")
    assert endpoints == [f"{api.read_namespaced_pod('web', ns).status.pod_ip}:8080"]
    api.create_namespaced_pod(ns, pod("client", node.image, ["get", f"http://web.{ns}.svc.cluster.local/"]))
    state = terminated(api, ns, "client")
    assert state.exit_code == 0, log(api, ns, "client")
    assert log(api, ns, "client") == "200\nhello from web\n"


def test_kubectl_logs_exec_and_port_forward(node, ns):
    api = node.api()
    api.create_namespaced_pod(ns, pod("web", node.image, ["serve", "8080", "forwarded"], restart="Always"))
    running(api, ns, "web")

    logs = node.kubectl("logs", "-n", ns, "web")
    assert (logs.returncode, logs.stdout) == (0, "listening on :8080\n"), logs.stderr
    exe = node.kubectl("exec", "-n", ns, "web", "--", "/nodetest", "cat", "/etc/hostname")
    assert (exe.returncode, exe.stdout) == (0, "web\n"), exe.stderr

    forward = subprocess.Popen(node.kubectl_argv("port-forward", "-n", ns, "pod/web", ":8080"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = forward.stdout.readline()  # Forwarding from 127.0.0.1:PORT -> 8080
        port = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert port, line + forward.stderr.read() if forward.poll() is not None else line
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/", timeout=10) as resp:
            assert resp.read() == b"forwarded from web\n"
    finally:
        forward.terminate()
        forward.wait(5)


def test_pod_reaches_the_api_server_with_its_service_account_token(node, ns):
    api = node.api()
    rbac = client.RbacAuthorizationV1Api(api.api_client)
    rbac.create_namespaced_role(ns, {
        "metadata": {"name": "list-pods"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "list-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "list-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]})
    api.create_namespaced_pod(ns, pod("lister", node.image, ["api", f"/api/v1/namespaces/{ns}/pods"]))
    state = terminated(api, ns, "lister")
    status, body = log(api, ns, "lister").split("\n", 1)
    assert (state.exit_code, status) == (0, "200"), body[:500]
    assert [p["metadata"]["name"] for p in json.loads(body)["items"]] == ["lister"]


def test_a_killed_container_is_restarted_by_the_kubelet(node, ns):
    api = node.api()
    api.create_namespaced_pod(ns, pod("web", node.image, ["serve", "8080", "hi"], restart="Always"))
    first = running(api, ns, "web").status.container_statuses[0]
    localcluster.kill_container(node.state_dir, first.container_id)

    def restarted():
        s = api.read_namespaced_pod("web", ns).status.container_statuses[0]
        return s.restart_count == 1 and s.ready and s
    again = wait_for("the kubelet to restart the container", restarted)
    assert again.last_state.terminated.exit_code == 137
    assert again.container_id != first.container_id


def test_containers_keep_running_while_the_kubelet_is_stopped(node, ns):
    api = node.api()
    api.create_namespaced_pod(ns, pod("web", node.image, ["serve", "8080", "still here"], restart="Always"))
    pod_ip = running(api, ns, "web").status.pod_ip
    localcluster.stop_kubelet(node.state_dir)
    try:
        assert not localcluster.status(node.state_dir)["components"]["kubelet"]
        with urllib.request.urlopen(f"http://{pod_ip}:8080/", timeout=10) as resp:
            assert resp.read() == b"still here from web\n"
    finally:
        localcluster.start_kubelet(node.state_dir)
    assert localcluster.status(node.state_dir)["healthy"]
    running(api, ns, "web")


def test_down_leaves_the_host_as_it_was(node):
    """Last: stops the module's cluster (the fixture's own `down` is then a no-op)."""
    t0 = time.monotonic()
    localcluster.down(node.state_dir, quiet=True)
    assert time.monotonic() - t0 < 30
    assert localcluster.leftovers(node.state_dir) == []
    assert nodehost.read_sysctls(["net.ipv4.ip_forward"])["net.ipv4.ip_forward"] == node.ip_forward_before

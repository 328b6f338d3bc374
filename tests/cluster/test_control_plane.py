"""Self-tests: the `cluster` fixture is a real control plane with a working node."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

# The local node agent ignores images; on an existing cluster (kind) pods need
# one with sh, sleep and python3.
IMAGE = os.environ.get("EVALRUNNER_TEST_IMAGE", "python:3.12-slim")


def wait_for(what, fn, timeout=60.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def job(name, command, *, backoff_limit=0, **container_extra):
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {"spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 5,
                "containers": [{"name": "main", "image": IMAGE, "command": command,
                                **container_extra}],
            }},
        },
    }


def job_condition(batch, namespace, name, type_):
    j = batch.read_namespaced_job(name, namespace)
    for c in j.status.conditions or []:
        if c.type == type_ and c.status == "True":
            return c
    return None


def job_pod(core, namespace, job_name):
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
    return pods[0] if pods else None


@pytest.fixture
def api(cluster):
    c = cluster.api_client()
    yield c
    c.close()


def test_job_runs_a_command_on_the_node_and_completes(cluster, namespace, api):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    # "$$$$" is "$$" after Kubernetes' own $(VAR)/$$ expansion: the shell's pid.
    batch.create_namespaced_job(namespace, job("hello", ["sh", "-c", "echo hello from $(hostname) $$$$"]))

    cond = wait_for("Job Complete", lambda: job_condition(batch, namespace, "hello", "Complete"))
    assert cond.status == "True"
    pod = job_pod(core, namespace, "hello")
    if cluster.local_node:
        assert pod.spec.node_name == cluster.node_name
    assert pod.status.phase == "Succeeded"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (0, "Completed")
    if cluster.local_node:
        pid = cluster.pod_pid(namespace, pod.metadata.name)
        assert cluster.pod_log(namespace, pod.metadata.name).strip() == f"hello from {os.uname().nodename} {pid}"
    else:
        assert cluster.pod_log(namespace, pod.metadata.name).startswith("hello from ")


def test_sigkilled_process_fails_the_pod_with_137_and_the_job(cluster, namespace, api):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(namespace, job("doomed", ["sleep", "300"]))

    pod = wait_for("pod Running", lambda: (p := job_pod(core, namespace, "doomed"))
                   and p.status.phase == "Running" and p)
    state = pod.status.container_statuses[0].state
    assert state.running is not None and state.running.started_at is not None
    pid = cluster.pod_pid(namespace, pod.metadata.name)
    assert open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0] == b"sleep"
    os.kill(pid, signal.SIGKILL)

    cond = wait_for("Job Failed", lambda: job_condition(batch, namespace, "doomed", "Failed"))
    assert cond.reason == "BackoffLimitExceeded"
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "Error")


def test_service_account_without_rights_gets_403(cluster, namespace, api):
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"audiences": [], "expirationSeconds": 600}}).status.token

    cfg = client.Configuration()
    cfg.host = api.configuration.host
    cfg.ssl_ca_cert = api.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(cfg) as as_sa:
        sa_core = client.CoreV1Api(as_sa)
        with pytest.raises(ApiException) as denied:
            sa_core.list_namespaced_pod(namespace)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:nobody" in denied.value.body

        # The same token works once RBAC grants the right: authorization is real.
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "nobody-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}]})
        wait_for("RBAC grant", lambda: _can_list(sa_core, namespace), timeout=10)


def _can_list(core, namespace):
    try:
        core.list_namespaced_pod(namespace)
        return True
    except ApiException as e:
        assert e.status == 403
        return False


def test_crd_schema_rejects_invalid_object(cluster, namespace, api):
    ext, custom = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
    group = f"t{uuid.uuid4().hex[:8]}.evalrunner.example.com"
    crd_name = f"widgets.{group}"
    ext.create_custom_resource_definition({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10}},
                }},
            }}}],
        },
    })
    try:
        wait_for("CRD Established", lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(crd_name).status.conditions or []))

        def create(spec):
            return custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", {
                "apiVersion": f"{group}/v1", "kind": "Widget",
                "metadata": {"name": f"w{uuid.uuid4().hex[:6]}"}, "spec": spec})

        # The discovery cache may lag the Established condition by a moment.
        wait_for("widgets served", lambda: _created(create, {"size": 3}), timeout=15)
        with pytest.raises(ApiException) as rejected:
            create({"size": 42})
        assert rejected.value.status == 422
        assert "spec.size: Invalid value: 42: spec.size in body should be less than or equal to 10" \
            in rejected.value.body
        with pytest.raises(ApiException) as missing:
            create({})
        assert missing.value.status == 422
        assert "spec.size: Required value" in missing.value.body
    finally:
        ext.delete_custom_resource_definition(crd_name)


def _created(create, spec):
    try:
        create(spec)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def test_deleting_owner_garbage_collects_owned_object(cluster, namespace, api):
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {"a": "1"}})
    core.create_namespaced_config_map(namespace, {
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]},
        "data": {"b": "2"},
    })
    core.delete_namespaced_config_map("owner", namespace)

    def owned_gone():
        try:
            core.read_namespaced_config_map("owned", namespace)
            return False
        except ApiException as e:
            assert e.status == 404
            return True

    wait_for("garbage collection of the owned ConfigMap", owned_gone, timeout=60)


# ---------------------------------------------------------------------------
# The node agent's pod semantics that the operator's Jobs rely on.


def test_pod_environment_mounts_and_termination_message(cluster, namespace, api):
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "suite"},
                                                  "data": {"suite.yaml": "name: demo\n", "MODE": "fast"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"},
                                              "stringData": {"token": "s3cret"}})
    script = (
        'echo "mode=$MODE token=$TOKEN pod=$POD_NAME ns=$POD_NS node=$NODE ip=$POD_IP '
        'greeting=$GREETING from_prefix=$CFG_MODE"; '
        'cat /etc/evalrunner/suite/suite.yaml; '
        'echo "done: $1" > /dev/termination-log; exit 3'
    )
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "envcheck"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "suite", "configMap": {"name": "suite"}}],
            "containers": [{
                "name": "main", "image": IMAGE,
                "command": ["sh", "-c", script, "sh", "/etc/evalrunner/suite/suite.yaml"],
                "envFrom": [{"configMapRef": {"name": "suite"}, "prefix": "CFG_"}],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "GREETING", "value": "hi-$(POD_NAME)-$(UNDEFINED)"},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "suite", "key": "MODE"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "volumeMounts": [{"name": "suite", "mountPath": "/etc/evalrunner/suite"}],
            }],
        },
    })
    # $(POD_NAME) expands; $(UNDEFINED) stays as it is, as in Kubernetes.
    pod = wait_for("pod Failed", lambda: (p := core.read_namespaced_pod("envcheck", namespace))
                   and p.status.phase == "Failed" and p)
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (3, "Error")
    if cluster.local_node:
        assert (pod.spec.node_name, pod.status.pod_ip) == (cluster.node_name, "127.0.0.1")
    # The local agent rewrites mount paths to a per-pod root; a real node mounts them.
    cluster.require_node_files()
    root = cluster.state_dir / "pods" / namespace / "envcheck" / "root" if cluster.local_node else ""
    assert term.message == f"done: {root}/etc/evalrunner/suite/suite.yaml\n"
    lines = cluster.pod_log(namespace, "envcheck").splitlines()
    assert lines == [
        f"mode=fast token=s3cret pod=envcheck ns={namespace} node={pod.spec.node_name} ip={pod.status.pod_ip} "
        "greeting=hi-envcheck-$(UNDEFINED) from_prefix=fast",
        "name: demo",
    ]


def test_a_configmap_volume_made_after_its_pod_is_mounted_whole(cluster, namespace, api):
    """A kubelet starts no container until its volumes are mounted. The node agent once made the volume's
    directory, failed on the missing ConfigMap, and on its retry took the empty directory for the volume:
    the container started without its file (a runner's "suite file not found" under churn)."""
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "late-volume"},
        "spec": {"restartPolicy": "Never",
                 "volumes": [{"name": "late", "configMap": {"name": "late"}}],
                 "containers": [{"name": "main", "image": IMAGE, "command": ["cat", "/etc/late/key"],
                                 "volumeMounts": [{"name": "late", "mountPath": "/etc/late"}]}]},
    })
    wait_for("the pod to wait for its ConfigMap", lambda: any(
        (s.state.waiting and s.state.waiting.reason in ("CreateContainerConfigError", "ContainerCreating"))
        for s in (core.read_namespaced_pod("late-volume", namespace).status.container_statuses or [])))
    time.sleep(1.5)  # at least one failed try
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "late"}, "data": {"key": "arrived"}})
    pod = wait_for("the pod to end", lambda: (p := core.read_namespaced_pod("late-volume", namespace))
                   and p.status.phase in ("Succeeded", "Failed") and p)
    assert pod.status.phase == "Succeeded", pod.status.container_statuses
    assert cluster.pod_log(namespace, "late-volume").strip() == "arrived"


def test_deleting_a_running_pod_kills_its_process(cluster, namespace, api):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "sleeper"},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
                 "containers": [{"name": "main", "image": IMAGE,
                                 "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]}]},
    })
    wait_for("pod Running", lambda: core.read_namespaced_pod("sleeper", namespace).status.phase == "Running")
    pid = cluster.pod_pid(namespace, "sleeper")
    core.delete_namespaced_pod("sleeper", namespace)

    def gone():
        try:
            core.read_namespaced_pod("sleeper", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for("pod removed", gone, timeout=20)
    wait_for("process gone", lambda: not os.path.exists(f"/proc/{pid}"), timeout=5)


def test_memory_limit_ends_in_oomkilled(cluster, namespace, api):
    core = client.CoreV1Api(api)
    hog = "import time; b = bytearray(256 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "hog"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": IMAGE, "command": ["python3", "-c", hog],
            "resources": {"limits": {"memory": "64Mi"}}}]},
    })
    pod = wait_for("pod Failed", lambda: (p := core.read_namespaced_pod("hog", namespace))
                   and p.status.phase == "Failed" and p, timeout=40)
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "OOMKilled")


def test_job_deadline_deletes_the_pod_and_kills_its_process(cluster, namespace, api):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    spec = job("slow", ["sleep", "300"])
    spec["spec"]["activeDeadlineSeconds"] = 2
    batch.create_namespaced_job(namespace, spec)
    pod = wait_for("pod Running", lambda: (p := job_pod(core, namespace, "slow"))
                   and p.status.phase == "Running" and p)
    pid = cluster.pod_pid(namespace, pod.metadata.name)

    cond = wait_for("Job Failed", lambda: job_condition(batch, namespace, "slow", "Failed"), timeout=30)
    assert cond.reason == "DeadlineExceeded"
    wait_for("process gone", lambda: not os.path.exists(f"/proc/{pid}"), timeout=15)

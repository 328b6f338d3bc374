"""Driving the real controller process against the test control plane.

`ControllerProcess` runs `evalrunner controller` as a subprocess for one
namespace, with its own DuckDB file and store-service port, exactly as a
user would; the test reads rows back through the store API (the controller
holds the file) with the admin token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml
from localcluster import free_port  # noqa: F401  (tools/k8s, on the path via conftest)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "suites"
CRD_FILE = REPO / "crds" / "evalruns.evals.workshop.dev.yaml"
GROUP, VERSION, PLURAL = "evals.workshop.dev", "v1alpha1", "evalruns"
ADMIN_TOKEN = "cluster-test-admin-token"
RUN_ID = "evals.workshop.dev/run-id"  # the pod annotation naming the attempt's run row


def create_namespace(api_client: Any, name: str) -> str:
    """A namespace that can take pods: its `default` ServiceAccount exists (pods are refused before)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"evalrunner-test": "true"}}})

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            return False

    wait_for(f"the default ServiceAccount in {name}", has_default_sa, timeout=30, interval=0.1)
    return name


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class ControllerProcess:
    def __init__(self, kubeconfig: str, namespace: str, workdir: Path, extra_args: list[str] | None = None,
                 db: Path | None = None):
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.db = db or workdir / "controller.duckdb"
        self.log_path = workdir / "controller.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> ControllerProcess:
        env = dict(os.environ, EVALRUNNER_ADMIN_TOKEN=ADMIN_TOKEN)
        env.pop("EVALRUNNER_FAULTS", None)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evalrunner.cli", "controller", "--db", str(self.db), "--kubeconfig",
             self.kubeconfig, *self._namespace_args(), "--host", "127.0.0.1", "--port", str(self.port),
             "--log-format", "json", "--scan-interval", "0.5", "--sweep-interval", "2", *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        if wait:
            wait_for("the controller's store service", self.healthy, timeout=30)
        return self

    def _namespace_args(self) -> list[str]:
        """One namespace, a list of them, or none (every namespace)."""
        names = [self.namespace] if isinstance(self.namespace, str) else list(self.namespace or [])
        return [arg for ns in names for arg in ("--namespace", ns)]

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"controller exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == name:
                    out.append(event)
        return out

    # -------------------------------------------------------- the store, read through its API

    def api(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.url}/api/v1{path}")
        req.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def run(self, run_id: str) -> dict | None:
        return self.api(f"/runs/{run_id}")

    def cases(self, run_id: str) -> list[dict]:
        return self.api(f"/runs/{run_id}/cases")["cases"]

    def completed_cases(self, run_id: str) -> set[str]:
        """Names of the run's completed case rows (empty while the run has no row)."""
        if self.run(run_id) is None:
            return set()
        return {c["name"] for c in self.cases(run_id) if c["status"] == "completed"}

    def wait_completed(self, run_id: str, at_least: int, timeout: float = 60) -> set[str]:
        return wait_for(f"{at_least} completed cases of run {run_id}",
                        lambda: done if len(done := self.completed_cases(run_id)) >= at_least else None,
                        timeout=timeout, interval=0.05)

    def wait_terminal(self, run_id: str, timeout: float = 30) -> tuple[dict, float]:
        """The run's row once it is no longer running, and the monotonic time it was first seen so."""
        row = wait_for(f"run {run_id} to terminate", lambda: (r := self.run(run_id)) and r["status"] != "running" and r,
                       timeout=timeout, interval=0.05)
        return row, time.monotonic()


class EvalRuns:
    """EvalRun objects, their status and Events, through the real API server."""

    def __init__(self, api_client: Any, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    def create(self, manifest: dict | str) -> dict:
        body = yaml.safe_load(manifest) if isinstance(manifest, str) else manifest
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def suite(self, name: str, suite: str) -> dict:
        return next((s for s in self.status(name).get("suites", []) if s["name"] == suite), {})

    def wait_phase(self, name: str, phases: tuple[str, ...], timeout: float = 90) -> dict:
        return wait_for(f"EvalRun {name} phase in {phases}",
                        lambda: (st := self.status(name)).get("phase") in phases and st, timeout=timeout)

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=EvalRun").items
        return [(e.reason, e.message) for e in items]

    def running_pod(self, name: str, suite: str, attempt: int = 1, timeout: float = 60) -> dict:
        selector = f"evals.workshop.dev/suite={suite},evals.workshop.dev/attempt={attempt}"

        def probe():
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
            running = [p for p in pods if p.status.phase == "Running"]
            return running[0] if running else None

        return wait_for(f"a Running pod of suite {suite} attempt {attempt}", probe, timeout=timeout)

    def any_pod(self, name: str, suite: str, attempt: int = 1, timeout: float = 60) -> Any:
        """The pod of a suite attempt once it exists, in whatever phase (for runners that die fast)."""
        selector = (f"evals.workshop.dev/evalrun={name},evals.workshop.dev/suite={suite},"
                    f"evals.workshop.dev/attempt={attempt}")
        return wait_for(f"a pod of suite {suite} attempt {attempt}",
                        lambda: next(iter(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items),
                                     None), timeout=timeout, interval=0.05)

    def pod(self, name: str) -> Any | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.core.read_namespaced_pod(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def wait_pod_dying(self, name: str, timeout: float = 60) -> float:
        """Monotonic time at which the pod is first seen finished, being deleted, or gone."""
        def dying():
            pod = self.pod(name)
            return pod is None or pod.metadata.deletion_timestamp is not None or \
                pod.status.phase in ("Succeeded", "Failed")
        wait_for(f"pod {name} to finish", dying, timeout=timeout, interval=0.05)
        return time.monotonic()

    def wait_pod_phase(self, name: str, phases: tuple[str, ...] = ("Failed", "Succeeded"), timeout: float = 30) -> Any:
        return wait_for(f"pod {name} phase in {phases}",
                        lambda: (p := self.pod(name)) is not None and p.status.phase in phases and p,
                        timeout=timeout, interval=0.05)

    def job(self, name: str) -> Any | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.batch.read_namespaced_job(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def install_crd(api_client: Any) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    crd = yaml.safe_load(CRD_FILE.read_text())
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(crd["metadata"]["name"])
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)

    def established():
        conditions = ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for("the EvalRun CRD to be established", established, timeout=30)


def evalrun_manifest(name: str, suites: list[dict], **spec: Any) -> dict:
    """An EvalRun whose runner pods can import the example targets."""
    env = [{"name": "PYTHONPATH", "value": str(EXAMPLES)}] + spec.pop("env", [])
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EvalRun", "metadata": {"name": name},
            "spec": {"suites": suites, "env": env, **spec}}


def slow_suite(name: str = "slow", cases: int = 6, seconds: float = 1.0, timeout: float = 10, **extra: Any) -> dict:
    return {"name": name, "timeoutSeconds": timeout, "concurrency": 1,
            "target": {"python": {"callable": "targets:slow"}},
            "cases": [{"id": f"c{i}", "input": seconds, "expected": "done"} for i in range(cases)], **extra}


def target_suite(name: str, target: str, inputs: list[Any], expected: str = "ok", timeout: float = 10,
                 **extra: Any) -> dict:
    """Cases c0, c1, ... calling `targets:<target>` with `inputs`, one at a time (so their order is known)."""
    return {"name": name, "timeoutSeconds": timeout, "concurrency": 1,
            "target": {"python": {"callable": f"targets:{target}"}},
            "cases": [{"id": f"c{i}", "input": value, "expected": expected} for i, value in enumerate(inputs)],
            **extra}


def smoke_suite(name: str = "smoke") -> dict:
    return {"name": name, "timeoutSeconds": 5, "target": {"python": {"callable": "targets:calculator"}},
            "cases": [{"id": "add", "input": "2+2", "expected": "4"}, {"id": "mul", "input": "6*7", "expected": "42"},
                      {"id": "wrong", "input": "1+1", "expected": "3"}]}


# ---------------------------------------------------------------- helm, kubectl, service-account logins


def tool_path(script: str, name: str) -> str:
    """The pinned binary built by tools/<...>/build (a no-op when cached)."""
    import subprocess as sp

    out = sp.run([str(REPO / script)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return out if out.endswith(name) else str(Path(out) / name)


def kubeconfig_for_token(admin_kubeconfig: str, token: str, path: Path) -> str:
    """A kubeconfig that authenticates with `token` against the same API server."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = admin["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}],
        "current-context": "sa",
    }))
    return str(path)


def service_account_token(api_client: Any, namespace: str, name: str, seconds: int = 3600) -> str:
    """A token for the ServiceAccount from the TokenRequest API, as a kubelet would mount it."""
    from kubernetes import client

    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": seconds}}
    return client.CoreV1Api(api_client).create_namespaced_service_account_token(name, namespace, request).status.token

"""A node agent that runs pods as local processes, for tests.

It registers a Node, keeps it Ready with status heartbeats and a Lease in
kube-node-lease, watches the pods bound to it, and for each pod runs the
first container's ``command`` + ``args`` as a local process (the image is
ignored) with the pod's environment and volumes, then reports the real
outcome: ``Running`` with a container status, then ``terminated`` with the
exit code, ``Completed``/``Error``/``OOMKilled``, the termination message and
phase ``Succeeded``/``Failed``. Deleting a pod kills its process (SIGTERM,
SIGKILL after the grace period) and removes the pod, as a kubelet does.

Only the standard library is used (PyYAML only to read a YAML kubeconfig).
See tools/k8s/README.md for what is real and what is simulated.

Per-pod files live in ``<state-dir>/pods/<namespace>/<name>/``:
``pid`` (the process id, also its process-group id), ``log`` (stdout and
stderr), ``termination-log``, ``root/`` (mount paths) and ``volumes/``.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("nodeagent")

AGENT_VERSION = "v1.34.4"  # reported as kubeletVersion
HOST_IP = "127.0.0.1"
DEFAULT_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
STATUS_INTERVAL = 10.0
LEASE_INTERVAL = 3.0
LEASE_DURATION = 40
MAX_MESSAGE = 4096


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    return datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9,
    "T": 1e12, "P": 1e15, "E": 1e18,
}


def parse_quantity(q: str | int | float) -> float:
    """Kubernetes resource quantity ("64Mi", "500m", "1.5G", "1e9") to a number."""
    if isinstance(q, (int, float)):
        return float(q)
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", q.strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


# --------------------------------------------------------------------------
# A small Kubernetes API client (JSON over HTTPS, stdlib only).


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status


class Api:
    def __init__(self, kubeconfig: str) -> None:
        text = Path(kubeconfig).read_text()
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError:
            import yaml  # only needed for a user's YAML kubeconfig

            cfg = yaml.safe_load(text)
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {})
        self.server = cluster["server"].rstrip("/")
        self._tmp = tempfile.mkdtemp(prefix="nodeagent-cfg-")

        def as_file(data_key: str, file_key: str, src: dict, name: str) -> str | None:
            if src.get(data_key):
                path = os.path.join(self._tmp, name)
                Path(path).write_bytes(base64.b64decode(src[data_key]))
                return path
            return src.get(file_key)

        ca = as_file("certificate-authority-data", "certificate-authority", cluster, "ca.crt")
        if cluster.get("insecure-skip-tls-verify"):
            self.ctx = ssl._create_unverified_context()
        else:
            self.ctx = ssl.create_default_context(cafile=ca)
        cert = as_file("client-certificate-data", "client-certificate", user, "client.crt")
        key = as_file("client-key-data", "client-key", user, "client.key")
        if cert and key:
            self.ctx.load_cert_chain(cert, key)
        self.token = user.get("token")

    def request(self, method: str, path: str, body=None, *, query: dict | None = None,
                content_type: str = "application/json", timeout: float = 30,
                ok404: bool = False):
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if ok404 and e.code == 404:
                return None
            raise ApiError(e.code, text, f"{method} {path}") from None

    def stream(self, path: str, query: dict, timeout: float):
        url = self.server + path + "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            resp = urllib.request.urlopen(req, context=self.ctx, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace"), f"WATCH {path}") from None
        with resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    def patch_status(self, ns: str, name: str, status: dict) -> None:
        """Patch a pod's status; retried on transient errors (the patch is idempotent)."""
        for attempt in range(20):
            try:
                self.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
                             content_type="application/strategic-merge-patch+json", ok404=True)
                return
            except ApiError as e:
                if e.status not in (429, 500, 502, 503, 504) or attempt == 19:
                    raise
            except OSError:
                if attempt == 19:
                    raise
            time.sleep(0.5)


# --------------------------------------------------------------------------
# Memory limits: a real cgroup (v1 memory controller or v2), else RSS polling.


class CgroupMemory:
    """Creates one memory cgroup per pod under a root owned by this agent."""

    def __init__(self, state_dir: Path, agent_id: str) -> None:
        self.mode = "poll"
        self.root: Path | None = None
        try:
            self._detect(agent_id)
        except OSError as e:
            log.warning("no writable memory cgroup (%s); memory limits are enforced by polling RSS", e)
            self.mode, self.root = "poll", None
        if self.root is not None:
            (state_dir / "cgroup-root").write_text(str(self.root))
        log.info("memory limits: %s (%s)", self.mode, self.root or "polling RSS")

    def _detect(self, agent_id: str) -> None:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            own[ctrls] = path
        v1 = v2 = None
        for line in mounts:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields[0] == "cgroup" and "memory" in rfields[-1].split(","):
                v1 = fields[4]
            elif rfields[0] == "cgroup2":
                v2 = fields[4]
        if v1:
            rel = next((p for c, p in own.items() if "memory" in c.split(",")), "/")
            base = Path(v1 + rel) if Path(v1 + rel).is_dir() else Path(v1)
            root = base / f"evalrunner-{agent_id}"
            root.mkdir(exist_ok=True)
            (root / "memory.limit_in_bytes").read_text()
            self.mode, self.root = "cgroup-v1", root
            return
        if v2:
            rel = own.get("", "/")
            base = Path(v2 + rel) if Path(v2 + rel).is_dir() else Path(v2)
            root = base / f"evalrunner-{agent_id}"
            root.mkdir(exist_ok=True)
            try:
                (root / "cgroup.subtree_control").write_text("+memory")
            except OSError:
                pass
            probe = root / "probe"
            probe.mkdir(exist_ok=True)
            ok = (probe / "memory.max").exists()
            probe.rmdir()
            if not ok:
                root.rmdir()
                raise OSError("memory controller not delegated to " + str(base))
            self.mode, self.root = "cgroup-v2", root
            return
        raise OSError("no cgroup filesystem mounted")

    def create(self, uid: str, limit: int) -> Path | None:
        if self.root is None:
            return None
        cg = self.root / uid
        cg.mkdir(exist_ok=True)
        if self.mode == "cgroup-v1":
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            try:  # no swap beyond the limit, where swap accounting exists
                (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass
        else:
            (cg / "memory.max").write_text(str(limit))
            try:
                (cg / "memory.swap.max").write_text("0")
            except OSError:
                pass
            (cg / "memory.oom.group").write_text("1")
        return cg

    def oom_killed(self, cg: Path) -> bool:
        name = "memory.oom_control" if self.mode == "cgroup-v1" else "memory.events"
        try:
            for line in (cg / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
            if self.mode == "cgroup-v1":  # kernels without an oom_kill counter
                return False
        except OSError:
            pass
        return False

    def remove(self, cg: Path | None) -> None:
        if cg is None:
            return
        for _ in range(50):
            try:
                cg.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def group_rss(pgid: int) -> int:
    """Resident memory of every process in a process group, in bytes."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 (pgrp) is index 2 after the comm
                total += int(fields[21]) * page  # field 24 (rss)
        except (OSError, ValueError, IndexError):
            continue
    return total


# --------------------------------------------------------------------------
# Running one pod.


class ConfigError(Exception):
    """The container cannot be configured yet (e.g. missing ConfigMap); retried."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion; $$ escapes a dollar."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


class PodRunner(threading.Thread):
    def __init__(self, agent: "Agent", pod: dict) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.agent = agent
        self.api = agent.api
        self.pod = pod
        md = pod["metadata"]
        self.ns, self.pod_name, self.uid = md["namespace"], md["name"], md["uid"]
        self.dir = agent.state_dir / "pods" / _safe(self.ns) / _safe(self.pod_name)
        self.lock = threading.Lock()
        self.stop_requested = False
        self.stop_grace = 30.0
        self.stop_reason: str | None = None
        self.done = False
        self.proc: subprocess.Popen | None = None
        self.start_time = now()

    # -- called from the watch thread
    def request_stop(self, grace: float, reason: str | None = None) -> bool:
        """Ask the runner to kill its process; False when it has already finished."""
        with self.lock:
            if self.done:
                return False
            if not self.stop_requested:
                self.stop_requested, self.stop_grace, self.stop_reason = True, grace, reason
            return True

    # -- the pod's lifecycle
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: agent error", self.ns, self.pod_name)
            self._signal(signal.SIGKILL)
            try:
                self._report_terminated(128, "Error", "node agent error; see the agent log", None)
            except Exception:
                log.exception("pod %s/%s: could not report the failure", self.ns, self.pod_name)
            self._finish()

    def _run(self) -> None:
        spec = self.pod["spec"]
        container = spec["containers"][0]
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.api.patch_status(self.ns, self.pod_name, {
            "phase": "Pending", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "startTime": self.start_time,
            "conditions": [self._cond("PodReadyToStartContainers", True),
                           self._cond("Initialized", True),
                           self._cond("ContainersReady", False, "ContainersNotReady"),
                           self._cond("Ready", False, "ContainersNotReady")],
            "containerStatuses": [self._cstatus(container, {"waiting": {"reason": "ContainerCreating"}})],
        })
        # Resolve configuration; a missing ConfigMap/Secret is retried, like a kubelet.
        while True:
            if self.stop_requested:
                self._finish()
                return
            try:
                argv, env, cwd = self._configure(container)
                break
            except ConfigError as e:
                self.api.patch_status(self.ns, self.pod_name, {"containerStatuses": [self._cstatus(
                    container, {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}})]})
                time.sleep(1.0)

        limit = self._memory_limit(container)
        cg = self.agent.cgroups.create(self.uid, limit) if limit else None
        log_file = open(self.dir / "log", "wb")
        if cg is not None:
            procs = cg / "cgroup.procs"
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" || exit 125; exec "$@"', str(procs), *argv]
        try:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log_file.close()
            self.agent.cgroups.remove(cg)
            self._report_terminated(128, "StartError", str(e), container)
            self._finish()
            return
        finally:
            if not log_file.closed:
                log_file.close()
        started = now()
        (self.dir / "pid").write_text(str(self.proc.pid))
        log.info("pod %s/%s: started pid %d: %s", self.ns, self.pod_name, self.proc.pid, argv)
        self.api.patch_status(self.ns, self.pod_name, {
            "phase": "Running", "podIP": HOST_IP, "podIPs": [{"ip": HOST_IP}],
            "conditions": [self._cond("ContainersReady", True), self._cond("Ready", True)],
            "containerStatuses": [self._cstatus(container, {"running": {"startedAt": started}},
                                                ready=True, started=True, pid=self.proc.pid)],
        })

        deadline = None
        if spec.get("activeDeadlineSeconds"):
            deadline = parse_time(self.start_time) + int(spec["activeDeadlineSeconds"])
        poll_oom = limit if (limit and cg is None) else None
        killed_for: str | None = None  # "oom", "deadline", "delete"
        term_sent_at: float | None = None
        while self.proc.poll() is None:
            time.sleep(0.1)
            if poll_oom and group_rss(self.proc.pid) > poll_oom:
                killed_for = "oom"
                self._signal(signal.SIGKILL)
            elif deadline and time.time() > deadline and killed_for is None:
                killed_for = "deadline"
                self._signal(signal.SIGKILL)
            elif self.stop_requested and killed_for is None:
                killed_for = "delete"
                term_sent_at = time.monotonic()
                self._signal(signal.SIGTERM)
            elif killed_for == "delete" and time.monotonic() - term_sent_at > self.stop_grace:
                self._signal(signal.SIGKILL)
                killed_for = "delete-kill"
        # Whatever the main process left behind in its group goes too.
        self._signal(signal.SIGKILL)
        rc = self.proc.returncode
        exit_code = 128 - rc if rc < 0 else rc
        oom = killed_for == "oom" or (cg is not None and self.agent.cgroups.oom_killed(cg))
        self.agent.cgroups.remove(cg)
        if oom:
            reason = "OOMKilled"
            exit_code = 137
        elif exit_code == 0:
            reason = "Completed"
        else:
            reason = "Error"
        message = self._termination_message(container, exit_code)
        pod_reason = None
        if killed_for == "deadline":
            pod_reason = ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline")
        log.info("pod %s/%s: exited %d (%s)", self.ns, self.pod_name, exit_code, reason)
        self._report_terminated(exit_code, reason, message, container, started=started, pod_reason=pod_reason)
        self._finish()

    def _finish(self) -> None:
        with self.lock:
            self.done = True
            delete = self.stop_requested
        if delete:
            self.agent.delete_pod(self.ns, self.pod_name, self.uid)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- status helpers
    def _cond(self, type_: str, ok: bool, reason: str | None = None) -> dict:
        c = {"type": type_, "status": "True" if ok else "False", "lastProbeTime": None,
             "lastTransitionTime": now()}
        if reason:
            c["reason"] = reason
        return c

    def _cstatus(self, container: dict | None, state: dict, *, ready: bool = False,
                 started: bool = False, pid: int | None = None, last: dict | None = None) -> dict:
        container = container or self.pod["spec"]["containers"][0]
        s = {"name": container["name"], "image": container.get("image", ""),
             "imageID": "", "ready": ready, "started": started, "restartCount": 0, "state": state,
             "lastState": last or {}}
        pid = pid or (self.proc.pid if self.proc else None)
        if pid:
            s["containerID"] = f"evalrunner://{self.uid}-{pid}"
        return s

    def _report_terminated(self, exit_code: int, reason: str, message: str | None,
                           container: dict | None, *, started: str | None = None,
                           pod_reason: tuple[str, str] | None = None) -> None:
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started,
                      "finishedAt": now()}
        if message:
            terminated["message"] = message
        if self.proc is not None:
            terminated["containerID"] = f"evalrunner://{self.uid}-{self.proc.pid}"
        phase = "Succeeded" if exit_code == 0 and pod_reason is None else "Failed"
        status = {
            "phase": phase,
            "conditions": [self._cond("ContainersReady", False, "PodCompleted"),
                           self._cond("Ready", False, "PodCompleted"),
                           self._cond("PodReadyToStartContainers", False)],
            "containerStatuses": [self._cstatus(container, {"terminated": terminated})],
        }
        if pod_reason:
            status["reason"], status["message"] = pod_reason
        self.api.patch_status(self.ns, self.pod_name, status)

    def _termination_message(self, container: dict, exit_code: int) -> str | None:
        path = self.dir / "termination-log"
        message = ""
        try:
            message = path.read_bytes()[:MAX_MESSAGE].decode(errors="replace")
        except OSError:
            pass
        if not message and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                lines = (self.dir / "log").read_bytes().decode(errors="replace").splitlines()[-80:]
                message = "\n".join(lines)[-2048:]
            except OSError:
                pass
        return message or None

    def _memory_limit(self, container: dict) -> int | None:
        limit = (container.get("resources") or {}).get("limits", {}).get("memory")
        return int(parse_quantity(limit)) if limit else None

    # -- configuration: env, volumes, mount paths
    def _field(self, path: str) -> str:
        md, spec = self.pod["metadata"], self.pod["spec"]
        simple = {
            "metadata.name": md["name"], "metadata.namespace": md["namespace"],
            "metadata.uid": md["uid"], "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": HOST_IP, "status.podIPs": HOST_IP,
            "status.hostIP": HOST_IP, "status.hostIPs": HOST_IP,
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (md.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = md.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _resource(self, ref: dict, container: dict) -> str:
        res = ref["resource"]
        kind, _, name = res.partition(".")
        value = ((container.get("resources") or {}).get(kind) or {}).get(name)
        if value is None:
            value = self.agent.allocatable.get(name, "0")
        divisor = parse_quantity(ref.get("divisor", "1"))
        return str(math.ceil(parse_quantity(value) / divisor))

    def _get(self, kind: str, name: str, optional: bool) -> dict | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        try:
            obj = self.api.request("GET", f"/api/v1/namespaces/{self.ns}/{plural}/{name}", ok404=True)
        except ApiError as e:  # 403 right after pod creation: node authorizer graph lag
            raise ConfigError(f"{kind.lower()} {name!r}: {e}") from None
        if obj is None and not optional:
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        return obj

    def _data(self, kind: str, obj: dict | None) -> dict[str, bytes]:
        if obj is None:
            return {}
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def _configure(self, container: dict) -> tuple[list[str], dict[str, str], str]:
        spec = self.pod["spec"]
        pass_env = set(DEFAULT_PASS_ENV) | {
            v for v in os.environ.get("EVALRUNNER_AGENT_PASS_ENV", "").split(",") if v}
        env = {k: os.environ[k] for k in pass_env if k in os.environ}
        env.update({
            "HOSTNAME": self.pod_name,
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.agent.api_port),
        })
        # Volumes and mount paths.
        root = self.dir / "root"
        vols = self.dir / "volumes"
        root.mkdir(exist_ok=True)
        vols.mkdir(exist_ok=True)
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        remap: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            vol = volumes.get(mount["name"])
            if vol is None:
                raise ConfigError(f"volume {mount['name']!r} not found")
            src = vols / _safe(vol["name"])
            if not src.exists() and "hostPath" not in vol:
                # Made aside and renamed whole: a projection that fails (a ConfigMap not there yet) is
                # retried, and must not leave an empty volume that the retry takes for a made one.
                partial = vols / f".{_safe(vol['name'])}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                self._materialize(vol, partial)
                partial.rename(src)
            if "hostPath" in vol:
                src = Path(vol["hostPath"]["path"])
            if mount.get("subPath"):
                src = src / mount["subPath"]
            target = root / mount["mountPath"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                continue
            target.symlink_to(src)
            remap[mount["mountPath"].rstrip("/") or "/"] = str(target)
        term_log = self.dir / "termination-log"
        term_log.touch()
        remap[container.get("terminationMessagePath") or "/dev/termination-log"] = str(term_log)
        env["EVALRUNNER_MOUNT_ROOT"] = str(root)
        env["EVALRUNNER_TERMINATION_LOG"] = str(term_log)
        env["EVALRUNNER_POD_DIR"] = str(self.dir)

        # envFrom first, then env (env wins), as a kubelet does.
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref, kind = src["configMapRef"], "ConfigMap"
            else:
                ref, kind = src["secretRef"], "Secret"
            obj = self._get(kind, ref["name"], ref.get("optional", False))
            for k, v in self._data(kind, obj).items():
                env[prefix + k] = v.decode(errors="replace")
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = self._remap(expand(item.get("value", ""), env), remap)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self._field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self._resource(vf["resourceFieldRef"], container)
            else:
                kind = "ConfigMap" if "configMapKeyRef" in vf else "Secret"
                ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
                obj = self._get(kind, ref["name"], ref.get("optional", False))
                data = self._data(kind, obj)
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional", False):
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")

        argv = [self._remap(expand(a, env), remap)
                for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise ConfigError("container has no command: the node agent ignores images, "
                              "so a pod must give its command")
        cwd = container.get("workingDir")
        if cwd:
            cwd = self._remap(cwd, remap)
            if not os.path.isdir(cwd):
                cwd = str(root / cwd.lstrip("/"))
                os.makedirs(cwd, exist_ok=True)
        else:
            cwd = str(self.dir)  # a per-pod directory, so pods don't share relative paths
        return argv, env, cwd

    @staticmethod
    def _remap(value: str, remap: dict[str, str]) -> str:
        for mount_path in sorted(remap, key=len, reverse=True):
            value = re.sub(r"(?<![\w./-])" + re.escape(mount_path) + r"(?=$|[/\s:;,=\"'])",
                           lambda _m, t=remap[mount_path]: t, value)
        return value

    def _materialize(self, vol: dict, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol or "secret" in vol:
            self._project(vol, dest)
        elif "projected" in vol:
            for source in vol["projected"].get("sources") or []:
                self._project(source, dest)
        elif "downwardAPI" in vol:
            self._project(vol, dest)
        elif "emptyDir" in vol:
            pass
        else:
            log.warning("pod %s/%s: volume %s of an unsupported type is an empty directory",
                        self.ns, self.pod_name, vol["name"])

    def _write(self, dest: Path, rel: str, data: bytes, mode: int | None) -> None:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode is not None:
            path.chmod(mode)

    def _project(self, source: dict, dest: Path) -> None:
        if "configMap" in source or "secret" in source:
            kind = "ConfigMap" if "configMap" in source else "Secret"
            ref = source.get("configMap") or source.get("secret")
            name = ref.get("name") or ref.get("secretName")
            obj = self._get(kind, name, ref.get("optional", False))
            data = self._data(kind, obj)
            mode = ref.get("defaultMode")
            if ref.get("items"):
                for item in ref["items"]:
                    if item["key"] in data:
                        self._write(dest, item["path"], data[item["key"]], item.get("mode", mode))
                    elif not ref.get("optional", False):
                        raise ConfigError(f"configmap/secret {name}: no key {item['key']}")
            else:
                for key, value in data.items():
                    self._write(dest, key, value, mode)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    value = self._field(item["fieldRef"]["fieldPath"])
                else:
                    value = self._resource(item["resourceFieldRef"], self.pod["spec"]["containers"][0])
                self._write(dest, item["path"], value.encode(), item.get("mode"))
        elif "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            sa = self.pod["spec"].get("serviceAccountName") or "default"
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                "audiences": [sat["audience"]] if sat.get("audience") else [],
                "expirationSeconds": sat.get("expirationSeconds", 3600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
            }}
            try:
                tr = self.api.request("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
            except ApiError as e:
                raise ConfigError(f"token for service account {sa}: {e}") from None
            self._write(dest, sat["path"], tr["status"]["token"].encode(), None)


# --------------------------------------------------------------------------
# The node.


class Agent:
    def __init__(self, kubeconfig: str, state_dir: Path, node_name: str, api_port: int,
                 cpu: str, memory: str, pods: str) -> None:
        self.api = Api(kubeconfig)
        self.state_dir = state_dir
        self.node_name = node_name
        self.api_port = api_port
        self.allocatable = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "100Gi"}
        self.runners: dict[str, PodRunner] = {}
        self.deleting: set[str] = set()
        self.stopping = threading.Event()
        self.cgroups = CgroupMemory(state_dir, f"{_safe(node_name)}-{os.getpid()}")
        (state_dir / "pods").mkdir(parents=True, exist_ok=True)

    @property
    def paused(self) -> bool:
        return (self.state_dir / "node-paused").exists()

    # -- node registration and heartbeats
    def node_status(self) -> dict:
        return {
            "capacity": self.allocatable, "allocatable": self.allocatable,
            "addresses": [{"type": "InternalIP", "address": HOST_IP},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "evalrunner node agent (local processes)", "containerRuntimeVersion":
                         "evalrunner://local-process", "kubeletVersion": AGENT_VERSION, "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
            "conditions": [
                {"type": t, "status": "False", "reason": r, "message": m,
                 "lastHeartbeatTime": now(), "lastTransitionTime": now()}
                for t, r, m in (("MemoryPressure", "KubeletHasSufficientMemory", "ok"),
                                ("DiskPressure", "KubeletHasNoDiskPressure", "ok"),
                                ("PIDPressure", "KubeletHasSufficientPID", "ok"))
            ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "evalrunner node agent is posting ready status",
                  "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        }

    def register(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": {
            "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "evalrunner/node-agent": "true"}}}
        try:
            self.api.request("POST", "/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
        self.post_status()
        log.info("registered node %s", self.node_name)

    def post_status(self) -> None:
        self.api.request("PATCH", f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()},
                         content_type="application/strategic-merge-patch+json")

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION,
                "renewTime": now_micro()}
        lease = self.api.request("GET", path, ok404=True)
        if lease is None:
            node = self.api.request("GET", f"/api/v1/nodes/{self.node_name}")
            self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node_name, "namespace": "kube-node-lease", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": self.node_name,
                    "uid": node["metadata"]["uid"]}]},
                "spec": spec})
        else:
            lease["spec"].update(spec)
            self.api.request("PUT", path, lease)

    def heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_INTERVAL):
            if self.paused:
                continue
            try:
                self.renew_lease()
                if time.monotonic() - last_status > STATUS_INTERVAL:
                    self.post_status()
                    last_status = time.monotonic()
            except Exception as e:  # keep beating; the API server may be restarting
                log.warning("heartbeat failed: %s", e)

    def resume_watch(self) -> None:
        """After a pause, post Ready at once so the node comes back quickly."""
        was_paused = False
        while not self.stopping.wait(0.5):
            if self.paused:
                was_paused = True
            elif was_paused:
                was_paused = False
                try:
                    self.post_status()
                    self.renew_lease()
                except Exception as e:
                    log.warning("resume failed: %s", e)

    # -- pods
    def delete_pod(self, ns: str, name: str, uid: str) -> None:
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}",
                             {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                              "preconditions": {"uid": uid}}, ok404=True)
        except ApiError as e:
            if e.status != 409:  # 409: a newer pod with the same name
                log.warning("delete %s/%s: %s", ns, name, e)

    def handle(self, event_type: str, pod: dict) -> None:
        md = pod["metadata"]
        uid = md["uid"]
        if pod["spec"].get("nodeName") != self.node_name:
            return
        runner = self.runners.get(uid)
        if event_type == "DELETED":
            if runner is not None:
                runner.request_stop(0)
                self.runners.pop(uid, None)
            self.deleting.discard(uid)
            return
        if md.get("deletionTimestamp"):
            if uid in self.deleting:
                return
            self.deleting.add(uid)
            grace = float(md.get("deletionGracePeriodSeconds") or 0)
            if runner is None or not runner.request_stop(grace):
                self.delete_pod(md["namespace"], md["name"], uid)
            return
        if runner is not None:
            return
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            return
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        if any("running" in (s.get("state") or {}) for s in statuses):
            # Started by an earlier agent process that is gone: its process is lost.
            log.warning("pod %s/%s was running under a previous agent; marking it failed",
                        md["namespace"], md["name"])
            orphan = PodRunner(self, pod)
            orphan._report_terminated(137, "Error", "node agent restarted; process lost", None)
            return
        runner = PodRunner(self, pod)
        self.runners[uid] = runner
        runner.start()

    def watch_loop(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                listing = self.api.request("GET", path, query={"fieldSelector": selector})
                seen = set()
                for pod in listing.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self.handle("ADDED", pod)
                for uid in list(self.runners):
                    if uid not in seen:
                        self.runners.pop(uid).request_stop(0)
                rv = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.api.stream(path, {
                            "fieldSelector": selector, "watch": "1", "resourceVersion": rv,
                            "allowWatchBookmarks": "true", "timeoutSeconds": "60"}, timeout=90):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError(obj.get("code", 500), json.dumps(obj), "watch")
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self.handle(event["type"], obj)
            except Exception as e:
                if self.stopping.is_set():
                    return
                log.warning("pod watch restarting: %s", e)
                time.sleep(0.5)

    def shutdown(self, *_args) -> None:
        self.stopping.set()
        for runner in list(self.runners.values()):
            if runner.proc is not None and runner.proc.poll() is None:
                runner._signal(signal.SIGKILL)
        for runner in list(self.runners.values()):
            if runner.proc is not None:
                try:
                    runner.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        log.info("node agent stopped")
        os._exit(0)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.shutdown)
        signal.signal(signal.SIGINT, self.shutdown)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.register()
                self.renew_lease()
                break
            except Exception as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("registering node: %s", e)
                time.sleep(0.5)
        threading.Thread(target=self.heartbeat_loop, daemon=True, name="heartbeat").start()
        threading.Thread(target=self.resume_watch, daemon=True, name="resume").start()
        threading.Thread(target=self.watch_loop, daemon=True, name="pods").start()
        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run pods bound to a node as local processes.")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--node-name", default="evalrunner-node-0")
    p.add_argument("--api-port", type=int, default=443,
                   help="port exported to pods as KUBERNETES_SERVICE_PORT")
    p.add_argument("--cpu", default="8")
    p.add_argument("--memory", default="16Gi")
    p.add_argument("--pods", default="110")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    agent = Agent(args.kubeconfig, args.state_dir, args.node_name, args.api_port,
                  args.cpu, args.memory, args.pods)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

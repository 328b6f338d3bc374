"""Run kwok against a local test control plane (tools/k8s) and give it fake nodes.

kwok (sigs.k8s.io/kwok, built by ``tools/kwok/build``) plays the kubelet of
every Node annotated ``kwok.x-k8s.io/node: fake``: it keeps the node Ready
(renewing its Lease) and moves the pods bound to it through the Stages of
``stages.yaml``: Pending -> Running, then, for a runner pod whose suite is
named after an outcome (``succeeded``, ``failed``, ``oomkilled``,
``evicted``, ``deleted``), that ending after a delay. Nothing runs: a pod is
only its API object, so thousands of them cost the API server and the
controller what real pods would, and this machine almost nothing else.

    from kwok import Kwok
    with Kwok(state_dir).start() as kw:        # the cluster of tools/k8s/cluster up
        names = kw.create_nodes(3)             # fake nodes, tainted unless taint=False
        kw.wait_nodes_ready(names)
        ...
    # stop(): the fake nodes, the pods bound to them and the kwok process are gone

Fake nodes carry the taint ``kwok.x-k8s.io/node=fake:NoSchedule`` by
default, so that only pods that tolerate it (and say so with a nodeSelector)
land there and the tests sharing the cluster keep using the node agent; a
benchmark whose pods must land on them creates them with ``taint=False`` and
cordons the node agent's node.

The delay before a runner pod ends is ``exit_after`` (seconds) when the
Stages are rendered, or the pod annotation ``EXIT_AFTER_ANNOTATION``: a Go
duration ("1.5s") counted from the pod's last change, or an RFC 3339 time.

Command line (``tools/kwok/kwok``):
``kwok up [--nodes N] [--no-taint] [--exit-after S]`` starts kwok for the cluster in
``$EVALRUNNER_CLUSTER_DIR`` (default /tmp/evalrunner-cluster) and returns;
``kwok down`` removes the fake nodes and their pods and stops it;
``kwok status`` prints JSON.

Only the standard library is used (and ``localcluster`` from tools/k8s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "k8s"))
import localcluster

NODE_ANNOTATION = "kwok.x-k8s.io/node"        # kwok manages the nodes that carry it with value "fake"
NODE_LABEL = "type"                           # kwok's documented label for its nodes: type=kwok
TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Equal", "value": "fake", "effect": "NoSchedule"}
NODE_SELECTOR = {NODE_LABEL: "kwok"}
EXIT_AFTER_ANNOTATION = "kwok.evals.workshop.dev/exit-after"
OUTCOMES = ("succeeded", "failed", "oomkilled", "evicted", "deleted")
SUITE_LABEL = "evals.workshop.dev/suite"
STATE_FILE = "kwok.json"
POD_CIDR = "10.244.0.1/16"     # pod IPs kwok hands out (nothing routes to them)
NODE_IP = "10.243.0.1"         # the fake nodes' InternalIP
LEASE_SECONDS = 40


class KwokError(RuntimeError):
    pass


def read_versions() -> dict[str, str]:
    return localcluster.read_versions(HERE / "versions.env")


def binary() -> Path:
    """The kwok binary of tools/kwok/build ($EVALRUNNER_KWOK_BIN overrides)."""
    if os.environ.get("EVALRUNNER_KWOK_BIN"):
        return Path(os.environ["EVALRUNNER_KWOK_BIN"])
    return localcluster.cache_root() / "kwok" / read_versions()["KWOK_VERSION"] / "bin" / "kwok"


def check_binary() -> Path:
    path = binary()
    if not os.access(path, os.X_OK):
        raise KwokError(f"kwok is not built ({path} missing). Build it first: {HERE / 'build'}")
    return path


def render_stages(dest: Path, exit_after: float = 2.0) -> Path:
    """stages.yaml with its placeholders filled in, written to `dest`."""
    text = (HERE / "stages.yaml").read_text()
    text = text.replace("__EXIT_AFTER_MS__", str(max(0, int(exit_after * 1000))))
    text = text.replace("__EXIT_AFTER_ANNOTATION__", EXIT_AFTER_ANNOTATION)
    dest.write_text(text)
    return dest


class Api:
    """A small client for the admin user of a tools/k8s cluster (stdlib only)."""

    def __init__(self, state_dir: Path):
        st = localcluster.State.load(state_dir)
        if st is None:
            raise KwokError(f"no cluster recorded in {state_dir}; start one with tools/k8s/cluster up")
        self.server = st.server
        pki = Path(st.state_dir) / "pki"
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             timeout: float = 30.0, ok: tuple[int, ...] = (200, 201, 202)) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code in ok:
                return e.code, None
            raise KwokError(f"{method} {path}: HTTP {e.code}: {text[:400]}") from None

    def try_call(self, method: str, path: str, body: Any = None, **kw: Any) -> int:
        """The status code; 404/409 are answers here, not errors."""
        return self.call(method, path, body, ok=(200, 201, 202, 404, 409), **kw)[0]


class Kwok:
    """One kwok process for one tools/k8s cluster, and the fake nodes it was asked to create."""

    def __init__(self, state_dir: str | Path, *, exit_after: float = 2.0, name: str = "kwok",
                 extra_args: list[str] | None = None):
        self.state_dir = Path(state_dir)
        self.exit_after = exit_after
        self.name = name
        self.extra_args = extra_args or []
        self.api = Api(self.state_dir)
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.log_path = self.state_dir / "logs" / f"{name}.log"
        self.config_path = self.state_dir / f"{name}-stages.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.nodes: list[str] = []

    # ------------------------------------------------------------ process

    def start(self, timeout: float = 30.0) -> Kwok:
        kwok = check_binary()
        render_stages(self.config_path, self.exit_after)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            str(kwok),
            f"--config={self.config_path}",
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--node-lease-duration-seconds={LEASE_SECONDS}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            *self.extra_args,
        ]
        # HOME: kwok also reads ~/.kwok/kwok.yaml when it exists; this run uses our Stages only.
        env = dict(os.environ, HOME=str(self.state_dir))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.state_dir, start_new_session=True, env=env)
        self.pid = self.proc.pid
        self._save()
        deadline = time.monotonic() + timeout
        # kwok logs "Watch nodes" once its configuration and Stages are loaded and it has connected.
        while b'"msg":"Watch nodes"' not in self._log_bytes():
            try:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise KwokError(f"kwok did not start within {timeout:.0f}s:\n{self.log_tail()}")
            except KwokError:
                self.stop(delete_nodes=False)
                raise
            time.sleep(0.1)
        return self

    def _log_bytes(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except OSError:
            return b""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log_bytes().decode(errors="replace").splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise KwokError(f"kwok exited with {self.proc.returncode}:\n{self.log_tail()}")

    def _save(self) -> None:
        data = {"pid": self.pid, "nodes": self.nodes, "log": str(self.log_path), "exit_after": self.exit_after}
        (self.state_dir / f"{self.name}.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def attach(cls, state_dir: str | Path, name: str = "kwok") -> Kwok:
        """The kwok that `start` recorded in state_dir (for the command line's `down`)."""
        kw = cls(state_dir, name=name)
        path = kw.state_dir / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            kw.pid, kw.nodes, kw.exit_after = data.get("pid"), data.get("nodes", []), data.get("exit_after", 2.0)
        return kw

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return bool(self.pid and localcluster._pid_matches(self.pid, "kwok"))

    def stop(self, *, delete_nodes: bool = True, timeout: float = 30.0) -> None:
        """Delete the fake nodes and every pod bound to them, then stop kwok (also when the deletions fail).

        Idempotent. `delete_nodes=False` when the whole cluster goes next anyway.
        """
        try:
            if delete_nodes and self.nodes:
                self.delete_nodes(self.nodes, timeout=timeout)
        finally:
            self._stop_process()

    def _stop_process(self) -> None:
        if self.pid and self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not localcluster._wait_exit(self.pid, 10.0):
                localcluster._kill_tree(self.pid)
                localcluster._wait_exit(self.pid, 5.0)
        self._save()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ nodes

    def create_nodes(self, count: int, *, prefix: str = "kwok-node", taint: bool = True,
                     cpu: str = "1000", memory: str = "4Ti", pods: int = 1000) -> list[str]:
        """Create `count` fake nodes (prefix-0, prefix-1, ...) that kwok manages; returns their names."""
        names = []
        for i in range(count):
            name = f"{prefix}-{i}"
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {NODE_ANNOTATION: "fake"},
                    "labels": {NODE_LABEL: "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                               "kubernetes.io/arch": "amd64", "kubernetes.io/role": "agent"},
                },
                "spec": {"taints": [TAINT]} if taint else {},
                "status": {
                    "allocatable": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                    "capacity": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                },
            }
            self.api.try_call("POST", "/api/v1/nodes", node)
            names.append(name)
            if name not in self.nodes:
                self.nodes.append(name)
        self._save()
        return names

    def ready_nodes(self, names: list[str]) -> list[str]:
        ready = []
        selector = urllib.parse.quote(f"{NODE_LABEL}=kwok")
        _, body = self.api.call("GET", f"/api/v1/nodes?labelSelector={selector}")
        for node in body["items"]:
            if node["metadata"]["name"] in names and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", [])):
                ready.append(node["metadata"]["name"])
        return ready

    def wait_nodes_ready(self, names: list[str], timeout: float = 60.0) -> float:
        """Seconds until every node in `names` is Ready."""
        t0 = time.monotonic()
        while len(self.ready_nodes(names)) < len(names):
            self._check_alive()
            if time.monotonic() - t0 > timeout:
                raise KwokError(f"nodes not Ready after {timeout:.0f}s: "
                                f"{sorted(set(names) - set(self.ready_nodes(names)))}\n{self.log_tail()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def pods_on(self, names: list[str]) -> list[tuple[str, str]]:
        """(namespace, name) of every pod bound to one of the nodes."""
        out = []
        for node in names:
            selector = urllib.parse.quote(f"spec.nodeName={node}")
            _, body = self.api.call("GET", f"/api/v1/pods?fieldSelector={selector}")
            out += [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in body["items"]]
        return out

    def delete_nodes(self, names: list[str], timeout: float = 30.0) -> None:
        """Delete the nodes, then force-delete the pods bound to them (no kubelet will ever confirm).

        `timeout` is for a few pods; it grows by 50 ms for each pod found.
        """
        for node in names:
            self.api.try_call("DELETE", f"/api/v1/nodes/{node}")
        deadline = time.monotonic() + timeout + 0.05 * len(self.pods_on(names))
        while pods := self.pods_on(names):
            for ns, pod in pods:
                # A pod may keep a finalizer (a Job's job-tracking one): drop it, then delete it now.
                self.api.try_call("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod}",
                                  {"metadata": {"finalizers": None}},
                                  content_type="application/merge-patch+json")
                self.api.try_call("DELETE", f"/api/v1/namespaces/{ns}/pods/{pod}?gracePeriodSeconds=0")
            if time.monotonic() > deadline:
                raise KwokError(f"pods still bound to deleted fake nodes: {pods[:10]}")
            time.sleep(0.2)
        self.nodes = [n for n in self.nodes if n not in names]
        self._save()

    def leftovers(self) -> list[str]:
        """What `stop` should have removed: the process, fake nodes, pods on them, their Leases."""
        found = []
        if self.pid and self.alive():
            found.append(f"process kwok (pid {self.pid})")
        _, body = self.api.call("GET", "/api/v1/nodes")
        fake = [n["metadata"]["name"] for n in body["items"]
                if (n["metadata"].get("annotations") or {}).get(NODE_ANNOTATION) == "fake"]
        found += [f"node {n}" for n in fake]
        found += [f"pod {ns}/{p}" for ns, p in self.pods_on(fake + self.nodes)]
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/kwok/kwok", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "leftovers"])
    parser.add_argument("--state-dir", default=os.environ.get("EVALRUNNER_CLUSTER_DIR")
                        or localcluster.DEFAULT_STATE_DIR, help="the tools/k8s cluster's state directory")
    parser.add_argument("--nodes", type=int, default=3, help="up: fake nodes to create (default 3)")
    parser.add_argument("--no-taint", action="store_true",
                        help="up: nodes without the kwok taint (any pod may land there)")
    parser.add_argument("--exit-after", type=float, default=2.0, metavar="S",
                        help=f"up: seconds a runner pod runs before its outcome (default 2; per pod: "
                             f"annotation {EXIT_AFTER_ANNOTATION})")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            kw = Kwok.attach(args.state_dir)
            if kw.alive():
                raise KwokError(f"kwok already runs for this cluster (pid {kw.pid}); `down` first")
            kw = Kwok(args.state_dir, exit_after=args.exit_after).start()
            names = kw.create_nodes(args.nodes, taint=not args.no_taint)
            took = kw.wait_nodes_ready(names)
            print(f"kwok: {len(names)} fake nodes Ready in {took:.1f}s (pid {kw.pid}, log {kw.log_path})",
                  file=sys.stderr)
        elif args.command == "down":
            kw = Kwok.attach(args.state_dir)
            kw.stop()
            print("kwok: stopped", file=sys.stderr)
        elif args.command == "status":
            kw = Kwok.attach(args.state_dir)
            print(json.dumps({"pid": kw.pid, "alive": kw.alive(), "nodes": kw.nodes,
                              "ready": kw.ready_nodes(kw.nodes) if kw.nodes else []}, indent=2))
            return 0 if kw.alive() else 1
        elif args.command == "leftovers":
            found = Kwok.attach(args.state_dir).leftovers()
            print("\n".join(found))
            return 1 if found else 0
    except (KwokError, localcluster.ClusterError) as e:
        print(f"kwok: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start and stop a local Kubernetes control plane on 127.0.0.1.

The binaries come from ``tools/k8s/build`` (pinned upstream sources built
with Go). ``up`` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the node agent (``nodeagent.py``) on free loopback
ports, with certificates and service-account keys generated at start, and
waits until the API server is ready and the node is schedulable. ``down``
stops everything it started.

Only the standard library and the ``openssl`` command are used here; the
node agent additionally needs the ``kubernetes`` Python client.

Command line: ``python localcluster.py up|down|status|node-pause|node-resume``
(``tools/k8s/cluster`` wraps this).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_STATE_DIR = "/tmp/evalrunner-cluster"
NODE_NAME = "evalrunner-node-0"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Controllers of kube-controller-manager we rely on. "*" enables every
# controller that is on by default, which includes all of these; naming them
# as well makes the controller manager refuse to start if one is unknown.
REQUIRED_CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "pod-garbage-collector-controller",
    "ttl-after-finished-controller",
    "node-lifecycle-controller",
)

# Order in which components start; `down` stops them in reverse order.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent")


class ClusterError(RuntimeError):
    pass


def read_versions() -> dict[str, str]:
    versions = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key] = value
    return versions


def cache_root() -> Path:
    return Path(os.environ.get("EVALRUNNER_CACHE") or Path.home() / ".cache" / "evalrunner")


def bin_dir() -> Path:
    if os.environ.get("EVALRUNNER_K8S_BIN"):
        return Path(os.environ["EVALRUNNER_K8S_BIN"])
    v = read_versions()
    return cache_root() / "k8s" / f"{v['K8S_VERSION']}-etcd{v['ETCD_VERSION']}" / "bin"


def check_binaries(bindir: Path | None = None) -> Path:
    """Return the bin dir, or raise with instructions when a binary is missing."""
    bindir = bindir or bin_dir()
    missing = [
        name
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
        if not os.access(bindir / name, os.X_OK)
    ]
    if missing:
        raise ClusterError(
            f"control-plane binaries missing in {bindir}: {', '.join(missing)}. "
            f"Build them first: {HERE / 'build'}"
        )
    return bindir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def generate_pki(pki: Path) -> None:
    """CA, API server serving cert, client certs and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=evalrunner-test-ca",
             "-days", "30", "-out", "ca.crt", cwd=pki)
    # Service-account token signing key (RS256).
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)

    def issue(name: str, subj: str, ext: str, ca: str = "ca") -> None:
        _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=pki)
        (pki / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext",
                 "-out", f"{name}.crt", cwd=pki)

    server_ext = (
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:" + SERVICE_IP + ",DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    )
    client_ext = (
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    )
    # Aggregation layer: a separate CA for the front-proxy (request-header) client.
    _openssl("genrsa", "-out", "front-proxy-ca.key", "2048", cwd=pki)
    _openssl("req", "-x509", "-new", "-key", "front-proxy-ca.key", "-subj", "/CN=evalrunner-front-proxy-ca",
             "-days", "30", "-out", "front-proxy-ca.crt", cwd=pki)
    issue("apiserver", "/CN=kube-apiserver", server_ext)
    issue("admin", "/O=system:masters/CN=evalrunner-admin", client_ext)
    issue("controller-manager", "/CN=system:kube-controller-manager", client_ext)
    issue("scheduler", "/CN=system:kube-scheduler", client_ext)
    issue("node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", client_ext)
    issue("front-proxy-client", "/CN=front-proxy-client", client_ext, ca="front-proxy-ca")
    for leftover in pki.glob("*.csr"):
        leftover.unlink()
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    # JSON is valid YAML; kubectl, client-go and the Python client all read it.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "evalrunner", "cluster": {
            "server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(pki / f"{user}.crt"),
            "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "evalrunner", "context": {"cluster": "evalrunner", "user": user}}],
        "current-context": "evalrunner",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


@dataclass
class State:
    state_dir: str
    bin_dir: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    node_name: str = NODE_NAME
    started_at: float = 0.0
    ready_seconds: float = 0.0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def kubeconfig(self) -> str:
        return str(Path(self.state_dir) / "kubeconfig")

    def save(self) -> None:
        path = Path(self.state_dir) / "cluster.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: str | Path) -> "State | None":
        path = Path(state_dir) / "cluster.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_matches(pid: int, needle: str) -> bool:
    """The pid is alive and its command line mentions `needle` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return needle in cmdline and _pid_alive(pid)


class Client:
    """Minimal HTTPS client for readiness checks (stdlib only)."""

    def __init__(self, server: str, pki: Path, user: str = "admin", verify: bool = True) -> None:
        self.server = server
        if verify:
            self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        else:
            # kube-controller-manager and kube-scheduler serve /healthz with a
            # self-signed certificate of their own (in --cert-dir).
            self.ctx = ssl._create_unverified_context()
        self.ctx.load_cert_chain(str(pki / f"{user}.crt"), str(pki / f"{user}.key"))

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.server + path, context=self.ctx, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)


def _wait(what: str, check, timeout: float, procs: dict[str, subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = _tail(logs / f"{name}.log")
                raise ClusterError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{tail}")
        if check():
            return
        time.sleep(0.2)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def agent_python() -> str:
    return os.environ.get("EVALRUNNER_PYTHON") or sys.executable


def up(state_dir: str | Path | None = None, *, timeout: float = 90.0, quiet: bool = False) -> State:
    """Start the control plane and node agent; return its state. Idempotent when healthy."""
    state_dir = Path(state_dir or os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    existing = State.load(state_dir)
    if existing is not None:
        if status(state_dir)["healthy"]:
            return existing
        down(state_dir, quiet=True)

    bindir = check_binaries()
    t0 = time.monotonic()
    if state_dir.exists():
        # Only ever wipe a directory that is empty or was made by `up`.
        if any(state_dir.iterdir()) and not (state_dir / "cluster.json").exists():
            raise ClusterError(f"{state_dir} exists and is not a cluster state directory")
        shutil.rmtree(state_dir)
    pki, logs = state_dir / "pki", state_dir / "logs"
    for d in (state_dir, logs, state_dir / "pods"):
        d.mkdir(parents=True, exist_ok=True)
    generate_pki(pki)

    st = State(state_dir=str(state_dir), bin_dir=str(bindir), started_at=time.time())
    for name in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler"):
        st.ports[name] = free_port()
    write_kubeconfig(state_dir / "kubeconfig", st.server, pki, "admin")
    for user in ("controller-manager", "scheduler", "node"):
        write_kubeconfig(state_dir / f"{user}.kubeconfig", st.server, pki, user)

    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        log = open(logs / f"{name}.log", "ab")
        # Own session: `up` may exit and leave them running; `down` signals them by pid.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=state_dir, start_new_session=True)
        log.close()
        procs[name] = proc
        st.pids[name] = proc.pid
        st.save()

    try:
        etcd_url = f"http://127.0.0.1:{st.ports['etcd']}"
        start("etcd", [
            str(bindir / "etcd"),
            "--name=evalrunner",
            f"--data-dir={state_dir / 'etcd-data'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{st.ports['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{st.ports['etcd_peer']}",
            f"--initial-cluster=evalrunner=http://127.0.0.1:{st.ports['etcd_peer']}",
            "--unsafe-no-fsync",  # throwaway test data; much faster on slow disks
            "--log-level=warn",
        ])

        def etcd_healthy() -> bool:
            try:
                with urllib.request.urlopen(etcd_url + "/health", timeout=2) as r:
                    return b'"health":"true"' in r.read()
            except (urllib.error.URLError, OSError):
                return False

        _wait("etcd /health", etcd_healthy, 30, procs, logs)

        start("kube-apiserver", [
            str(bindir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={st.ports['apiserver']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--api-audiences={SA_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The API server's own address is loopback, which an Endpoints
            # object may not contain; nothing in-cluster needs that Service.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ])
        admin = Client(st.server, pki)
        _wait("kube-apiserver /readyz", lambda: admin.get("/readyz")[0] == 200, 60, procs, logs)

        start("kube-controller-manager", [
            str(bindir / "kube-controller-manager"),
            f"--kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={state_dir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={st.ports['controller_manager']}",
            f"--cert-dir={pki}",
            "--leader-elect=false",
            "--controllers=" + ",".join(("*",) + REQUIRED_CONTROLLERS),
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            # Notice a lost node (agent paused or gone) in seconds, not minutes.
            "--node-monitor-period=2s",
            "--node-monitor-grace-period=20s",
            "--profiling=false",
            "--v=1",
        ])
        start("kube-scheduler", [
            str(bindir / "kube-scheduler"),
            f"--kubeconfig={state_dir / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={state_dir / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={state_dir / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={st.ports['scheduler']}",
            f"--cert-dir={pki}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ])
        start("node-agent", [
            agent_python(), str(HERE / "nodeagent.py"),
            f"--kubeconfig={state_dir / 'node.kubeconfig'}",
            f"--state-dir={state_dir}",
            f"--node-name={NODE_NAME}",
            f"--api-port={st.ports['apiserver']}",
        ])

        def node_schedulable() -> bool:
            code, body = admin.get(f"/api/v1/nodes/{NODE_NAME}")
            if code != 200:
                return False
            node = json.loads(body)
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in node.get("status", {}).get("conditions", []))
            return ready and not node.get("spec", {}).get("taints")

        def service_accounts_work() -> bool:
            code, body = admin.get("/api/v1/namespaces/default/serviceaccounts/default")
            return code == 200

        def components_healthy() -> bool:
            return all(
                Client(f"https://127.0.0.1:{st.ports[p]}", pki, verify=False).get("/healthz")[0] == 200
                for p in ("controller_manager", "scheduler")
            )

        remaining = max(10.0, timeout - (time.monotonic() - t0))
        _wait("controller-manager and scheduler /healthz", components_healthy, remaining, procs, logs)
        remaining = max(10.0, timeout - (time.monotonic() - t0))
        _wait(f"node {NODE_NAME} Ready without taints", node_schedulable, remaining, procs, logs)
        _wait("default ServiceAccount", service_accounts_work, 30, procs, logs)
    except BaseException:
        down(state_dir, quiet=True)
        raise

    st.ready_seconds = round(time.monotonic() - t0, 1)
    st.save()
    if not quiet:
        print(f"cluster: up in {st.ready_seconds}s; state in {state_dir}", file=sys.stderr)
    return st


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait for pid to exit, reaping it when it is our child (the pytest fixture case)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        except ChildProcessError:  # not our child: `cluster up` ran in another process
            if not _pid_alive(pid):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _kill_tree(pid: int) -> None:
    for sig_target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            sig_target()
        except (ProcessLookupError, PermissionError):
            pass


def pod_pids(state_dir: Path) -> list[int]:
    pids = []
    for pidfile in (state_dir / "pods").glob("*/*/pid"):
        try:
            pids.append(int(pidfile.read_text().strip()))
        except (OSError, ValueError):
            pass
    return pids


def down(state_dir: str | Path | None = None, *, quiet: bool = False, grace: float = 10.0) -> None:
    """Stop every process `up` started (and any pod process left by the agent)."""
    state_dir = Path(state_dir or os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    st = State.load(state_dir)
    if st is None:
        if not quiet:
            print(f"cluster: nothing recorded in {state_dir}", file=sys.stderr)
        return
    needles = {"node-agent": "nodeagent.py"}
    running = {
        name: pid for name, pid in st.pids.items()
        if _pid_matches(pid, needles.get(name, name))
    }
    # Reverse start order: the agent first (it kills its pods on SIGTERM), etcd last.
    for name in reversed(COMPONENTS):
        pid = running.get(name)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        if not _wait_exit(pid, grace):
            _kill_tree(pid)
            _wait_exit(pid, 5.0)
    # Pod processes run in their own process groups; the agent kills them, but
    # make sure nothing survives an agent that died uncleanly.
    for pid in pod_pids(state_dir):
        if _pid_alive(pid):
            _kill_tree(pid)
    cleanup_cgroups(state_dir)
    st.pids = {}
    st.save()
    if not quiet:
        print(f"cluster: stopped ({state_dir})", file=sys.stderr)


def cleanup_cgroups(state_dir: Path) -> None:
    marker = state_dir / "cgroup-root"
    if not marker.exists():
        return
    root = Path(marker.read_text().strip())
    if not root.is_dir():
        return
    for child in sorted(root.iterdir(), reverse=True):
        if child.is_dir():
            try:
                child.rmdir()
            except OSError:
                pass
    try:
        root.rmdir()
    except OSError:
        pass


def status(state_dir: str | Path | None = None) -> dict:
    state_dir = Path(state_dir or os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    st = State.load(state_dir)
    result: dict = {"state_dir": str(state_dir), "healthy": False, "components": {}}
    if st is None:
        return result
    needles = {"node-agent": "nodeagent.py"}
    for name in COMPONENTS:
        pid = st.pids.get(name)
        result["components"][name] = bool(pid and _pid_matches(pid, needles.get(name, name)))
    if all(result["components"].values()):
        code, _ = Client(st.server, Path(state_dir) / "pki").get("/readyz")
        result["healthy"] = code == 200
    result["kubeconfig"] = st.kubeconfig
    result["server"] = st.server if st.ports else None
    return result


def set_node_paused(paused: bool, state_dir: str | Path | None = None) -> None:
    """Stop (or resume) the node agent's heartbeats; the pods keep running."""
    state_dir = Path(state_dir or os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    flag = state_dir / "node-paused"
    if paused:
        flag.touch()
    else:
        flag.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/k8s/cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "node-pause", "node-resume"])
    parser.add_argument("--state-dir", default=os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            st = up(args.state_dir)
            print(f"export KUBECONFIG={st.kubeconfig}")
        elif args.command == "down":
            down(args.state_dir)
        elif args.command == "status":
            s = status(args.state_dir)
            print(json.dumps(s, indent=2))
            return 0 if s["healthy"] else 1
        elif args.command == "node-pause":
            set_node_paused(True, args.state_dir)
        elif args.command == "node-resume":
            set_node_paused(False, args.state_dir)
    except ClusterError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

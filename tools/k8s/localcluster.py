"""Start and stop a local Kubernetes cluster on this machine.

The binaries come from ``tools/k8s/build`` (pinned upstream sources built
with Go). ``up`` starts etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, with certificates and service-account keys generated at
start, and one node, then waits until the API server is ready and the node
is schedulable. ``down`` stops everything it started. The node is either

- ``agent`` (the default): the node agent (``nodeagent.py``), which runs each
  pod's command as a local process; everything listens on 127.0.0.1; or
- ``real``: containerd, runc and the CNI bridge, the kubelet, kube-proxy and
  CoreDNS (built by ``tools/k8s/build-node``), so pods run in containers from
  images imported into the node. The API server then listens on the pods'
  bridge gateway, a host-private address pods can reach. Needs root. What it
  changes on the host, and how ``down`` undoes it, is in ``nodehost.py``.

Functions for tests, besides ``up``/``down``/``status``: ``import_image``,
``container_pid``/``kill_container``, ``stop_kubelet``/``start_kubelet``,
``wait_for_service_endpoints`` and ``leftovers`` (real node),
``set_node_paused`` (either node).

Only the standard library and the ``openssl`` command are used here; the
node agent additionally needs the ``kubernetes`` Python client.

Command line: ``python localcluster.py up [--node real]|down|status|node-pause|node-resume|leftovers``
(``tools/k8s/cluster`` wraps this).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nodehost  # tools/k8s/nodehost.py, beside this file

DEFAULT_STATE_DIR = "/tmp/evalrunner-cluster"
NODE_NAME = "evalrunner-node-0"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
NODE_MODES = ("agent", "real")

# The real node.
BRIDGE = "evalrunner0"          # the CNI bridge; its gateway is the node's (and API server's) address
CNI_NETWORK = "evalrunner"
CLUSTER_DOMAIN = "cluster.local"
DNS_SERVICE_IP = "10.0.0.10"    # the kube-dns Service; CoreDNS itself runs on the host
NODE_LABEL = "evalrunner/real-node"
CNI_BIN_DIR = "/usr/lib/cni"    # Debian's containernetworking-plugins
K8S_NAMESPACE = "k8s.io"        # containerd namespace of the CRI plugin
KUBELET_CLIENT_USER = "evalrunner-apiserver-kubelet-client"
COREDNS_USER = "evalrunner-coredns"

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
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_COMPONENTS = {"agent": ("node-agent",), "real": ("containerd", "kubelet", "kube-proxy", "coredns")}


class ClusterError(RuntimeError):
    pass


def read_versions(path: Path | None = None) -> dict[str, str]:
    """KEY=VALUE lines of a pinned-versions file (this directory's by default; tools/kwok has its own)."""
    versions = {}
    for line in (path or HERE / "versions.env").read_text().splitlines():
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


def node_dir() -> Path:
    """tools/k8s/build-node's output: bin/ and images/."""
    v = read_versions()
    return (cache_root() / "k8s"
            / f"node-{v['K8S_VERSION']}-containerd{v['CONTAINERD_VERSION']}-coredns{v['COREDNS_VERSION']}")


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


NODE_BINARIES = ("kubelet", "kube-proxy", "containerd", "ctr", "containerd-shim-runc-v2", "coredns")


def check_node_binaries() -> Path:
    """Return the real node's directory, or raise with instructions."""
    node = node_dir()
    missing = [name for name in NODE_BINARIES if not os.access(node / "bin" / name, os.X_OK)]
    missing += [name for name in ("pause.tar",) if not (node / "images" / name).exists()]
    if missing:
        raise ClusterError(f"real-node files missing in {node}: {', '.join(missing)}. "
                           f"Build them first (as root): {HERE / 'build'}")
    if os.geteuid() != 0:
        raise ClusterError("the real node needs root (containers, iptables, cgroups, mounts)")
    tools = ["runc", "iptables", "ip6tables", "iptables-restore", "conntrack", "ip", "umount"]
    missing = [t for t in tools if not nodehost.have(t)]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in ("bridge", "host-local")
                if not os.access(Path(CNI_BIN_DIR) / p, os.X_OK)]
    if missing:
        raise ClusterError(f"missing on this host: {', '.join(missing)}. Install them: {HERE / 'node-packages'}")
    return node


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _issue(pki: Path, name: str, subj: str, ext: str, ca: str = "ca") -> None:
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=pki)
    (pki / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=pki)
    (pki / f"{name}.csr").unlink()
    (pki / f"{name}.key").chmod(0o600)


def _server_ext(sans: str) -> str:
    return ("basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={sans}\n")


CLIENT_EXT = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)


def generate_pki(pki: Path, api_host: str = "127.0.0.1") -> None:
    """CA, API server serving cert, client certs and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=evalrunner-test-ca",
             "-days", "30", "-out", "ca.crt", cwd=pki)
    # Service-account token signing key (RS256).
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)

    api_ips = dict.fromkeys(["127.0.0.1", api_host, SERVICE_IP])
    server_ext = _server_ext(
        ",".join(f"IP:{ip}" for ip in api_ips) + ",DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
    # Aggregation layer: a separate CA for the front-proxy (request-header) client.
    _openssl("genrsa", "-out", "front-proxy-ca.key", "2048", cwd=pki)
    _openssl("req", "-x509", "-new", "-key", "front-proxy-ca.key", "-subj", "/CN=evalrunner-front-proxy-ca",
             "-days", "30", "-out", "front-proxy-ca.crt", cwd=pki)
    _issue(pki, "apiserver", "/CN=kube-apiserver", server_ext)
    _issue(pki, "admin", "/O=system:masters/CN=evalrunner-admin", CLIENT_EXT)
    _issue(pki, "controller-manager", "/CN=system:kube-controller-manager", CLIENT_EXT)
    _issue(pki, "scheduler", "/CN=system:kube-scheduler", CLIENT_EXT)
    _issue(pki, "node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", CLIENT_EXT)
    _issue(pki, "front-proxy-client", "/CN=front-proxy-client", CLIENT_EXT, ca="front-proxy-ca")
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def generate_node_pki(pki: Path, node_ip: str) -> None:
    """The real node's certificates, signed by the cluster CA: the kubelet's
    serving certificate (so the API server verifies it), the API server's
    client certificate for the kubelet API, and kube-proxy's and CoreDNS's
    client certificates. The kubelet's client certificate is `node`."""
    _issue(pki, "kubelet-serving", f"/O=system:nodes/CN=system:node:{NODE_NAME}",
           _server_ext(f"IP:{node_ip},DNS:{NODE_NAME}"))
    _issue(pki, "apiserver-kubelet-client", f"/CN={KUBELET_CLIENT_USER}", CLIENT_EXT)
    _issue(pki, "kube-proxy", "/CN=system:kube-proxy", CLIENT_EXT)  # bound to system:node-proxier by default
    _issue(pki, "coredns", f"/CN={COREDNS_USER}", CLIENT_EXT)


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
    node: str = "agent"              # "agent" or "real"
    api_host: str = "127.0.0.1"      # real node: the bridge gateway
    argv: dict[str, list[str]] = field(default_factory=dict)   # to restart the kubelet
    # Real node: the host before `up` changed it (nodehost.snapshot()), and
    # what `up` made: bridge, pod subnet, gateway, node directory.
    host: dict = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://{self.api_host}:{self.ports['apiserver']}"

    @property
    def components(self) -> tuple[str, ...]:
        return CONTROL_PLANE + NODE_COMPONENTS[self.node]

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
        return self.request("GET", path, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def create(self, collection: str, obj: dict, timeout: float = 10.0) -> None:
        """POST obj; an object that already exists is fine. Retries while the
        API server is still creating its system namespaces."""
        deadline = time.monotonic() + timeout
        while True:
            code, body = self.request("POST", collection, obj)
            if code in (201, 409):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"POST {collection} ({obj['kind']} {obj['metadata']['name']}): {code} {body[:300]}")
            time.sleep(0.2)


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


def _state_path(state_dir: str | Path | None) -> Path:
    return Path(state_dir or os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)


def _spawn(st: State, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    state_dir = Path(st.state_dir)
    log = open(state_dir / "logs" / f"{name}.log", "ab")
    # Own session: `up` may exit and leave them running; `down` signals them by pid.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=state_dir, start_new_session=True, env=env)
    log.close()
    st.pids[name] = proc.pid
    st.argv[name] = argv
    st.save()
    return proc


def up(state_dir: str | Path | None = None, *, node: str = "agent", timeout: float = 90.0,
       quiet: bool = False) -> State:
    """Start the control plane and a node, `node="agent"` (the node agent) or
    `node="real"` (kubelet, containerd...; needs root and tools/k8s/build
    run as root); return its state. Idempotent when healthy with the same node."""
    if node not in NODE_MODES:
        raise ClusterError(f"unknown node {node!r}; one of {', '.join(NODE_MODES)}")
    state_dir = _state_path(state_dir)
    existing = State.load(state_dir)
    if existing is not None:
        if existing.node == node and status(state_dir)["healthy"]:
            return existing
        down(state_dir, quiet=True)

    bindir = check_binaries()
    nodedir = check_node_binaries() if node == "real" else None
    if node == "real":
        busy = nodehost.busy_reasons(BRIDGE)
        if busy:
            raise ClusterError("this host already runs a real node, or kept parts of one, or has a kubelet "
                               "or kube-proxy of its own: " + "; ".join(busy)
                               + ". Stop it with `tools/k8s/cluster down --state-dir DIR`.")
    t0 = time.monotonic()
    if state_dir.exists():
        # Only ever wipe a directory that is empty or was made by `up`.
        if any(state_dir.iterdir()) and not (state_dir / "cluster.json").exists():
            raise ClusterError(f"{state_dir} exists and is not a cluster state directory")
        if nodehost.mounts_under([str(state_dir)]):
            raise ClusterError(f"{state_dir} still has mounts: {', '.join(nodehost.mounts_under([str(state_dir)]))}")
        shutil.rmtree(state_dir)
    pki, logs = state_dir / "pki", state_dir / "logs"
    for d in (state_dir, logs, state_dir / "pods"):
        d.mkdir(parents=True, exist_ok=True)

    st = State(state_dir=str(state_dir), bin_dir=str(bindir), started_at=time.time(), node=node)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        procs[name] = _spawn(st, name, argv, env)

    try:
        if node == "real":
            _prepare_host(st, nodedir)
        generate_pki(pki, st.api_host)
        if node == "real":
            generate_node_pki(pki, st.api_host)
        st.ports["apiserver"] = free_port(st.api_host)
        for name in ("etcd", "etcd_peer", "controller_manager", "scheduler"):
            st.ports[name] = free_port()
        st.save()
        write_kubeconfig(state_dir / "kubeconfig", st.server, pki, "admin")
        users = ("controller-manager", "scheduler", "node") + (("kube-proxy", "coredns") if node == "real" else ())
        for user in users:
            write_kubeconfig(state_dir / f"{user}.kubeconfig", st.server, pki, user)

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

        if node == "agent":
            node_flags = [
                "--advertise-address=127.0.0.1",
                # The API server's own address is loopback, which an Endpoints
                # object may not contain; nothing in-cluster needs that Service.
                "--endpoint-reconciler-type=none",
            ]
        else:
            node_flags = [
                # The bridge gateway: pods reach it through the `kubernetes`
                # Service, whose endpoint the (default) lease reconciler keeps.
                f"--advertise-address={st.api_host}",
                # kubectl logs/exec/port-forward: the API server calls the
                # kubelet at the node's InternalIP (its name would resolve to
                # loopback, which the node proxy refuses), with a client
                # certificate, and verifies the kubelet's serving certificate.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            ]
        start("kube-apiserver", [
            str(bindir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={st.api_host}",
            *node_flags,
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
        if node == "agent":
            start("node-agent", [
                agent_python(), str(HERE / "nodeagent.py"),
                f"--kubeconfig={state_dir / 'node.kubeconfig'}",
                f"--state-dir={state_dir}",
                f"--node-name={NODE_NAME}",
                f"--api-port={st.ports['apiserver']}",
            ])
        else:
            _start_real_node(st, nodedir, admin, start, procs)

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
        if node == "real":
            # Through kube-proxy's rules for the kube-dns Service, to CoreDNS
            # on the host, which answers from the API server.
            remaining = max(10.0, timeout - (time.monotonic() - t0))
            _wait("cluster DNS to answer kubernetes.default", _cluster_dns_answers, remaining, procs, logs)
    except BaseException:
        down(state_dir, quiet=True)
        raise

    st.ready_seconds = round(time.monotonic() - t0, 1)
    st.save()
    if not quiet:
        print(f"cluster: up in {st.ready_seconds}s ({node} node); state in {state_dir}", file=sys.stderr)
    return st


# --- the real node ----------------------------------------------------------

def _prepare_host(st: State, nodedir: Path) -> None:
    """Record the host, then create the pods' bridge. Saved before each change,
    so that `down` can undo whatever `up` got to."""
    state_dir = Path(st.state_dir)
    # Unix sockets live in the state directory: their paths are limited to 107 bytes.
    if len(str(state_dir / "containerd" / "containerd.sock.ttrpc")) > 100:
        raise ClusterError(f"state directory path too long for containerd's sockets: {state_dir}")
    subnet = nodehost.pick_pod_subnet(avoid=[SERVICE_CIDR])
    gateway = ipaddress.ip_interface(f"{subnet[1]}/{subnet.prefixlen}")
    st.host = {
        "before": nodehost.snapshot(),
        "node_dir": str(nodedir),
        "bridge": BRIDGE,
        "pod_subnet": str(subnet),
        "gateway": str(gateway.ip),
    }
    st.save()
    nodehost.create_bridge(BRIDGE, gateway, owner=str(state_dir))
    st.api_host = str(gateway.ip)
    st.save()
    # A reply from a Service's pod to a pod on the same bridge is switched,
    # not routed: it must pass iptables to be un-NATed.
    if st.host["before"]["sysctls"].get("net.bridge.bridge-nf-call-iptables") == "0":
        nodehost.write_sysctl("net.bridge.bridge-nf-call-iptables", "1")


def _node_env(st: State) -> dict[str, str]:
    # containerd finds its shim on PATH; kube-proxy needs iptables and
    # conntrack, the kubelet mount and umount.
    return {**os.environ, "PATH": f"{st.host['node_dir']}/bin:{nodehost.HOST_PATH}"}


def _containerd_socket(st: State) -> Path:
    return Path(st.state_dir) / "containerd" / "containerd.sock"


def _ctr(st: State, *args: str, timeout: float = 60.0) -> str:
    argv = [f"{st.host['node_dir']}/bin/ctr", "--address", str(_containerd_socket(st)),
            "--namespace", K8S_NAMESPACE, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_node_env(st), check=False)
    if proc.returncode != 0:
        raise ClusterError(f"ctr {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _containerd_config(st: State) -> str:
    d = Path(st.state_dir) / "containerd"
    pause = read_versions()["PAUSE_IMAGE"]
    runc = shutil.which("runc", path=nodehost.HOST_PATH) or "runc"
    # Everything containerd writes goes under the state directory, except the
    # shims' sockets (always /run/containerd/s) and libcni's result cache
    # (/var/lib/cni). NRI and CDI are off: they would create /var/run/nri and
    # watch /etc/cdi.
    return f"""\
version = 3
root = "{d}/root"
state = "{d}/state"
imports = []

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  # runc writes the container's oom_score_adj, which fails without
  # CAP_SYS_RESOURCE when it is lower than containerd's own (some VMs drop
  # that capability from every bounding set); clamp it to containerd's.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{Path(st.state_dir) / 'cni' / 'net.d'}"
    # Bring up the pods' lo itself: the loopback plugin would leave a result
    # per pod in libcni's cache (/var/lib/cni/results), named by no network of ours.
    use_internal_loopback = true
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "{runc}"
      Root = "{d}/runc"
      SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def _cluster_objects(st: State) -> list[tuple[str, dict]]:
    """RBAC for the API server's kubelet client and for CoreDNS, and the
    kube-dns Service, selectorless, with an EndpointSlice that points at
    CoreDNS on the host."""
    gateway = st.host["gateway"]
    dns_ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    return [
        (f"{rbac}/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "evalrunner:apiserver-kubelet-client"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBELET_CLIENT_USER}],
        }),
        (f"{rbac}/clusterroles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "evalrunner:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        }),
        (f"{rbac}/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "evalrunner:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "evalrunner:coredns"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}],
        }),
        ("/api/v1/namespaces/kube-system/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": DNS_SERVICE_IP,
                     "ports": [{**p, "targetPort": 53} for p in dns_ports]},
        }),
        ("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns",
                                    "endpointslice.kubernetes.io/managed-by": "evalrunner"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [gateway], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
            "ports": dns_ports,
        }),
    ]


def _start_real_node(st: State, nodedir: Path, admin: Client, start, procs) -> None:
    state_dir = Path(st.state_dir)
    pki, logs, bindir = state_dir / "pki", state_dir / "logs", nodedir / "bin"
    env = _node_env(st)
    gateway = st.host["gateway"]
    for port in ("kubelet", "kubelet_healthz", "kube_proxy_healthz", "kube_proxy_metrics",
                 "coredns_health", "coredns_ready"):
        st.ports[port] = free_port()
    st.save()

    for collection, obj in _cluster_objects(st):
        admin.create(collection, obj)

    # The pods' network: the bridge made before the API server, host-local
    # addresses from its /24, no masquerading (nothing leaves this host).
    _write_json(state_dir / "cni" / "net.d" / "10-evalrunner.conflist", {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,  # a pod reaching itself through its Service
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": st.host["pod_subnet"], "gateway": gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(state_dir / "cni" / "networks"),
            },
        }],
    })
    config = state_dir / "containerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(_containerd_config(st))
    start("containerd", [str(bindir / "containerd"), "--config", str(config)], env)

    def containerd_serves() -> bool:
        try:
            _ctr(st, "version", timeout=5)
            return True
        except (ClusterError, subprocess.TimeoutExpired):
            return False

    _wait("containerd", containerd_serves, 30, procs, logs)
    import_image(st.state_dir, nodedir / "images" / "pause.tar")

    kubelet_dir = state_dir / "kubelet"
    kubelet_config = _write_json(state_dir / "kubelet-config.json", {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": gateway,
        "port": st.ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": st.ports["kubelet_healthz"],
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{_containerd_socket(st)}",
        "cgroupDriver": "cgroupfs",  # no systemd here; cgroup v1 is accepted (failCgroupV1 is false)
        "failSwapOn": False,
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [DNS_SERVICE_IP],
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(state_dir / "pod-logs"),
        # Nothing can be pulled (no registry): never collect an imported image.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A VM with a nearly full disk must not evict the tests' pods.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                         "imagefs.available": "1%", "imagefs.inodesFree": "1%"},
        "serializeImagePulls": False,
        "registerNode": True,
        "maxPods": 110,
        "nodeStatusUpdateFrequency": "5s",
    })
    start("kubelet", [
        str(bindir / "kubelet"),
        f"--config={kubelet_config}",
        f"--kubeconfig={state_dir / 'node.kubeconfig'}",
        f"--root-dir={kubelet_dir}",
        f"--cert-dir={kubelet_dir / 'pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={gateway}",
        f"--node-labels={NODE_LABEL}=true",
        "--v=1",
    ], env)

    proxy_config = _write_json(state_dir / "kube-proxy-config.json", {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(state_dir / "kube-proxy.kubeconfig")},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "bindAddress": gateway,  # also the node IP kube-proxy uses
        "clusterCIDR": st.host["pod_subnet"],
        "nodePortAddresses": [f"{gateway}/32"],
        "healthzBindAddress": f"127.0.0.1:{st.ports['kube_proxy_healthz']}",
        "metricsBindAddress": f"127.0.0.1:{st.ports['kube_proxy_metrics']}",
        # Leave the host's conntrack table size and timeouts alone, and do not
        # set route_localnet (which localhost NodePorts need).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                      "udpTimeout": "0s", "udpStreamTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
    })
    start("kube-proxy", [str(bindir / "kube-proxy"), f"--config={proxy_config}", "--v=1"], env)

    corefile = state_dir / "Corefile"
    corefile.write_text(f"""\
.:53 {{
    bind {gateway}
    errors
    health 127.0.0.1:{st.ports['coredns_health']}
    ready 127.0.0.1:{st.ports['coredns_ready']}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {state_dir / 'coredns.kubeconfig'} evalrunner
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    forward . /etc/resolv.conf
    cache 5
}}
""")
    start("coredns", [str(bindir / "coredns"), "-conf", str(corefile)], env)


def _cluster_dns_answers() -> bool:
    try:
        return nodehost.dns_query(DNS_SERVICE_IP, f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
                                  timeout=1.0) == [SERVICE_IP]
    except OSError:
        return False


def _real_state(state_dir: str | Path | None) -> State:
    st = State.load(_state_path(state_dir))
    if st is None or st.node != "real":
        raise ClusterError(f"no real node recorded in {_state_path(state_dir)}")
    return st


def import_image(state_dir: str | Path | None, archive: str | Path) -> list[str]:
    """Import an image archive (docker-archive or OCI, e.g. from `buildah push`
    or `podman save`) into the real node's containerd, where the kubelet finds
    it: a pod using one of its tags with imagePullPolicy IfNotPresent or Never
    runs it. Returns the archive's tags (docker-archive only)."""
    st = _real_state(state_dir)
    _ctr(st, "images", "import", str(archive), timeout=300)
    try:
        with tarfile.open(archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        return [tag for image in manifest for tag in image.get("RepoTags") or []]
    except (KeyError, tarfile.TarError, OSError, ValueError):
        return []


def container_pid(state_dir: str | Path | None, container_id: str) -> int:
    """The host pid of a container's main process on the real node. The id is
    a pod status's containerID, with or without its `containerd://` prefix."""
    st = _real_state(state_dir)
    container_id = container_id.removeprefix("containerd://")
    pidfile = (Path(st.state_dir) / "containerd" / "state" / "io.containerd.runtime.v2.task"
               / K8S_NAMESPACE / container_id / "init.pid")
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        raise ClusterError(f"no running container {container_id} on this node") from None


def kill_container(state_dir: str | Path | None, container_id: str, sig: int = signal.SIGKILL) -> None:
    """Signal a container's main process from the host, as a crash or the
    kernel would: the kubelet sees it exit (137 after SIGKILL) and restarts it
    as the pod's restartPolicy says."""
    os.kill(container_pid(state_dir, container_id), sig)


def stop_kubelet(state_dir: str | Path | None = None) -> None:
    """Stop the real node's kubelet (SIGTERM). Its containers keep running;
    the node's heartbeats stop, so it goes NotReady (Unknown) after about 20 s
    (--node-monitor-grace-period) and is tainted unreachable."""
    st = _real_state(state_dir)
    pid = st.pids.get("kubelet")
    if pid and _pid_matches(pid, "kubelet"):
        os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, 10.0):
            _kill_tree(pid)
            _wait_exit(pid, 5.0)


def start_kubelet(state_dir: str | Path | None = None, *, timeout: float = 60.0) -> None:
    """Start the kubelet again, as `up` did, and wait until the node is Ready."""
    st = _real_state(state_dir)
    pid = st.pids.get("kubelet")
    if not (pid and _pid_matches(pid, "kubelet")):
        _spawn(st, "kubelet", st.argv["kubelet"], _node_env(st))
    admin = Client(st.server, Path(st.state_dir) / "pki")

    def ready() -> bool:
        code, body = admin.get(f"/api/v1/nodes/{NODE_NAME}")
        return code == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                   for c in json.loads(body).get("status", {}).get("conditions", []))

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise ClusterError(f"node {NODE_NAME} not Ready {timeout:.0f}s after the kubelet started")
        time.sleep(0.5)


def wait_for_service_endpoints(state_dir: str | Path | None, namespace: str, service: str, *,
                               timeout: float = 60.0) -> list[str]:
    """Wait until the Service has ready endpoints and kube-proxy has programmed
    every one of them (its iptables rules name them), so that a first request
    is not refused. Returns the endpoints as 'ip:port'."""
    st = _real_state(state_dir)
    admin = Client(st.server, Path(st.state_dir) / "pki")
    selector = urllib.parse.quote(f"kubernetes.io/service-name={service}")
    deadline = time.monotonic() + timeout
    endpoints: list[str] = []
    while time.monotonic() < deadline:
        code, body = admin.get(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
                               f"?labelSelector={selector}")
        endpoints = []
        if code == 200:
            for eps in json.loads(body)["items"]:
                for ep in eps.get("endpoints") or []:
                    if ep.get("conditions", {}).get("ready"):
                        endpoints += [f"{a}:{p['port']}" for a in ep["addresses"] for p in eps.get("ports") or []]
        if endpoints:
            rules = [line for line in nodehost.run(["iptables-save", "-t", "nat"]).splitlines()
                     if f"{namespace}/{service}" in line]
            if all(any(f"-> {e}" in line for line in rules) for e in endpoints):
                return sorted(endpoints)
        time.sleep(0.2)
    raise ClusterError(f"service {namespace}/{service}: endpoints {endpoints or 'none ready'} "
                       f"not programmed by kube-proxy after {timeout:.0f}s")


# --- stopping ----------------------------------------------------------------

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


NEEDLES = {"node-agent": "nodeagent.py"}  # what a component's command line contains


def down(state_dir: str | Path | None = None, *, quiet: bool = False, grace: float = 10.0) -> None:
    """Stop every process `up` started (and any pod process left by the agent);
    for a real node, also remove what it changed on the host (see nodehost)."""
    state_dir = _state_path(state_dir)
    st = State.load(state_dir)
    if st is None:
        if not quiet:
            print(f"cluster: nothing recorded in {state_dir}", file=sys.stderr)
        return
    t0 = time.monotonic()
    running = {
        name: pid for name, pid in st.pids.items()
        if _pid_matches(pid, NEEDLES.get(name, name))
    }
    # Reverse start order: the node first (the agent kills its pods on
    # SIGTERM; a real node's containers are killed once the kubelet, which
    # would restart them, is gone), etcd last.
    for name in reversed(st.components):
        if name == "containerd":
            nodehost.kill_kubepods_processes()
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
    if st.node == "real" and st.host:
        _clean_host(st)
    st.pids = {}
    st.save()
    if not quiet:
        print(f"cluster: stopped in {time.monotonic() - t0:.1f}s ({state_dir})", file=sys.stderr)


def _node_processes(st: State) -> dict[int, str]:
    return nodehost.processes_of([f"{st.host['node_dir']}/bin/{b}" for b in NODE_BINARIES], st.state_dir)


SHIM_SOCKET_DIR = "/run/containerd/s/"  # containerd's default state dir, whatever its configuration says


def _shim_sockets(st: State) -> list[str]:
    """The sockets of our shims (a shim removes its own when containerd
    shuts it down, not when it is killed): those of the live shims, those
    recorded by the tasks containerd still had (each bootstrap.json), and
    those an earlier `down` found."""
    sockets = list(st.host.get("shim_sockets", []))
    for pid, name in _node_processes(st).items():
        if name == "containerd-shim-runc-v2":
            sockets += [p for p in nodehost.unix_socket_paths(pid) if p.startswith(SHIM_SOCKET_DIR)]
    tasks = Path(st.state_dir) / "containerd" / "state" / "io.containerd.runtime.v2.task"
    for bootstrap in tasks.glob("*/*/bootstrap.json"):
        try:
            address = json.loads(bootstrap.read_text())["address"]
        except (OSError, ValueError, KeyError):
            continue
        if address.startswith("unix://"):
            sockets.append(address[len("unix://"):])
    return list(dict.fromkeys(sockets))


def _fixed_entries(st: State) -> list[str]:
    return nodehost.our_fixed_entries(st.state_dir, CNI_NETWORK, _shim_sockets(st))


def _clean_host(st: State) -> None:
    """Undo the real node's changes to the host, from what `up` recorded. Each
    step is idempotent and runs whatever the previous ones found."""
    before = st.host["before"]
    # Found before the shims go; kept for `leftovers` and a later `down`.
    st.host["shim_sockets"] = _shim_sockets(st)
    st.save()
    # The shims outlive containerd by design; any other process of the node's
    # binaries for this state directory (a ctr, say) goes too.
    nodehost.kill_kubepods_processes()
    for pid in _node_processes(st):
        _kill_tree(pid)
    nodehost.unmount_all([st.state_dir])
    nodehost.remove_kubepods_cgroups()
    nodehost.remove_kube_chains()
    nodehost.remove_created_nft_tables(before["nft_tables"])
    if "pod_subnet" in st.host:
        for flag in ("-s", "-d"):  # connections of pods, forgotten now rather than at their timeout
            for net in (st.host["pod_subnet"], SERVICE_CIDR):
                nodehost.execute(["conntrack", "-D", flag, net])
    if nodehost.link_alias(st.host["bridge"]) == st.state_dir:
        nodehost.delete_link(st.host["bridge"])
    nodehost.restore_sysctls(before["sysctls"])
    nodehost.remove_fixed_paths(before["fixed_paths"], _fixed_entries(st))


def leftovers(state_dir: str | Path | None = None) -> list[str]:
    """What `down` should have removed and did not, one description each:
    processes (components, containerd's shims, containers), mounts under the
    state directory, the bridge, KUBE-* iptables chains and the nftables
    tables they came in, kubepods cgroups, paths outside the state directory
    and sysctls not back to the value `up` found. Empty after a clean `down`."""
    state_dir = _state_path(state_dir)
    st = State.load(state_dir)
    found = []
    if st is not None:
        found += [f"process {name} (pid {pid})" for name, pid in st.pids.items()
                  if _pid_matches(pid, NEEDLES.get(name, name))]
        if st.node == "real" and st.host:
            before = st.host["before"]
            found += [f"process {name} (pid {pid})" for pid, name in _node_processes(st).items()]
            fixed = [p for p, existed in before["fixed_paths"].items() if not existed]
            found += [f"mount {m}" for m in nodehost.mounts_under([st.state_dir, *fixed])]
            if nodehost.link_exists(st.host["bridge"]):
                found.append(f"interface {st.host['bridge']}")
            found += [f"nftables table {t}" for t in nodehost.created_nft_tables(before["nft_tables"])]
            found += nodehost.fixed_path_leftovers(before["fixed_paths"], _fixed_entries(st))
            found += [f"sysctl {name} = {now} (was {was})"
                      for name, (was, now) in nodehost.changed_sysctls(before["sysctls"]).items()]
    found += [f"process {pid} in a {nodehost.KUBEPODS} cgroup" for pid in sorted(nodehost.kubepods_processes())]
    found += [f"cgroup {p}" for p in nodehost.kubepods_cgroups()]
    found += [f"chain {c}" for c in nodehost.kube_chains()]
    return found


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
    state_dir = _state_path(state_dir)
    st = State.load(state_dir)
    result: dict = {"state_dir": str(state_dir), "healthy": False, "components": {}}
    if st is None:
        return result
    result["node"] = st.node
    for name in st.components:
        pid = st.pids.get(name)
        result["components"][name] = bool(pid and _pid_matches(pid, NEEDLES.get(name, name)))
    if all(result["components"].values()):
        code, _ = Client(st.server, Path(state_dir) / "pki").get("/readyz")
        result["healthy"] = code == 200
    result["kubeconfig"] = st.kubeconfig
    result["server"] = st.server if st.ports else None
    return result


def set_node_paused(paused: bool, state_dir: str | Path | None = None) -> None:
    """Stop (or resume) the node's heartbeats; the pods keep running. The node
    agent stops heartbeating; a real node's kubelet is stopped (restarted)."""
    state_dir = _state_path(state_dir)
    st = State.load(state_dir)
    if st is not None and st.node == "real":
        stop_kubelet(state_dir) if paused else start_kubelet(state_dir)
        return
    flag = state_dir / "node-paused"
    if paused:
        flag.touch()
    else:
        flag.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/k8s/cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "node-pause", "node-resume", "leftovers",
                                            "import-image"])
    parser.add_argument("archive", nargs="?", help="import-image: an image archive (docker or OCI) for the real node")
    parser.add_argument("--state-dir", default=os.environ.get("EVALRUNNER_CLUSTER_DIR") or DEFAULT_STATE_DIR)
    parser.add_argument("--node", choices=NODE_MODES, default="agent",
                        help="up: the node agent (default) or a real node (root; built by tools/k8s/build as root)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            st = up(args.state_dir, node=args.node)
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
        elif args.command == "import-image":
            if not args.archive:
                parser.error("import-image needs the archive's path")
            print("\n".join(import_image(args.state_dir, args.archive)))
        elif args.command == "leftovers":
            found = leftovers(args.state_dir)
            print("\n".join(found))
            return 1 if found else 0
    except ClusterError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

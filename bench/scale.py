"""The operator at scale: many EvalRuns x 5 suites on kwok's simulated nodes.

Starts the test control plane (tools/k8s), kwok (tools/kwok) with fake nodes
(the node agent's node is cordoned, so every runner pod lands on a fake one),
the EvalRun CRD and the real controller as its own process (`evalrunner
controller`, default intervals, its own client certificate), then a load
generator that plays the runners: for each runner pod that kwok reports
Running it reads what a runner gets (run id from the pod's annotation, store
URL from its command, and a token the API server issues bound to the pod, for
the audience of the pod's projected token volume, as a kubelet would) and
talks to the controller's store API as the runner would (POST /runs, case
batches, heartbeats, finish), through aiohttp with the store's own wire
encoders. Then it annotates the pod and kwok ends it by the outcome its
suite is named after (tools/kwok/stages.yaml):

  succeeded  the runner finishes its run, then exits 0
  failed     the runner dies (exit 1) half-way, its run still open
  oomkilled  OOMKilled (exit 137) half-way
  evicted    the pod is evicted (phase Failed, reason Evicted) half-way
  deleted    the pod is deleted half-way

Measured:
  controller    RSS and CPU over time, sampled from /proc every second
  API requests  every request the controller makes, counted from the API
                server's audit log (the API server is restarted once before
                the controller starts, with an audit policy that records only
                the controller's user, at Metadata level, stage
                RequestReceived: one line per request, watches included)
  latency       pod death -> row terminal, for the four dying outcomes: from
                the moment this process's pod watch first sees the pod end (or
                start being deleted) to the row's completed_at; also from the
                pod's own finishedAt / deletionTimestamp (1 s resolution)
  store         cases/s ingested and request latency p50/p99, as the load
                generator saw them
  integrity     after the controller is stopped, from its DuckDB file: run rows
                lost (a pod whose run id has no row) or left running, case rows
                acknowledged but missing, EvalRuns not terminal
  --kill-at F   optionally SIGKILL the controller once a fraction F of the
                pods has ended, start it again at once, and time until no row
                of an ended pod is running any more

What the load generator does not do as a runner would: it takes the case
names from the EvalRuns it created instead of reading the suite ConfigMap,
runs no case (each batch is written at once, `--case-pause` apart), and
heartbeats only every 5 s of a run's life (runs here are shorter). Its own
API calls (the pod and EvalRun watches, one TokenRequest and one pod annotation
per runner) use the admin identity, so the audit count is the controller's alone.
Everything shares this machine: the JSON records the CPU seconds of every
component and how busy the machine was.

Prints a table and writes JSON (default bench/results/scale.json).

    .venv/bin/python bench/scale.py [--evalruns 100] [--nodes 20] [--cases 20] [--kill-at 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "tools" / "k8s"), str(ROOT / "tools" / "kwok")]

import aiohttp
import duckdb
import kwok
import localcluster
import yaml
from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import Owner
from evalrunner.store import wire
from evalrunner.store.records import CaseEvent, RunRequest, case_row_id

NAMESPACE = "bench"
OUTCOMES = ("succeeded", "failed", "oomkilled", "evicted", "deleted")
DYING = OUTCOMES[1:]
EXPECTED_CAUSE = {"failed": "error", "oomkilled": "oom_killed", "evicted": "evicted", "deleted": "pod_deleted"}
GROUP, VERSION, PLURAL = "evals.workshop.dev", "v1alpha1", "evalruns"
CRD_FILE = ROOT / "crds" / "evalruns.evals.workshop.dev.yaml"
MANAGED = "app.kubernetes.io/managed-by=evalrunner-controller"
RUN_ID = "evals.workshop.dev/run-id"
SUITE = "evals.workshop.dev/suite"
CONTROLLER_USER = "evalrunner-bench-controller"
ADMIN_TOKEN = "scale-bench-admin-token"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["ResponseStarted", "ResponseComplete", "Panic"],
    "rules": [{"level": "Metadata", "users": [CONTROLLER_USER]}, {"level": "None"}],
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the cluster


def enable_audit(st: localcluster.State, work: Path) -> Path:
    """Restart the API server with an audit log of the controller's requests (only the controller's user)."""
    policy = work / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    audit_log = work / "audit.log"
    argv = [a for a in st.argv["kube-apiserver"] if not a.startswith("--audit-")]
    argv += [f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}", "--audit-log-format=json",
             "--audit-log-maxsize=0", "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s"]
    pid = st.pids["kube-apiserver"]
    os.kill(pid, signal.SIGTERM)
    if not localcluster._wait_exit(pid, 20):
        localcluster._kill_tree(pid)
        localcluster._wait_exit(pid, 5)
    localcluster._spawn(st, "kube-apiserver", argv)
    admin = localcluster.Client(st.server, Path(st.state_dir) / "pki")
    deadline = time.monotonic() + 60
    while admin.get("/readyz")[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("kube-apiserver not ready after the restart with an audit log")
        time.sleep(0.2)
    return audit_log


def controller_kubeconfig(st: localcluster.State, work: Path) -> Path:
    """A kubeconfig with a client certificate of its own, so the audit log can tell the controller's requests."""
    pki = Path(st.state_dir) / "pki"
    localcluster._issue(pki, "bench-controller", f"/O=system:masters/CN={CONTROLLER_USER}", localcluster.CLIENT_EXT)
    path = work / "controller.kubeconfig"
    localcluster.write_kubeconfig(path, st.server, pki, "bench-controller")
    return path


class Controller:
    """`evalrunner controller` as its own process, with the CLI's default intervals."""

    def __init__(self, kubeconfig: Path, work: Path, port: int):
        self.kubeconfig, self.work, self.port = kubeconfig, work, port
        self.db = work / "controller.duckdb"
        self.log_path = work / "controller.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Controller:
        exe = Path(sys.executable).parent / "evalrunner"
        argv = [str(exe), "controller", "--db", str(self.db), "--kubeconfig", str(self.kubeconfig),
                "--namespace", NAMESPACE, "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "json"]
        env = dict(os.environ, EVALRUNNER_ADMIN_TOKEN=ADMIN_TOKEN)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        import urllib.request
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)  # not left behind, serving and writing, after the bench gives up
                raise RuntimeError(f"controller not healthy after 60 s; see {self.log_path}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class ProcSampler(threading.Thread):
    """RSS and CPU of a process (and its children: none expected) every `interval` seconds, from /proc."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.pid: int | None = None
        self.samples: list[dict[str, float]] = []  # t, rss_mib, cpu_s (cumulative over every pid sampled)
        self.stop_event = threading.Event()
        self._base_cpu = 0.0   # CPU seconds of earlier controller processes (a restart)
        self._last_cpu = 0.0
        self._last_pid: int | None = None
        self.tick = os.sysconf("SC_CLK_TCK")

        self.others: dict[str, int] = {}   # name -> pid: the rest of the machine's load, CPU only
        self.others_cpu: dict[str, tuple[float, float]] = {}  # name -> (first, last) CPU seconds seen
        self.machine: list[float] = []  # busy fraction of all CPUs between samples (/proc/stat)

    def follow(self, pid: int) -> None:
        self.pid = pid

    def cpu_of(self, pid: int) -> float:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / self.tick

    def _machine(self, last: list[int] | None) -> list[int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        if last is not None:
            total = sum(fields) - sum(last)
            idle = (fields[3] + fields[4]) - (last[3] + last[4])
            if total > 0:
                self.machine.append(1 - idle / total)
        return fields

    def run(self) -> None:
        last_stat = self._machine(None)
        while not self.stop_event.is_set():
            last_stat = self._machine(last_stat)
            for name, other in list(self.others.items()):
                try:
                    cpu = self.cpu_of(other)
                except (OSError, IndexError, ValueError):
                    continue
                first = self.others_cpu.get(name, (cpu, cpu))[0]
                self.others_cpu[name] = (first, cpu)
            pid = self.pid
            if pid is not None:
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    cpu = (int(stat[11]) + int(stat[12])) / self.tick
                    rss = 0
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            rss = int(line.split()[1]) / 1024
                    if pid != self._last_pid:
                        self._base_cpu += self._last_cpu
                        self._last_pid = pid
                    self._last_cpu = cpu
                    self.samples.append({"t": time.time(), "rss_mib": rss, "cpu_s": self._base_cpu + cpu})
                except (OSError, IndexError, ValueError):
                    pass
            self.stop_event.wait(self.interval)


# ---------------------------------------------------------------- the load generator


class Kube:
    """aiohttp client of the API server for the admin user (the load generator's identity, not the controller's)."""

    def __init__(self, st: localcluster.State):
        pki = Path(st.state_dir) / "pki"
        self.server = st.server
        self.ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ssl.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=32),
                                             timeout=aiohttp.ClientTimeout(total=None, sock_read=None))

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                   ok: tuple[int, ...] = (200, 201)) -> tuple[int, Any]:
        assert self.session is not None
        for attempt in range(10):
            try:
                async with self.session.request(
                        method, self.server + path, data=json.dumps(body) if body is not None else None,
                        headers={"Content-Type": content_type}, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status in ok or resp.status in (404, 409):
                        return resp.status, data
                    if resp.status == 429 or resp.status >= 500:
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {str(data)[:300]}")
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"{method} {path}: no answer after 10 tries")

    async def watch(self, path: str, handle) -> None:
        """List then watch `path` (a collection with query), calling handle(type, obj) for each event, forever."""
        assert self.session is not None
        sep = "&" if "?" in path else "?"
        while True:
            _, listing = await self.call("GET", path)
            for obj in listing["items"]:
                handle("ADDED", obj)
            rv = listing["metadata"]["resourceVersion"]
            while True:
                url = f"{self.server}{path}{sep}watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=240"
                try:
                    async with self.session.get(url) as resp:
                        if resp.status == 410:
                            break
                        async for line in resp.content:
                            event = json.loads(line)
                            if event["type"] == "ERROR":
                                if event["object"].get("code") == 410:
                                    rv = None
                                break
                            rv = event["object"]["metadata"]["resourceVersion"]
                            if event["type"] != "BOOKMARK":
                                handle(event["type"], event["object"])
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    await asyncio.sleep(0.5)
                if rv is None:
                    break


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)  # endpoint -> seconds
        self.errors: Counter[str] = Counter()
        self.cases_acked = 0
        self.first_case: float | None = None
        self.last_case: float | None = None
        self.per_second: Counter[int] = Counter()


class LoadGen:
    """Plays the runner of every runner pod that becomes Running, and records when pods end."""

    def __init__(self, kube: Kube, cases: int, batch: int, case_pause: float, concurrency: int,
                 heartbeat_s: float = 5.0):
        self.kube = kube
        self.cases, self.batch, self.case_pause = cases, batch, case_pause
        self.heartbeat_s = heartbeat_s
        self.sem = asyncio.Semaphore(concurrency)
        self.stats = Stats()
        self.store: aiohttp.ClientSession | None = None
        self.started: set[str] = set()          # pod uids being played
        self.pods: dict[str, dict] = {}         # run id -> facts about its pod
        self.death_seen: dict[str, float] = {}  # run id -> wall clock when the watch first saw the pod end
        self.death_api: dict[str, float] = {}   # run id -> finishedAt / deletionTimestamp
        self.acked: dict[str, int] = Counter()  # run id -> case rows the store acknowledged
        self.played: dict[str, str] = {}        # run id -> how playing it ended ("ok" or an error)
        self.tasks: set[asyncio.Task] = set()
        self.running_seen = 0

    async def open(self) -> None:
        self.store = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                           timeout=aiohttp.ClientTimeout(total=60))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.store:
            await self.store.close()

    # -------------------------------------------------------- pod events

    def on_pod(self, kind: str, pod: dict) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        run_id = (meta.get("annotations") or {}).get(RUN_ID)
        if not run_id:
            return
        self.pods.setdefault(run_id, {"suite": (meta.get("labels") or {}).get(SUITE), "pod": meta["name"],
                                             "uid": meta["uid"], "created": parse_time(meta.get("creationTimestamp"))})
        statuses = status.get("containerStatuses") or []
        terminated = ((statuses[0].get("state") or {}).get("terminated") if statuses else None) or None
        ended = (kind == "DELETED" or meta.get("deletionTimestamp") or terminated
                 or status.get("phase") in ("Succeeded", "Failed"))
        if ended:
            if run_id not in self.death_seen:
                self.death_seen[run_id] = time.time()
                api_time = parse_time((terminated or {}).get("finishedAt")) or parse_time(meta.get("deletionTimestamp"))
                if api_time:
                    self.death_api[run_id] = api_time
            return
        running = statuses and (statuses[0].get("state") or {}).get("running")
        if status.get("phase") == "Running" and running and meta["uid"] not in self.started:
            self.started.add(meta["uid"])
            self.running_seen += 1
            task = asyncio.get_running_loop().create_task(self.play(pod))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    # -------------------------------------------------------- one runner

    async def token(self, pod: dict) -> str:
        """What the kubelet would project into the pod: a token bound to it, for the store's audience."""
        meta, spec = pod["metadata"], pod["spec"]
        projected = next(source["serviceAccountToken"] for volume in spec.get("volumes") or []
                         for source in (volume.get("projected") or {}).get("sources") or []
                         if "serviceAccountToken" in source)
        account = spec.get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [projected["audience"]], "expirationSeconds": projected.get("expirationSeconds", 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        for _ in range(100):  # the namespace's default ServiceAccount may be a moment behind
            code, data = await self.kube.call(
                "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", body)
            if code == 201 or code == 200:
                return data["status"]["token"]
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no token for pod {meta['namespace']}/{meta['name']}: HTTP {code}: {str(data)[:200]}")

    async def call_store(self, base: str, token: str, endpoint: str, path: str, body: Any) -> Any:
        assert self.store is not None
        url = f"{base}{wire.API_PREFIX}{path}"
        delay = 0.1
        for attempt in range(30):
            t0 = time.monotonic()
            try:
                async with self.store.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
                    data = await resp.json(content_type=None)
                    took = time.monotonic() - t0
                    self.stats.latency[endpoint].append(took)
                    if resp.status < 300:
                        return data
                    self.stats.errors[f"{endpoint} HTTP {resp.status}"] += 1
                    if resp.status not in (500, 502, 503, 504):
                        raise RuntimeError(f"{endpoint}: HTTP {resp.status}: {str(data)[:200]}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.stats.errors[f"{endpoint} {type(exc).__name__}"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise RuntimeError(f"{endpoint}: the store did not answer")

    async def play(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        run_id = meta["annotations"][RUN_ID]
        suite = meta["labels"][SUITE]
        container = spec["containers"][0]
        command = container.get("command", []) + container.get("args", [])
        base = command[command.index("--store-url") + 1]
        grace = float(command[command.index("--deadline-grace") + 1]) if "--deadline-grace" in command else 60.0
        async with self.sem:
            try:
                token = await self.token(pod)
                names = [f"c{i}" for i in range(self.cases)]
                owner = Owner(kind="pod", namespace=meta["namespace"], pod=meta["name"], pod_uid=meta["uid"],
                              host=spec.get("nodeName"), pid=1)
                request = RunRequest(suite=suite, case_names=tuple(names), timeout_seconds=10.0, owner=owner,
                                     lock_policy=LockPolicy.ALLOW, deadline_grace_seconds=grace, run_id=run_id)
                await self.call_store(base, token, "start", "/runs", wire.run_request_to_json(request))
                # A dying runner gets half-way; a succeeding one through every case.
                todo = names if suite == "succeeded" else names[: len(names) // 2]
                last_beat = time.monotonic()
                for i in range(0, len(todo), self.batch):
                    now = datetime.now(UTC)
                    events = [CaseEvent(case_row_id(run_id, n), run_id, n, RunStatus.COMPLETED.value, now, now,
                                        passed=True, score=1.0, output="ok", duration_ms=1.0)
                              for n in todo[i:i + self.batch]]
                    report = await self.call_store(base, token, "cases", f"/runs/{run_id}/cases",
                                                   {"events": [wire.case_event_to_json(e) for e in events]})
                    # A fenced batch (its run closed meanwhile) wrote nothing: none of it was acknowledged.
                    saved = 0 if report.get("fenced") else len(events) - len(report.get("failures") or {})
                    self.acked[run_id] += saved
                    t = time.time()
                    self.stats.cases_acked += saved
                    self.stats.per_second[int(t)] += saved
                    self.stats.first_case = self.stats.first_case or t
                    self.stats.last_case = t
                    if report.get("fenced"):
                        break
                    if time.monotonic() - last_beat >= self.heartbeat_s:
                        await self.call_store(base, token, "heartbeat", f"/runs/{run_id}/heartbeat", {})
                        last_beat = time.monotonic()
                    if self.case_pause:
                        await asyncio.sleep(self.case_pause)
                if suite == "succeeded":
                    await self.call_store(base, token, "finish", f"/runs/{run_id}/finish",
                                          {"status": "completed", "cause": None, "error": None,
                                           "unsaved_cases": {}, "case_events": []})
                self.played[run_id] = "ok"
            except Exception as exc:  # noqa: BLE001  (recorded; the pod still ends)
                self.played[run_id] = f"{type(exc).__name__}: {exc}"
        # The runner is done (or gave up): kwok ends the pod by its suite's outcome now.
        await self.kube.call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                             {"metadata": {"annotations": {kwok.EXIT_AFTER_ANNOTATION: "0s"}}},
                             content_type="application/merge-patch+json")


# ---------------------------------------------------------------- EvalRuns


def evalrun(name: str, cases: int) -> dict:
    suites = [{"name": outcome, "timeoutSeconds": 10, "concurrency": 1,
               "target": {"python": {"callable": "targets:calculator"}},
               "cases": [{"id": f"c{i}", "input": "1+1", "expected": "2"} for i in range(cases)]}
              for outcome in OUTCOMES]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EvalRun", "metadata": {"name": name},
            "spec": {"suites": suites, "retries": 0, "concurrencyPolicy": "Allow"}}


async def create_evalruns(kube: Kube, n: int, cases: int, parallel: int = 8) -> float:
    t0 = time.monotonic()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await kube.call("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}",
                            evalrun(f"er-{i:05d}", cases))

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.monotonic() - t0


async def evalrun_phases(kube: Kube) -> Counter[str]:
    _, data = await kube.call("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}")
    return Counter(((item.get("status") or {}).get("phase") or "none") for item in data["items"])


async def running_rows(controller: Controller) -> int | None:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(f"{controller.url}{wire.API_PREFIX}/runs?status=running&limit=500",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                if resp.status != 200:
                    return None
                return len((await resp.json())["runs"])
    except (TimeoutError, aiohttp.ClientError):
        return None


# ---------------------------------------------------------------- the run


async def drive(args: argparse.Namespace, st: localcluster.State, controller: Controller,
                sampler: ProcSampler) -> dict[str, Any]:
    kube = Kube(st)
    await kube.open()
    gen = LoadGen(kube, args.cases, args.batch, args.case_pause, args.runner_concurrency)
    await gen.open()
    selector = urllib.parse.quote(MANAGED)
    watcher = asyncio.create_task(kube.watch(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}",
                                             gen.on_pod))
    # EvalRun phases from a watch too: listing every EvalRun each second would load the API server (and so the
    # measurement) with megabytes of inline suites.
    phase_of: dict[str, str] = {}

    def on_evalrun(kind: str, obj: dict) -> None:
        if kind == "DELETED":
            phase_of.pop(obj["metadata"]["name"], None)
        else:
            phase_of[obj["metadata"]["name"]] = (obj.get("status") or {}).get("phase") or "none"

    evalrun_watcher = asyncio.create_task(kube.watch(f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}",
                                                     on_evalrun))
    expected_pods = args.evalruns * len(OUTCOMES)
    result: dict[str, Any] = {}
    kill: dict[str, Any] | None = None
    progress: list[dict[str, Any]] = []
    result["progress"] = progress
    try:
        t0 = time.monotonic()
        result["t0_wall"] = time.time()
        result["create_s"] = await create_evalruns(kube, args.evalruns, args.cases)
        log(f"created {args.evalruns} EvalRuns in {result['create_s']:.1f}s")
        deadline = t0 + args.timeout
        last_log = 0.0
        while True:
            now = time.monotonic()
            ended = len(gen.death_seen)
            if args.kill_at is not None and kill is None and ended >= args.kill_at * expected_pods:
                kill = {"at_ended_pods": ended, "t": time.time()}
                log(f"SIGKILL the controller with {ended}/{expected_pods} pods ended")
                controller.stop(signal.SIGKILL)
                await asyncio.to_thread(controller.start)
                sampler.follow(controller.proc.pid)
                kill["restart_s"] = time.time() - kill["t"]
            phases = Counter(phase_of.values())
            terminal = phases.get("Succeeded", 0) + phases.get("Failed", 0)
            progress.append({"t": round(time.monotonic() - t0, 1), "pods_running_seen": gen.running_seen,
                             "pods_ended": ended, "evalruns_terminal": terminal,
                             "cases_acked": gen.stats.cases_acked})
            if now - last_log > 10:
                last_log = now
                rss = sampler.samples[-1]["rss_mib"] if sampler.samples else float("nan")
                log(f"pods running-seen {gen.running_seen}/{expected_pods}, ended {ended}, played "
                    f"{len(gen.played)}, cases acked {gen.stats.cases_acked}; EvalRuns {dict(phases)}; "
                    f"controller RSS {rss:.0f} MiB")
            if terminal >= args.evalruns and ended >= expected_pods:
                break
            if now > deadline:
                log("timed out waiting for every EvalRun to end")
                break
            await asyncio.sleep(1.0)
        result["all_terminal_s"] = time.monotonic() - t0
        # Rows of ended pods still running (the API lists at most 500): wait a little for stragglers.
        settle = time.monotonic()
        while await running_rows(controller) and time.monotonic() - settle < 30:
            await asyncio.sleep(0.5)
        result["running_rows_at_end_api"] = await running_rows(controller)
        if kill is not None:
            kill["reconciled_s_after_kill"] = None
        result["kill"] = kill
        result["phases"] = dict(await evalrun_phases(kube))
    finally:
        watcher.cancel()
        evalrun_watcher.cancel()
        await gen.close()
        await kube.close()
    result["gen"] = gen
    return result


def reconcile_time_after_kill(kill: dict | None, rows: dict[str, dict], gen: LoadGen) -> float | None:
    """After a SIGKILL at kill['t']: when the last row of a pod that ended before the restart was closed."""
    if not kill:
        return None
    before = [rid for rid, t in gen.death_seen.items() if t <= kill["t"] + kill.get("restart_s", 0)]
    closes = [rows[rid]["completed_at"] for rid in before if rid in rows and rows[rid]["completed_at"]]
    return max(closes) - kill["t"] if closes else None


def read_db(path: Path) -> tuple[dict[str, dict], dict[str, int]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = {}
        for rid, suite, status, cause, completed in con.execute(
                "SELECT id, suite, status, cause, epoch_ms(completed_at) FROM eval_runs").fetchall():
            rows[rid] = {"suite": suite, "status": status, "cause": cause,
                         "completed_at": completed / 1000 if completed is not None else None}
        cases = dict(con.execute(
            "SELECT run_id, count(*) FROM eval_cases WHERE status = 'completed' AND passed GROUP BY run_id").fetchall())
        running_cases = con.execute("SELECT count(*) FROM eval_cases WHERE status = 'running'").fetchone()[0]
        cases["__running__"] = running_cases
    finally:
        con.close()
    return rows, cases


def audit_counts(path: Path, t_start: float, t_end: float) -> dict[str, Any]:
    per_minute: Counter[int] = Counter()
    by_verb: Counter[str] = Counter()
    total = 0
    if path.exists():
        with path.open() as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("stage") != "RequestReceived" or (ev.get("user") or {}).get("username") != CONTROLLER_USER:
                    continue
                t = parse_time(ev.get("requestReceivedTimestamp")) or 0.0
                ref = ev.get("objectRef") or {}
                verb = ev.get("verb", "?")
                resource = ref.get("resource", ev.get("requestURI", "?").split("?")[0])
                if ref.get("subresource"):
                    resource += "/" + ref["subresource"]
                by_verb[f"{verb} {resource}"] += 1
                per_minute[int((t - t_start) // 60)] += 1
                total += 1
    minutes = max((t_end - t_start) / 60, 1e-9)
    return {"total": total, "per_minute_avg": total / minutes,
            "per_minute": [per_minute.get(m, 0) for m in range(int(minutes) + 1)],
            "peak_minute": max(per_minute.values()) if per_minute else 0,
            "by_verb_resource": dict(by_verb.most_common())}


def summarise(args: argparse.Namespace, res: dict[str, Any], rows: dict[str, dict], cases: dict[str, int],
              sampler: ProcSampler, audit: dict[str, Any], build: dict[str, Any]) -> dict[str, Any]:
    gen: LoadGen = res["gen"]
    expected = set(gen.pods)
    lost = sorted(expected - set(rows))
    left_running = sorted(rid for rid, r in rows.items() if r["status"] == "running")
    by_outcome: dict[str, Counter] = defaultdict(Counter)
    for rid, r in rows.items():
        by_outcome[r["suite"]][f"{r['status']}/{r['cause']}"] += 1
    wrong_cause = sorted(rid for rid, r in rows.items() if r["suite"] in EXPECTED_CAUSE
                         and r["status"] != "running" and r["cause"] != EXPECTED_CAUSE[r["suite"]])
    cases_missing = sum(max(0, n - cases.get(rid, 0)) for rid, n in gen.acked.items())
    latency_watch, latency_api, latency_calm = defaultdict(list), defaultdict(list), defaultdict(list)
    kill = res["kill"]
    # Deaths from 2 s before a SIGKILL until the restarted controller is healthy wait for it.
    window = (kill["t"] - 2, kill["t"] + kill["restart_s"]) if kill else None
    for rid, info in gen.pods.items():
        r = rows.get(rid)
        if info["suite"] not in DYING or not r or r["completed_at"] is None:
            continue
        if rid in gen.death_seen:
            latency_watch[info["suite"]].append(r["completed_at"] - gen.death_seen[rid])
            if window and not window[0] <= gen.death_seen[rid] <= window[1]:
                latency_calm[info["suite"]].append(r["completed_at"] - gen.death_seen[rid])
        if rid in gen.death_api:
            latency_api[info["suite"]].append(r["completed_at"] - gen.death_api[rid])

    def lat(d: dict[str, list[float]]) -> dict[str, Any]:
        every = [v for vs in d.values() for v in vs]
        out = {"all": {"n": len(every), "p50": percentile(every, .5), "p99": percentile(every, .99),
                       "max": max(every) if every else float("nan")}}
        for k, vs in sorted(d.items()):
            out[k] = {"n": len(vs), "p50": percentile(vs, .5), "p99": percentile(vs, .99)}
        return out

    samples = sampler.samples
    cpu_total = samples[-1]["cpu_s"] - samples[0]["cpu_s"] if len(samples) > 1 else float("nan")
    span = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else float("nan")
    st = gen.stats
    ingest_s = (st.last_case - st.first_case) if st.first_case and st.last_case else float("nan")
    store_latency = {ep: {"n": len(v), "p50_ms": percentile(v, .5) * 1000, "p99_ms": percentile(v, .99) * 1000}
                     for ep, v in sorted(st.latency.items())}
    every_call = [x for v in st.latency.values() for x in v]
    return {
        "benchmark": "scale",
        "argv": sys.argv[1:],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "build": build,
        "evalruns": args.evalruns, "suites_per_evalrun": len(OUTCOMES), "cases_per_suite": args.cases,
        "fake_nodes": args.nodes, "pods_expected": args.evalruns * len(OUTCOMES),
        "times_s": {"create_evalruns": res["create_s"], "until_all_terminal": res["all_terminal_s"]},
        "controller": {
            "rss_mib_peak": max((s["rss_mib"] for s in samples), default=float("nan")),
            "rss_mib_final": samples[-1]["rss_mib"] if samples else float("nan"),
            "cpu_s": cpu_total, "cpu_percent_mean": 100 * cpu_total / span if span else float("nan"),
            "other_processes_cpu_s": {k: round(b - a, 1) for k, (a, b) in sampler.others_cpu.items()},
            "machine_cpu_busy_mean": statistics.fmean(sampler.machine) if sampler.machine else float("nan"),
            "samples": [{"t": round(s["t"] - samples[0]["t"], 1), "rss_mib": round(s["rss_mib"], 1),
                         "cpu_s": round(s["cpu_s"] - samples[0]["cpu_s"], 2)} for s in samples],
        },
        "api_requests": audit,
        "latency_pod_death_to_row_terminal_s": {
            "from_watch": lat(latency_watch), "from_pod_timestamps": lat(latency_api),
            **({"from_watch_outside_kill_window": lat(latency_calm)} if window else {})},
        "progress": res["progress"],
        "store": {"cases_acked": st.cases_acked, "ingest_window_s": ingest_s,
                  "cases_per_s": st.cases_acked / ingest_s if ingest_s and not math.isnan(ingest_s) else float("nan"),
                  "cases_per_s_peak": max(st.per_second.values(), default=0),
                  "requests": len(every_call), "p50_ms": percentile(every_call, .5) * 1000,
                  "p99_ms": percentile(every_call, .99) * 1000, "by_endpoint": store_latency,
                  "errors": dict(st.errors)},
        "integrity": {
            "pods_seen": len(gen.pods), "pods_played": len(gen.played),
            "play_errors": Counter(v.split(":")[0] for v in gen.played.values() if v != "ok"),
            "rows": len(rows), "rows_lost": len(lost), "rows_lost_ids": lost[:20],
            "rows_left_running": len(left_running), "rows_left_running_ids": left_running[:20],
            "rows_wrong_cause": len(wrong_cause), "rows_wrong_cause_ids": wrong_cause[:20],
            "case_rows_acked_but_missing": cases_missing, "case_rows_left_running": cases.get("__running__", 0),
            "evalrun_phases": res["phases"],
            "evalruns_not_terminal": args.evalruns - res["phases"].get("Succeeded", 0) - res["phases"].get("Failed", 0),
            "rows_by_suite": {k: dict(v) for k, v in sorted(by_outcome.items())},
        },
        "kill": res["kill"],
    }


def print_table(s: dict[str, Any]) -> None:
    c, a, st, i = s["controller"], s["api_requests"], s["store"], s["integrity"]
    lw = s["latency_pod_death_to_row_terminal_s"]["from_watch"]
    la = s["latency_pod_death_to_row_terminal_s"]["from_pod_timestamps"]
    print(f"\nscale: {s['evalruns']} EvalRuns x {s['suites_per_evalrun']} suites x {s['cases_per_suite']} cases "
          f"= {s['pods_expected']} runner pods on {s['fake_nodes']} kwok nodes")
    rows = [
        ("create EvalRuns", f"{s['times_s']['create_evalruns']:.1f} s"),
        ("until every EvalRun terminal", f"{s['times_s']['until_all_terminal']:.1f} s"),
        ("controller RSS peak / final", f"{c['rss_mib_peak']:.0f} / {c['rss_mib_final']:.0f} MiB"),
        ("controller CPU", f"{c['cpu_s']:.1f} s ({c['cpu_percent_mean']:.0f}% of one core on average)"),
        ("CPU of the rest (s)", ", ".join(f"{k} {v:.0f}" for k, v in c["other_processes_cpu_s"].items())
         + f"; machine {100 * c['machine_cpu_busy_mean']:.0f}% busy"),
        ("controller API requests", f"{a['total']} ({a['per_minute_avg']:.0f}/min avg, {a['peak_minute']} peak minute)"),
        ("death -> row terminal (watch)", (f"p50 {lw['all']['p50']:.3f} s, p99 {lw['all']['p99']:.3f} s, "
                                          f"max {lw['all']['max']:.3f} s (n={lw['all']['n']})")),
        ("death -> row terminal (pod times)", (f"p50 {la['all']['p50']:.3f} s, p99 {la['all']['p99']:.3f} s "
                                              f"(1 s resolution)")),
        ("store ingest", (f"{st['cases_per_s']:.0f} cases/s avg, {st['cases_per_s_peak']} peak second "
                         f"({st['cases_acked']} cases)")),
        ("store request latency", f"p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.1f} ms ({st['requests']} requests)"),
        ("rows lost / left running / wrong cause", (f"{i['rows_lost']} / {i['rows_left_running']} / "
                                                   f"{i['rows_wrong_cause']}")),
        ("case rows acked but missing / running", f"{i['case_rows_acked_but_missing']} / {i['case_rows_left_running']}"),
        ("EvalRuns not terminal", f"{i['evalruns_not_terminal']} {i['evalrun_phases']}"),
    ]
    if s["kill"]:
        k = s["kill"]
        lc = s["latency_pod_death_to_row_terminal_s"]["from_watch_outside_kill_window"]["all"]
        rows.append(("death -> row terminal, outside the kill", (f"p50 {lc['p50']:.3f} s, p99 {lc['p99']:.3f} s "
                     f"(n={lc['n']})")))
        rows.append(("SIGKILL + restart", (f"at {k['at_ended_pods']} ended pods; restart healthy in {k['restart_s']:.1f} s; "
                                          f"last row of a pod dead before the restart closed "
                                          f"{k.get('reconciled_s_after_kill') or float('nan'):.1f} s after the kill")))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  API requests by verb/resource: " + ", ".join(f"{k} {v}" for k, v in list(a["by_verb_resource"].items())[:12]))
    print("  latency by outcome (watch): " + ", ".join(
        f"{k} p50 {v['p50']:.3f} p99 {v['p99']:.3f}" for k, v in lw.items() if k != "all"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evalruns", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=20, help="kwok fake nodes")
    parser.add_argument("--cases", type=int, default=20, help="cases per suite")
    parser.add_argument("--batch", type=int, default=10, help="cases per POST (the runner's group commit)")
    parser.add_argument("--case-pause", type=float, default=0.05, help="seconds between a runner's batches")
    parser.add_argument("--runner-concurrency", type=int, default=200, help="runners played at once")
    parser.add_argument("--kill-at", type=float, default=None, metavar="F",
                        help="SIGKILL and restart the controller once this fraction of pods has ended")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every EvalRun to end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, DuckDB, audit log)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = parser.parse_args()
    random.seed(args.seed)

    build = {}
    for tool in ("tools/k8s/build", "tools/kwok/build"):
        t = time.monotonic()
        subprocess.run([str(ROOT / tool), *(["--control-plane"] if "k8s" in tool else [])], check=True,
                       stdout=subprocess.DEVNULL)
        build[tool] = round(time.monotonic() - t, 2)
    state = Path(tempfile.mkdtemp(prefix="evalrunner-scale-"))
    work = Path(tempfile.mkdtemp(prefix="evalrunner-scale-work-"))
    log(f"cluster state {state}, work {work}")
    st = localcluster.up(state, quiet=True)
    controller: Controller | None = None
    kw: kwok.Kwok | None = None
    sampler = ProcSampler()
    try:
        audit_log = enable_audit(st, work)
        st = localcluster.State.load(state)
        admin = kwok.Api(state)
        crd = yaml.safe_load(CRD_FILE.read_text())
        admin.try_call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        admin.try_call("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
        # Every runner pod goes to a fake node: the node agent's node takes none.
        admin.call("PATCH", f"/api/v1/nodes/{localcluster.NODE_NAME}", {"spec": {"unschedulable": True}},
                   content_type="application/merge-patch+json")
        kw = kwok.Kwok(state, exit_after=3600).start()
        names = kw.create_nodes(args.nodes, taint=False, pods=max(110, 10 * args.evalruns))
        log(f"{args.nodes} kwok nodes Ready in {kw.wait_nodes_ready(names, timeout=120):.1f}s")
        for _ in range(100):  # the CRD established and the namespace's default ServiceAccount there
            _, sa = admin.call("GET", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", ok=(200,))
            _, crd_now = admin.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                        f"{crd['metadata']['name']}")
            established = any(c["type"] == "Established" and c["status"] == "True"
                              for c in (crd_now.get("status") or {}).get("conditions", []))
            if sa["items"] and established:
                break
            time.sleep(0.2)
        controller = Controller(controller_kubeconfig(st, work), work, localcluster.free_port()).start()
        sampler.follow(controller.proc.pid)
        sampler.others = {**{n: p for n, p in localcluster.State.load(state).pids.items() if n != "node-agent"},
                          "kwok": kw.pid, "load generator (this process)": os.getpid()}
        sampler.start()
        t_start = time.time()
        res = asyncio.run(drive(args, st, controller, sampler))
        t_end = time.time()
        sampler.stop_event.set()
        controller.stop()
        rows, cases = read_db(controller.db)
        if res["kill"]:
            res["kill"]["reconciled_s_after_kill"] = reconcile_time_after_kill(res["kill"], rows, res["gen"])
        audit = audit_counts(audit_log, t_start, t_end)
        summary = summarise(args, res, rows, cases, sampler, audit, build)
    finally:
        sampler.stop_event.set()
        if controller is not None:
            controller.stop()
        if kw is not None:
            kw.stop(delete_nodes=False)  # the cluster goes next, with every node and pod in it
        localcluster.down(state, quiet=True)
        shutil.rmtree(state, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    i = summary["integrity"]
    ok = not (i["rows_lost"] or i["rows_left_running"] or i["evalruns_not_terminal"]
              or i["case_rows_acked_but_missing"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The store service under 100 busy runners: cases/s ingested over real HTTP, and nothing lost.

Starts a real `evalrunner serve` process on a temporary DuckDB file, then
plays `--clients` runners against it on loopback, spread over `--processes`
worker processes (threads inside each) so the generator is not the
bottleneck. Each client does what a runner pod does, through the runner's own
client (`HttpStore`: retries on 503 with Retry-After, splits a 413): its own
EvalRun token (registered in the file before the service starts, as the
controller does), start a run, post `--batch` case results at a time,
heartbeat every `--heartbeat-every` seconds, finish.

Afterwards, with the service stopped, the file is checked: every case a
client was told was saved is there, `completed`, and every run is terminal.

Baseline, in the same session: the store's own in-process rate for the same
batches (`DuckDBStore.save_cases`, one transaction per batch, no HTTP), and
its coalesced rate (`save_case_batches`, `--clients` batches a transaction).

Prints a table and writes JSON (default bench/results/store_ingest.json).
Goal: >= 50,000 cases/s from 100 clients.

    .venv/bin/python bench/store_ingest.py [--clients 100] [--processes 4] [--cases 5000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

import duckdb  # noqa: E402

from evalrunner.faults import Faults  # noqa: E402
from evalrunner.models import LockPolicy, RunStatus  # noqa: E402
from evalrunner.owner import this_process  # noqa: E402
from evalrunner.scope import Scope  # noqa: E402
from evalrunner.service.auth import new_token  # noqa: E402
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest  # noqa: E402
from evalrunner.store import http_client  # noqa: E402
from evalrunner.store.http_client import HttpStore  # noqa: E402

GOAL_CASES_PER_S = 50_000


def case_events(run_id: str, start: int, n: int) -> list[CaseEvent]:
    now = datetime.now(timezone.utc)
    return [CaseEvent(f"{run_id}/c{i:06d}", run_id, f"c{i:06d}", "completed", now, now, passed=True, score=1.0,
                      output="ok", duration_ms=1.5) for i in range(start, start + n)]


class CountingStore(HttpStore):
    """The runner's client, timing each request and counting the 503s it was answered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy = 0
        self.latencies: dict[str, list[float]] = {}

    def _attempt(self, method, path, payload):
        endpoint = f"{method} /runs" + ("" if path == "/runs" else "/{id}/" + path.rsplit("/", 1)[-1])
        started = time.perf_counter()
        try:
            return super()._attempt(method, path, payload)
        except http_client._RetryableReply as exc:
            if exc.status == 503:
                self.busy += 1
            raise
        finally:
            self.latencies.setdefault(endpoint, []).append(time.perf_counter() - started)


def one_client(url: str, token: str, name: str, cases: int, batch: int, heartbeat_every_s: float, go: float) -> dict:
    client = CountingStore(url, token, retry_for_s=120.0)
    while time.time() < go:
        time.sleep(0.001)
    names = tuple(f"c{i:06d}" for i in range(cases))
    run = client.start_run(RunRequest(name, names, 60.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
    acked = 0
    failures = 0
    last_beat = time.monotonic()
    first_post = time.time()
    for start in range(0, cases, batch):
        n = min(batch, cases - start)
        report = client.save_cases(case_events(run.id, start, n))
        assert not report.fenced, run.id
        failures += len(report.failures)
        if not report.failures:
            acked = start + n  # batches are sequential: every case below `acked` was reported saved
        if time.monotonic() - last_beat >= heartbeat_every_s:
            assert client.heartbeat(run.id)
            last_beat = time.monotonic()
    last_ack = time.time()
    client.finish_run(run.id, RunStatus.COMPLETED)
    return {"run_id": run.id, "acked": acked, "failures": failures, "busy": client.busy,
            "first_post": first_post, "last_ack": last_ack,
            "latencies": client.latencies, "retries": client.retries}


def worker(url: str, clients: list[tuple[str, str]], cases: int, batch: int, heartbeat_every_s: float, go: float,
           out: multiprocessing.Queue) -> None:
    results: list[dict] = []
    errors: list[str] = []

    def run(token: str, name: str) -> None:
        try:
            results.append(one_client(url, token, name, cases, batch, heartbeat_every_s, go))
        except Exception as exc:  # reported to the parent, which fails the benchmark
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=c) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"results": results, "errors": errors, "cpu_s": time.process_time()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def in_process_baseline(workdir: Path, clients: int, cases: int, batch: int) -> dict:
    """The store alone: the same batches without HTTP, one transaction each, then coalesced."""
    rates = {}
    for mode in ("one_per_batch", "coalesced"):
        with DuckDBStore.open(workdir / f"baseline-{mode}.duckdb", faults=Faults("")) as store:
            runs = [store.start_run(RunRequest(f"s{i}", (), 60.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
                    for i in range(clients)]
            batches = [case_events(r.id, start, min(batch, cases - start))
                       for start in range(0, cases, batch) for r in runs]
            started = time.perf_counter()
            if mode == "one_per_batch":
                for b in batches:
                    store.save_cases(b)
            else:
                for i in range(0, len(batches), clients):
                    store.save_case_batches(batches[i:i + clients])
            rates[mode] = clients * cases / (time.perf_counter() - started)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--cases", type=int, default=5000, help="cases per client")
    parser.add_argument("--batch", type=int, default=1000, help="case results per request (a busy runner's recorder sends up to 1,000)")
    parser.add_argument("--heartbeat-every", type=float, default=0.5, metavar="S")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_ingest.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        db = workdir / "ingest.duckdb"
        tokens = []
        with DuckDBStore.open(db, faults=Faults("")) as store:  # as the controller does, before the pods start
            for i in range(args.clients):
                token = new_token()
                store.register_token(Scope("bench", f"er-{i}", f"uid-{i}"), token)
                tokens.append((token, f"suite-{i:03d}"))

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "operator"), "EVALRUNNER_FAULTS": ""}
        command = [sys.executable, "-c", "from evalrunner.cli import entrypoint; entrypoint()", "serve",
                   "--db", str(db), "--port", str(port), "--sweep-interval", "3600", "--log-level", "info", "--log-format", "json"]
        server_log = open(workdir / "serve.log", "w+")
        server = subprocess.Popen(command, env=env, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"the service did not start: {(workdir / 'serve.log').read_text()[-2000:]}")
                    time.sleep(0.1)

            queue: multiprocessing.Queue = multiprocessing.Queue()
            go = time.time() + 1.0
            shares = [tokens[i::args.processes] for i in range(args.processes)]
            procs = [multiprocessing.Process(target=worker, args=(url, share, args.cases, args.batch,
                                                                   args.heartbeat_every, go, queue))
                     for share in shares if share]
            cpu_before = proc_cpu_s(server.pid)
            for p in procs:
                p.start()
            outputs = [queue.get() for _ in procs]
            elapsed = time.time() - go
            for p in procs:
                p.join()
            server_cpu = proc_cpu_s(server.pid) - cpu_before
        finally:
            server.terminate()
            server.wait(30)
            server_log.close()
        ingest_stats = {}
        for line in (workdir / "serve.log").read_text().splitlines():
            if '"service.ingest_stats"' in line:
                ingest_stats = {k: v for k, v in json.loads(line).items() if k not in ("event", "level", "timestamp")}

        errors = [e for o in outputs for e in o["errors"]]
        results = [r for o in outputs for r in o["results"]]
        total_acked = sum(r["acked"] for r in results)

        # Nothing lost: every acknowledged case is in the file, completed, and every run is terminal.
        with DuckDBStore.open(db, faults=Faults("")) as store:
            running = store.count_runs("running")
            lost = 0
            for r in results:
                rows = store._cur().execute(
                    "SELECT count(*) FROM eval_cases WHERE run_id = ? AND status = 'completed' AND name < ?",
                    [r["run_id"], f"c{r['acked']:06d}"]).fetchone()[0]
                lost += r["acked"] - rows
            runs = store.count_runs()

        baseline = in_process_baseline(workdir, args.clients, args.cases, args.batch)

    latencies: dict[str, list[float]] = {}
    for r in results:
        for endpoint, values in r["latencies"].items():
            latencies.setdefault(endpoint, []).extend(values)
    busy = sum(r["busy"] for r in results)
    rate = total_acked / elapsed
    # The case phase alone: from the first batch posted to the last acknowledged, without the starts
    # (every client starts at once here, a worst case real runners rarely meet) and finishes.
    case_phase_s = max(r["last_ack"] for r in results) - min(r["first_post"] for r in results) if results else 0.0
    case_phase_rate = total_acked / case_phase_s if case_phase_s else 0.0
    rows = {endpoint: {"requests": len(v), "p50_ms": percentile(v, 0.5) * 1000, "p99_ms": percentile(v, 0.99) * 1000}
            for endpoint, v in sorted(latencies.items())}

    print(f"store ingest: {args.clients} clients in {args.processes} processes, {args.cases} cases each, "
          f"{args.batch} per request, heartbeat every {args.heartbeat_every}s")
    print(f"{'endpoint':<28} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for endpoint, row in rows.items():
        print(f"{endpoint:<28} {row['requests']:>9} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}")
    print(f"ingested {total_acked:,} cases in {elapsed:.2f}s: {rate:,.0f} cases/s (goal {GOAL_CASES_PER_S:,}); "
          f"case phase alone {case_phase_s:.2f}s: {case_phase_rate:,.0f} cases/s; 503s answered: {busy}")
    print(f"baseline in process: {baseline['one_per_batch']:,.0f} cases/s one transaction per batch, "
          f"{baseline['coalesced']:,.0f} coalesced; over HTTP / in process = "
          f"{rate / baseline['one_per_batch']:.2f}x / {rate / baseline['coalesced']:.2f}x")
    print(f"service CPU {server_cpu:.1f}s ({server_cpu / elapsed * 100:.0f}% of one core; "
          f"{server_cpu / max(total_acked, 1) * 1e6:.1f} us/case); clients' CPU "
          f"{sum(o['cpu_s'] for o in outputs):.1f}s; {os.cpu_count()} CPUs")
    if ingest_stats:
        s = ingest_stats
        print(f"service's ingest thread: {s['writes']} transactions ({s['events'] / max(s['writes'], 1):,.0f} "
              f"case events each on average, at most {s['largest_write']:,}; {s['heartbeats']} heartbeats), "
              f"{s['write_s']:.1f}s in them ({s['events'] / max(s['write_s'], 1e-9):,.0f} cases/s while writing); "
              f"{s['refused']} refusals")
    print(f"verified: {runs} runs, {running} still running, {lost} acknowledged cases missing, "
          f"{len(errors)} client errors")
    for e in errors[:5]:
        print("  error:", e)
    ok = not errors and lost == 0 and running == 0 and runs == args.clients

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "store_ingest",
        "clients": args.clients, "processes": args.processes, "cases_per_client": args.cases, "batch": args.batch,
        "heartbeat_every_s": args.heartbeat_every,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "duckdb": duckdb.__version__},
        "cases_ingested": total_acked, "seconds": elapsed, "cases_per_s": rate,
        "case_phase_seconds": case_phase_s, "case_phase_cases_per_s": case_phase_rate,
        "endpoints": rows, "busy_503": busy, "client_retries": sum(r["retries"] for r in results),
        "baseline_in_process_cases_per_s": baseline,
        "ratio_to_in_process": {k: rate / v for k, v in baseline.items()},
        "service_cpu_s": server_cpu, "service_ingest": ingest_stats, "client_cpu_s": sum(o["cpu_s"] for o in outputs),
        "verified": {"runs": runs, "running": running, "lost": lost, "client_errors": errors[:20], "ok": ok},
        "goal": {"cases_per_s": GOAL_CASES_PER_S, "met": ok and rate >= GOAL_CASES_PER_S},
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

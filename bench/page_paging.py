"""Server time per /evals page with 100,000 runs in the database.

Fills a fresh DuckDB file with N runs (default 100,000; bulk-inserted through
`DuckDBStore.import_runs`, one statement) plus a few live runs with case rows,
starts the real `evalrunner serve` on it, and times each page many times:

  first page        GET /evals
  deep (keyset)     GET /evals?before=<cursor of the run at position 90% deep>
  filtered          GET /evals?status=failed&suite=suite-07
  filtered deep     the same filter, 90% deep by keyset
  run detail        GET /evals/runs/<a live run with cases>
  /metrics          (for information; no bar)

"Server time" is what the page handler reports in its `Server-Timing`
header (store thread + rendering); "round trip" adds HTTP on loopback.
Baselines in the same run, on the same file: `SELECT count(*)` through the
store in process (before the server opens the file), the same deep page by
OFFSET in process (what keyset paging avoids), and GET /healthz (one trivial
query through the server's store thread).

Bar: server time p95 under 100 ms for every page. Writes
bench/results/page_paging.json.

    .venv/bin/python bench/page_paging.py [--runs 100000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from evalrunner.models import LockPolicy, RunStatus  # noqa: E402
from evalrunner.owner import this_process  # noqa: E402
from evalrunner.service.page import cursor  # noqa: E402
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest  # noqa: E402
from evalrunner.store.duckdb_store import utcnow  # noqa: E402

BAR_MS = 100.0
SUITES = [f"suite-{i:02d}" for i in range(20)]
CAUSES = ["case_raised", "killed", "oom_killed", "heartbeat_lost", "deadline_exceeded", "manual"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fill(db: Path, n_runs: int, live_runs: int = 20, cases_per_live_run: int = 10) -> dict:
    """Bulk-insert terminal runs, then open a few live ones with case rows through the normal API."""
    store = DuckDBStore.open(db)
    try:
        me = this_process()
        template = store.start_run(RunRequest("template", ("a",), 30, me, lock_policy=LockPolicy.ALLOW)).run
        store.finish_run(template.id, RunStatus.COMPLETED)
        template = store.get_run(template.id)
        now = utcnow()
        rows = []
        for i in range(n_runs):
            created = now - timedelta(seconds=(n_runs - i) * 2 + 600)
            failed = i % 7 == 0
            rows.append(dataclasses.replace(
                template, id=f"bench-{i:07d}", suite=SUITES[i % len(SUITES)],
                status="failed" if failed else "completed", cause=CAUSES[i % len(CAUSES)] if failed else None,
                error="bench failure" if failed else None, created_at=created, started_at=created,
                completed_at=created + timedelta(seconds=1 + i % 90), heartbeat_at=created + timedelta(seconds=i % 90),
                deadline_at=created + timedelta(seconds=3600), case_count=10, passed=7, failed=2 if not failed else 1,
                errored=1 if not failed else 2, terminated_by="sweeper" if failed and i % 3 == 0 else "runner",
            ))
        started = time.perf_counter()
        inserted = store.import_runs(rows)
        import_s = time.perf_counter() - started
        live = []
        for j in range(live_runs):
            run = store.start_run(RunRequest(SUITES[j % len(SUITES)], tuple(f"c{k}" for k in range(cases_per_live_run)),
                                             600, me, lock_policy=LockPolicy.ALLOW)).run
            t = utcnow()
            store.save_cases([CaseEvent(f"{run.id}/c{k}", run.id, f"c{k}", "completed", t, t, passed=k % 4 != 0,
                                        score=1.0, output=f"output {k}", duration_ms=50.0 * k)
                              for k in range(cases_per_live_run // 2)])
            live.append(run.id)

        # Baselines and cursors, in process, before the server takes the file.
        total = store.count_runs()
        count_ms = timed_ms(lambda: store.count_runs(), 30)
        deep_at = int(total * 0.9)
        offset_ms = timed_ms(lambda: store.list_runs(limit=51, offset=deep_at), 30)
        deep = store.list_runs(limit=1, offset=deep_at)[0]
        flt_total = store.count_runs("failed", "suite-07")
        flt_deep = store.list_runs("failed", "suite-07", limit=1, offset=int(flt_total * 0.9))[0]
        return {
            "runs": total, "inserted": inserted, "import_s": import_s, "live_run": live[0],
            "deep_cursor": cursor(deep), "deep_position": deep_at,
            "filtered_total": flt_total, "filtered_deep_cursor": cursor(flt_deep),
            "baseline_count_ms": count_ms, "baseline_offset_deep_ms": offset_ms,
        }
    finally:
        store.close()


def timed_ms(fn, repeat: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> tuple[float, float | None]:
    """(round trip ms, server total ms from Server-Timing or None)."""
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
        timing = resp.headers.get("Server-Timing")
    rtt = (time.perf_counter() - t) * 1000
    server = None
    if timing:
        for part in timing.split(","):
            name, _, dur = part.strip().partition(";dur=")
            if name == "total":
                server = float(dur)
    return rtt, server


def summarize(values: list[float]) -> dict:
    return {"p50_ms": statistics.median(values), "p95_ms": percentile(values, 0.95), "max_ms": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="page-paging-"))
    db = tmp / "bench.duckdb"
    t0 = time.perf_counter()
    info = fill(db, args.runs)
    print(f"filled {info['runs']:,} runs in {time.perf_counter() - t0:.1f}s "
          f"(bulk import of {info['inserted']:,}: {info['import_s']:.2f}s)", file=sys.stderr)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("EVALRUNNER_DB", "EVALRUNNER_FAULTS")}
    exe = Path(sys.executable).parent / "evalrunner"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "evalrunner.cli"]
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([*cmd, "--db", str(db), "--no-recover", "--log-level", "warning", "serve",
                             "--port", str(port), "--sweep-interval", "0"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                fetch(f"{base}/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((tmp / "serve.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.1)

        pages = {
            "first page": "/evals",
            "deep (keyset, 90%)": "/evals?" + urlencode({"before": info["deep_cursor"]}),
            "filtered": "/evals?status=failed&suite=suite-07",
            "filtered deep (keyset)": "/evals?" + urlencode({"status": "failed", "suite": "suite-07",
                                                            "before": info["filtered_deep_cursor"]}),
            "100 per page (the maximum)": "/evals?limit=100",
            "run detail": f"/evals/runs/{info['live_run']}",
        }
        results = []
        for name, path in pages.items():
            for _ in range(3):
                fetch(base + path)  # warm up
            samples = [fetch(base + path) for _ in range(args.repeat)]
            server = [s for _, s in samples]
            results.append({"name": name, "path": path, "server": summarize(server),
                            "round_trip": summarize([r for r, _ in samples]), "bar_ms": BAR_MS,
                            "ok": percentile(server, 0.95) < BAR_MS})
        extra = []
        for name, path in (("GET /healthz (baseline)", "/healthz"), ("GET /metrics (info)", "/metrics")):
            for _ in range(3):
                fetch(base + path)
            extra.append({"name": name, "path": path,
                          "round_trip": summarize([fetch(base + path)[0] for _ in range(args.repeat)])})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)

    baselines = [
        {"name": "SELECT count(*) in process (baseline)", "server": summarize(info["baseline_count_ms"])},
        {"name": "same deep page by OFFSET in process", "server": summarize(info["baseline_offset_deep_ms"])},
    ]
    print(f"\n/evals with {info['runs']:,} runs; {args.repeat} requests each; bar: server p95 < {BAR_MS:.0f} ms\n")
    header = f"{'what':40} {'server p50':>11} {'server p95':>11} {'rtt p50':>9} {'rtt p95':>9}  bar"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['name']:40} {r['server']['p50_ms']:>9.1f}ms {r['server']['p95_ms']:>9.1f}ms "
              f"{r['round_trip']['p50_ms']:>7.1f}ms {r['round_trip']['p95_ms']:>7.1f}ms  {'ok' if r['ok'] else 'MISSED'}")
    for b in baselines:
        print(f"{b['name']:40} {b['server']['p50_ms']:>9.1f}ms {b['server']['p95_ms']:>9.1f}ms {'':>9} {'':>9}")
    for e in extra:
        print(f"{e['name']:40} {'':>11} {'':>11} {e['round_trip']['p50_ms']:>7.1f}ms {e['round_trip']['p95_ms']:>7.1f}ms")

    out = ROOT / "bench" / "results" / "page_paging.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "runs": info["runs"], "repeat": args.repeat, "bar_ms": BAR_MS, "import_s": info["import_s"],
        "deep_position": info["deep_position"], "filtered_total": info["filtered_total"],
        "pages": results, "baselines": baselines, "other": extra,
        "all_under_bar": all(r["ok"] for r in results),
    }, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What durable persistence costs the runner.

Runs one N-case suite (an async no-op Python target) three ways in one
process, so the ratios are comparable on a noisy machine:

  durable      the real runner writing every case row to a DuckDB file
               (group commit; each case `running` then terminal)
  no-persist   the same runner with case rows switched off (the run row still written)
  bulk-insert  DuckDB alone inserting N finished case rows in one statement:
               the floor for writing that much data

Prints a table and writes JSON (default bench/results/runner_overhead.json).
Bar: >= 5,000 durable cases/s, and durable costing <= 2x no-persist.

    .venv/bin/python bench/runner_overhead.py [--cases 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import duckdb  # noqa: E402

from evalrunner import log  # noqa: E402
from evalrunner.runner import RunOptions, run_suite  # noqa: E402
from evalrunner.store import DuckDBStore  # noqa: E402
from evalrunner.suites import suite_from_data  # noqa: E402

BAR_CASES_PER_S = 5000
BAR_RATIO = 2.0


async def noop(_input):
    return "ok"


def make_suite(n: int):
    return suite_from_data({
        "name": "overhead",
        "timeout_seconds": 10,
        "concurrency": 64,
        "lock_policy": "Allow",
        "target": {"python": {"callable": "runner_overhead:noop"}},
        "cases": [{"id": f"c{i:05d}", "input": i, "expected": "ok"} for i in range(n)],
    })


def time_runner(n: int, persist: bool, workdir: Path) -> float:
    suite = make_suite(n)
    db = workdir / f"runner-{persist}-{time.monotonic_ns()}.duckdb"
    with DuckDBStore.open(db) as store:
        start = time.perf_counter()
        result = asyncio.run(run_suite(suite, store, RunOptions(persist=persist, handle_signals=False)))
        elapsed = time.perf_counter() - start
        assert result.run.status == "completed", result.run
        stored = len(store.cases(result.run.id))
        assert stored == (n if persist else 0), stored
    return elapsed


def time_bulk_insert(n: int, workdir: Path) -> float:
    db = workdir / f"bulk-{time.monotonic_ns()}.duckdb"
    with DuckDBStore.open(db) as store:
        now = datetime.now(timezone.utc)
        ids = [f"bulk/c{i:05d}" for i in range(n)]
        start = time.perf_counter()
        store._cur().execute(
            "INSERT INTO eval_cases (id, run_id, name, status, created_at, started_at, completed_at, passed, score, "
            "output, duration_ms) SELECT unnest($1::VARCHAR[]), 'bulk', unnest($2::VARCHAR[]), 'completed', $3, $3, $3, "
            "true, 1.0, 'ok', 0.01",
            [ids, [i.split("/")[1] for i in ids], now],
        )
        elapsed = time.perf_counter() - start
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "runner_overhead.json"))
    args = parser.parse_args()
    log.configure("console", "warning")

    samples: dict[str, list[float]] = {"durable": [], "no-persist": [], "bulk-insert": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        time_runner(min(args.cases, 500), True, workdir)  # warm imports and caches
        for _ in range(args.repeat):  # interleaved, so drift hits all three alike
            samples["durable"].append(time_runner(args.cases, True, workdir))
            samples["no-persist"].append(time_runner(args.cases, False, workdir))
            samples["bulk-insert"].append(time_bulk_insert(args.cases, workdir))

    n = args.cases
    rows = {}
    for name, times in samples.items():
        best = min(times)
        rows[name] = {
            "seconds_best": best,
            "seconds_median": statistics.median(times),
            "cases_per_s": n / best,
            "ms_per_case": best * 1000 / n,
        }
    durable_vs_off = rows["durable"]["seconds_best"] / rows["no-persist"]["seconds_best"]
    durable_vs_bulk = rows["durable"]["seconds_best"] / rows["bulk-insert"]["seconds_best"]

    print(f"runner overhead: {n} cases, async no-op target, best of {args.repeat}")
    print(f"{'mode':<12} {'cases/s':>10} {'ms/case':>9} {'best s':>8} {'median s':>9}")
    for name, r in rows.items():
        print(f"{name:<12} {r['cases_per_s']:>10.0f} {r['ms_per_case']:>9.4f} {r['seconds_best']:>8.3f} {r['seconds_median']:>9.3f}")
    print(f"durable / no-persist = {durable_vs_off:.2f}x (bar <= {BAR_RATIO}x)")
    print(f"durable / bulk-insert = {durable_vs_bulk:.1f}x")
    ok = rows["durable"]["cases_per_s"] >= BAR_CASES_PER_S and durable_vs_off <= BAR_RATIO
    print(f"bar: >= {BAR_CASES_PER_S} durable cases/s and <= {BAR_RATIO}x: {'met' if ok else 'NOT met'}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "runner_overhead",
        "cases": n,
        "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "duckdb": duckdb.__version__},
        "modes": rows,
        "ratios": {"durable_vs_no_persist": durable_vs_off, "durable_vs_bulk_insert": durable_vs_bulk},
        "bar": {"cases_per_s": BAR_CASES_PER_S, "max_ratio": BAR_RATIO, "met": ok},
        "samples_s": samples,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

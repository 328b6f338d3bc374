"""A 10,000-case suite, end to end: the whole `evalrunner run` process, as a user times it.

Runs, interleaved so a noisy machine treats them alike:

  jsonl        `evalrunner run` of a suite whose cases come from a JSONL dataset
  yaml         the same cases inline in the suite file (YAML)
  python       a bare `python -c pass` (the floor of any process), and
  import       `python -c "import evalrunner.cli"` (what every command pays first)

each as a fresh process (median of --repeat), and in-process, the runner
itself: durable cases/s (every case row written, group commit) beside the same
runner with case persistence off. The target is an async no-op; logs stay at
warning level, as the console keeps per-case lines off while a progress bar is
shown. Prints a table and writes JSON (default bench/results/end_to_end.json).

Bars (this 2-core machine): jsonl median <= 1.2 s; yaml <= 2.5 s; durable >=
40,000 cases/s and at most 1.5x the run without persistence.

    .venv/bin/python bench/end_to_end.py [--cases 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BARS = {"jsonl_s": 1.2, "yaml_s": 2.5, "durable_cases_per_s": 40_000, "durable_over_no_persist": 1.5}
TARGET = "async def noop(value):\n    return value\n"


def write_suites(directory: Path, n: int) -> dict[str, Path]:
    (directory / "noop_target.py").write_text(TARGET)
    with (directory / "cases.jsonl").open("w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"c{i:05d}", "question": str(i), "answer": str(i)}) + "\n")
    header = "timeout_seconds: 5\nconcurrency: 64\nlock_policy: Allow\ntarget: {python: {callable: 'noop_target:noop'}}\n"
    jsonl = directory / "jsonl.yaml"
    jsonl.write_text("name: from-jsonl\n" + header +
                     "dataset: {path: cases.jsonl, id: id, input: question, expected: answer}\n")
    cases = "".join(f"  - {{id: c{i:05d}, input: '{i}', expected: '{i}'}}\n" for i in range(n))
    inline = directory / "inline.yaml"
    inline.write_text("name: inline\n" + header + "cases:\n" + cases)
    return {"jsonl": jsonl, "yaml": inline}


def evalrunner_argv() -> list[str]:
    script = Path(sys.executable).parent / "evalrunner"
    return [str(script)] if script.exists() else [sys.executable, "-m", "evalrunner.cli"]


def time_process(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "end_to_end.json"))
    args = parser.parse_args()

    import runner_overhead  # the in-process runner measurement, shared with bench/runner_overhead.py

    from evalrunner import log

    log.configure("json", "warning")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALRUNNER_")}
    samples: dict[str, list[float]] = {k: [] for k in ("python", "import", "jsonl", "yaml", "durable", "no_persist")}
    with tempfile.TemporaryDirectory(prefix="evalrunner-e2e-") as tmp:
        work = Path(tmp)
        suites = write_suites(work, args.cases)
        for i in range(args.repeat):
            samples["python"].append(time_process([sys.executable, "-c", "pass"], env))
            samples["import"].append(time_process([sys.executable, "-c", "import evalrunner.cli"], env))
            for kind, suite in suites.items():
                db = work / f"{kind}-{i}.duckdb"
                samples[kind].append(time_process(
                    [*evalrunner_argv(), "--db", str(db), "--log-level", "warning", "run", str(suite),
                     "--no-progress"], env))
            samples["durable"].append(runner_overhead.time_runner(args.cases, True, work))
            samples["no_persist"].append(runner_overhead.time_runner(args.cases, False, work))

    median = {k: statistics.median(v) for k, v in samples.items()}
    durable_rate = args.cases / median["durable"]
    ratio = median["durable"] / median["no_persist"]
    checks = {
        "jsonl_s": median["jsonl"] <= BARS["jsonl_s"],
        "yaml_s": median["yaml"] <= BARS["yaml_s"],
        "durable_cases_per_s": durable_rate >= BARS["durable_cases_per_s"],
        "durable_over_no_persist": ratio <= BARS["durable_over_no_persist"],
    }
    rows = [
        ("python -c pass (floor)", median["python"], None),
        ("import evalrunner.cli", median["import"], None),
        (f"evalrunner run, {args.cases:,} cases from JSONL", median["jsonl"], BARS["jsonl_s"]),
        (f"evalrunner run, {args.cases:,} cases inline YAML", median["yaml"], BARS["yaml_s"]),
        (f"runner in process, durable ({durable_rate:,.0f} cases/s)", median["durable"], None),
        (f"runner in process, no persistence ({args.cases / median['no_persist']:,.0f} cases/s)",
         median["no_persist"], None),
    ]
    print(f"end to end: {args.cases:,} no-op cases, median of {args.repeat}")
    print(f"{'what':58} {'median s':>9} {'min s':>7} {'bar s':>6}")
    keys = ["python", "import", "jsonl", "yaml", "durable", "no_persist"]
    for (what, value, bar), key in zip(rows, keys):
        print(f"{what:58} {value:9.3f} {min(samples[key]):7.3f} {'' if bar is None else f'{bar:6.1f}'}")
    print(f"durable / no-persist = {ratio:.2f}x (bar <= {BARS['durable_over_no_persist']}x); "
          f"durable {durable_rate:,.0f} cases/s (bar >= {BARS['durable_cases_per_s']:,})")
    print(f"JSONL run / python floor = {median['jsonl'] / median['python']:.1f}x; "
          f"YAML run / JSONL run = {median['yaml'] / median['jsonl']:.2f}x")
    print("bars: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in checks.items()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": datetime.now(timezone.utc).isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "cases": args.cases, "repeat": args.repeat, "samples_s": samples, "median_s": median,
        "durable_cases_per_s": durable_rate, "durable_over_no_persist": ratio, "bars": BARS, "met": checks,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

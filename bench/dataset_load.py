"""Loading a suite whose cases come from a dataset file: JSON Lines, CSV and Parquet, 10,000 and 100,000 rows.

Each file has an id, a question, an answer and a metadata column; the suite
maps all four. Loads are interleaved across formats and sizes (median and
best of --repeat), in one process, as `evalrunner run` does before it runs a
case: `suites.load_suite`, which reads the file with DuckDB and builds the
cases. Prints a table and writes JSON (default bench/results/dataset_load.json).

Bar (this 2-core machine): 10,000 JSON Lines rows well under 0.3 s (the whole
`evalrunner run` of them has a 1.2 s bar; see end_to_end.py).

    .venv/bin/python bench/dataset_load.py [--repeat 7]
"""

from __future__ import annotations

import argparse
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

import duckdb  # noqa: E402

from evalrunner.suites import load_suite  # noqa: E402

SIZES = (10_000, 100_000)
FORMATS = ("jsonl", "csv", "parquet")
BAR_10K_JSONL_S = 0.3


def write_files(directory: Path, n: int) -> dict[str, Path]:
    jsonl = directory / f"cases-{n}.jsonl"
    with jsonl.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"c{i:06d}", "question": f"{i}+1", "answer": str(i + 1),
                                  "topic": f"t{i % 10}"}) + "\n")
    paths = {"jsonl": jsonl}
    with duckdb.connect() as con:
        for fmt, options in (("csv", "FORMAT csv, HEADER"), ("parquet", "FORMAT parquet")):
            paths[fmt] = directory / f"cases-{n}.{fmt}"
            con.execute(f"COPY (SELECT * FROM read_json('{jsonl}')) TO '{paths[fmt]}' ({options})")
    suites = {}
    for fmt, path in paths.items():
        suites[fmt] = directory / f"suite-{n}-{fmt}.yaml"
        suites[fmt].write_text(
            f"name: load-{n}-{fmt}\ntarget: {{python: {{callable: 'targets:noop'}}}}\n"
            f"dataset: {{path: {path.name}, id: id, input: question, expected: answer, metadata: [topic]}}\n")
    return suites


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dataset_load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        suites = {n: write_files(Path(tmp), n) for n in SIZES}
        for n in SIZES:  # warm the page cache and the imports
            for fmt in FORMATS:
                assert len(load_suite(suites[n][fmt]).cases) == n
        times: dict[tuple[int, str], list[float]] = {(n, fmt): [] for n in SIZES for fmt in FORMATS}
        for _ in range(args.repeat):
            for n in SIZES:
                for fmt in FORMATS:
                    started = time.perf_counter()
                    load_suite(suites[n][fmt])
                    times[(n, fmt)].append(time.perf_counter() - started)

    results = {f"{fmt}_{n}": {"median_s": round(statistics.median(t), 4), "best_s": round(min(t), 4)}
               for (n, fmt), t in times.items()}
    print(f"{'rows':>8}  {'format':8}  {'median s':>9}  {'best s':>7}")
    for (n, fmt), t in times.items():
        print(f"{n:>8,}  {fmt:8}  {statistics.median(t):9.3f}  {min(t):7.3f}")
    within = results["jsonl_10000"]["median_s"] <= BAR_10K_JSONL_S
    print(f"bar: 10,000 JSON Lines rows <= {BAR_10K_JSONL_S} s: {'met' if within else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": datetime.now(timezone.utc).isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "repeat": args.repeat, "results": results, "bar_10k_jsonl_s": BAR_10K_JSONL_S, "bar_met": within,
    }, indent=2) + "\n")
    return 0 if within else 1


if __name__ == "__main__":
    raise SystemExit(main())

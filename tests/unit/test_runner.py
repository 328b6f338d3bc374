"""The runner in process, on a real DuckDB file: concurrency, isolation, durability, faults."""

from __future__ import annotations

import asyncio
import signal
import textwrap
from pathlib import Path

import pytest

from evalrunner.faults import Faults
from evalrunner.runner import RunOptions, StatusWriteFailed, run_suite
from evalrunner.store import DuckDBStore
from evalrunner.suites import parse_suite, suite_from_data
from evalrunner.summary import spooler

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "suites"


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "runs.duckdb", faults=Faults(""))
    yield s
    s.close()


@pytest.fixture
def targets_module(tmp_path):
    """A module of targets that record what the runner did to them."""
    (tmp_path / "probe_targets.py").write_text(textwrap.dedent("""
        import asyncio, time
        state = {"active": 0, "peak": 0, "started": [], "release": None}

        async def tracked(x):
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            state["started"].append(x)
            try:
                if x == "raise":
                    raise ValueError("bad input for this case")
                if x == "hang":
                    await asyncio.sleep(30)
                if x == "wait":
                    while state["release"] is None or not state["release"].is_set():
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                return x
            finally:
                state["active"] -= 1
    """))
    import importlib
    import sys

    sys.path.insert(0, str(tmp_path))
    module = importlib.import_module("probe_targets")
    yield module
    sys.path.remove(str(tmp_path))
    sys.modules.pop("probe_targets", None)


def suite_yaml(cases: list[str], concurrency: int = 2, timeout: float = 1.0, name: str = "probe") -> str:
    lines = "\n".join(f"  - {{id: c{i}-{c}, input: {c}, expected: {c}}}" for i, c in enumerate(cases))
    return (
        f"name: {name}\ntimeout_seconds: {timeout}\nconcurrency: {concurrency}\n"
        f"target: {{python: {{callable: 'probe_targets:tracked'}}}}\ncases:\n{lines}\n"
    )


def run(suite, store, **options):
    options.setdefault("handle_signals", False)
    return asyncio.run(run_suite(suite, store, RunOptions(**options)))


def test_concurrency_is_bounded_and_bad_cases_do_not_cancel_siblings(store, targets_module, logs):
    suite = parse_suite(suite_yaml(["a", "raise", "b", "hang", "c", "d", "e"], concurrency=3, timeout=0.5))
    result = run(suite, store)

    assert targets_module.state["peak"] == 3
    assert result.run.status == "completed"
    cases = {c.name: c for c in store.cases(result.run.id)}
    assert cases["c1-raise"].status == "failed" and cases["c1-raise"].cause == "case_raised"
    assert "ValueError: bad input for this case" in cases["c1-raise"].error
    assert cases["c3-hang"].status == "failed" and cases["c3-hang"].cause == "case_timeout"
    assert "timed out after 0.5s" in cases["c3-hang"].error
    siblings = [c for n, c in cases.items() if n not in ("c1-raise", "c3-hang")]
    assert all(c.status == "completed" and c.passed for c in siblings)
    assert (result.run.passed, result.run.failed, result.run.errored) == (5, 0, 2)

    completed = logs.events("eval.suite_completed")
    assert completed and completed[0]["run_id"] == result.run.id and completed[0]["suite"] == "probe"
    case_events = logs.events("eval.case_completed") + logs.events("eval.case_failed")
    assert len(case_events) == 7
    assert all(e["run_id"] == result.run.id and e["suite"] == "probe" and e["case_id"].startswith(result.run.id + "/")
               for e in case_events)


def test_case_row_is_running_while_it_runs_and_durable_at_once(store, targets_module, tmp_path):
    """A case's `running` row is committed within the group-commit window, before the case ends."""
    suite = parse_suite(suite_yaml(["wait"], concurrency=1, timeout=5))
    seen = {}

    async def main():
        targets_module.state["release"] = asyncio.Event()
        task = asyncio.create_task(run_suite(suite, store, RunOptions(handle_signals=False, flush_interval_s=0.05)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 3:
            rows = store._con.cursor().execute("SELECT status FROM eval_cases").fetchall()
            if rows:
                seen["status"], seen["after_s"] = rows[0][0], loop.time() - start
                break
            await asyncio.sleep(0.005)
        targets_module.state["release"].set()
        return await task

    result = asyncio.run(main())
    assert seen["status"] == "running"
    assert seen["after_s"] < 2.0  # the 50 ms group commit, with room for a loaded machine
    assert store.cases(result.run.id)[0].status == "completed" and result.run.status == "completed"


def test_case_save_failure_is_logged_and_the_suite_still_terminates(tmp_path, logs):
    """Runbook case 1: the per-case persistence path fails for one case."""
    suite_file = EXAMPLES / "smoke.yaml"
    from evalrunner.suites import load_suite

    suite = load_suite(suite_file)
    with DuckDBStore.open(tmp_path / "db.duckdb", faults=Faults("case_save=mul")) as store:
        result = run(suite, store, search_path=(str(EXAMPLES),))
        cases = {c.name: c for c in store.cases(result.run.id)}
        final = store.get_run(result.run.id)

    (event,) = logs.events("eval.case_save_failed")
    assert event["case_id"] == f"{result.run.id}/mul" and event["run_id"] == result.run.id
    assert "injected fault" in event["error"]
    assert final.status != "running"
    assert cases["mul"].status == "failed" and cases["mul"].cause == "case_save_failed"
    assert "could not be saved" in cases["mul"].error
    assert all(c.status == "completed" and c.passed for n, c in cases.items() if n != "mul")
    assert (final.passed, final.errored) == (5, 1)


def test_final_status_write_failure_is_logged_and_reraised_with_the_original(tmp_path, logs):
    """Runbook case 2, in process: the final write fails; the event carries the traceback."""
    from evalrunner.suites import load_suite

    suite = load_suite(EXAMPLES / "smoke.yaml")
    db = tmp_path / "db.duckdb"
    with DuckDBStore.open(db, faults=Faults("suite_status_write=*")) as store:
        with pytest.raises(StatusWriteFailed) as exc:
            run(suite, store, search_path=(str(EXAMPLES),), keep_summary=spooler(str(db)))
        run_id = exc.value.run_id
        assert store.get_run(run_id).status == "running"  # stuck, as the runbook describes
        assert all(c.status == "completed" for c in store.cases(run_id))  # no case result lost

    (event,) = logs.events("eval.suite_status_write_failed")
    assert event["run_id"] == run_id and event["intended_status"] == "completed"
    assert "Traceback" in event["exception"] and "IOException" in event["exception"]
    assert "injected fault at suite_status_write" in str(exc.value.write_error)
    assert (tmp_path / "db.duckdb.unwritten" / f"{run_id}.json").exists()


def test_status_write_failure_after_a_failure_keeps_the_original_error(tmp_path, logs, targets_module):
    """The failure write must not mask why the run failed."""
    suite = parse_suite(suite_yaml(["wait", "wait"], concurrency=2, timeout=5))

    with DuckDBStore.open(tmp_path / "db.duckdb", faults=Faults("suite_status_write=*")) as store:
        async def scenario():
            targets_module.state["release"] = asyncio.Event()
            task = asyncio.create_task(run_suite(suite, store, RunOptions(handle_signals=True)))
            while targets_module.state["active"] < 2:  # both cases in flight
                await asyncio.sleep(0.01)
            signal.raise_signal(signal.SIGTERM)
            return await task

        with pytest.raises(StatusWriteFailed) as exc:
            asyncio.run(scenario())
    assert "shutdown requested (SIGTERM)" in str(exc.value)
    (event,) = logs.events("eval.suite_status_write_failed")
    assert event["intended_status"] == "failed" and event["cause"] == "shutdown_requested"
    assert event["original_error"] == "shutdown requested (SIGTERM)"


def test_persistence_can_be_switched_off_for_benchmarks(store, targets_module):
    suite = parse_suite(suite_yaml(["a", "b"]))
    result = run(suite, store, persist=False)
    assert result.run.status == "completed"
    assert store.cases(result.run.id) == []


def test_every_case_of_a_large_fast_suite_is_stored(store, tmp_path):
    """Regression: closing the recorder used to cancel an in-flight batch, losing every case of a fast suite."""
    (tmp_path / "fast_targets.py").write_text("async def noop(x):\n    return 'ok'\n")
    cases = [{"id": f"c{i:05d}", "input": i, "expected": "ok"} for i in range(5000)]
    suite = suite_from_data({"name": "fast", "timeout_seconds": 5, "concurrency": 64,
                             "target": {"python": {"callable": "fast_targets:noop"}}, "cases": cases})
    result = run(suite, store, search_path=(str(tmp_path),))
    assert result.run.passed == 5000
    assert len(store.cases(result.run.id)) == 5000

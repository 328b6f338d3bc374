"""The runner API refuses what it must not store: another run's rows, unknown causes, malformed bodies.

Every request here goes over real HTTP to the real aiohttp app backed by a
real DuckDB file. A refusal is a 4xx whose JSON body names the field, never
a 500 or a plain-text traceback, and it changes nothing that is stored.
"""

from __future__ import annotations

from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.owner import this_process
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow


def snapshot(store: DuckDBStore):
    """Everything stored, to compare before and after a refused request."""
    cur = store._cur()
    return (cur.execute("SELECT * FROM eval_runs ORDER BY id").fetchall(),
            cur.execute("SELECT * FROM eval_cases ORDER BY id").fetchall())



def test_the_store_never_moves_a_case_row_to_another_run(tmp_path):
    """Defence in depth below the API: a case row stays with the run that wrote it first."""
    store = DuckDBStore.open(tmp_path / "store.duckdb", faults=Faults(""))
    try:
        def start(run_id):
            return store.start_run(RunRequest("s", ("c1",), 5, this_process(), run_id=run_id, admitted=True)).run.id

        victim, attacker = start("r1/x"), start("r1")  # ids the API refuses; the store must hold anyway
        now = utcnow()
        store.save_cases([CaseEvent(f"{victim}/c1", victim, "c1", "running", now)])
        before = snapshot(store)[1]
        # The attacker's case "x/c1" has the row id "r1/x/c1": the victim's row.
        store.save_cases([CaseEvent(f"{victim}/c1", attacker, "x/c1", "completed", now, now, output="PWNED")])
        store.finish_run(attacker, RunStatus.FAILED, "manual", "x",
                         unsaved_cases={f"{victim}/c1": "claimed", f"{victim}/c9": "claimed"},
                         case_events=[CaseEvent(f"{victim}/c1", attacker, "x/c1", "completed", now, now, output="PWNED")])
        victims = [row for row in snapshot(store)[1] if row[0].startswith(f"{victim}/")]
        assert victims == [row for row in before if row[0].startswith(f"{victim}/")]
    finally:
        store.close()

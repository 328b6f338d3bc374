"""Bad input to suite files, databases and the CLI, given to the real `evalrunner` command.

Each is refused with exit 2 and a message that names the file and the field
(or the argument), never a traceback, and nothing already stored is lost:
the database keeps its runs, and a file that is not a usable database is
left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import EXAMPLES, cli_args, cli_env, read_run, read_runs, run_cli, write_suite

SMOKE = EXAMPLES / "smoke.yaml"
MIXED = EXAMPLES / "mixed.yaml"
HEAD = "name: x\ntarget: {command: {argv: [cat]}}\n"
# A refused input must not make the CLI grow past this, whatever the input asks for.
MEMORY_CAP_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Recorded:
    db: Path
    run_id: str


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """A database holding one finished run, which no refused command may lose or change."""
    db = tmp_path_factory.mktemp("recorded") / "runs.duckdb"
    result = run_cli(["run", SMOKE, "--json"], db)
    assert result.returncode == 0, result.stderr
    return Recorded(db, json.loads(result.stdout)["run"]["id"])


def assert_refused(result: subprocess.CompletedProcess[str], *said: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, result.stderr[-3000:]
    for text in said:
        assert text in result.stderr, (text, result.stderr[-3000:])


def assert_nothing_lost(recorded: Recorded) -> None:
    assert [r.id for r in read_runs(recorded.db)] == [recorded.run_id]
    run = read_run(recorded.db, recorded.run_id)
    assert run is not None and (run.status, run.passed) == ("completed", 6)


def run_capped(args: list[str], db: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`evalrunner` under an address-space cap, so an input that asks for unbounded memory fails the test,
    not the machine."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))

    return subprocess.run(cli_args(args, db, None), capture_output=True, text=True, env=cli_env(), timeout=timeout,
                          preexec_fn=cap)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- suite files


def test_deeply_nested_input_is_refused_naming_the_depth_limit(tmp_path: Path, recorded: Recorded) -> None:
    suite = write_suite(tmp_path, HEAD + "cases:\n  - id: a\n    input: " + "[" * 500 + "]" * 500 + "\n")
    result = run_cli(["run", suite], recorded.db, log_format=None)
    assert_refused(result, f"{suite}: cases[0 (id=a)].input", "nested deeper than 100 levels")
    assert_nothing_lost(recorded)


def test_a_device_as_suite_file_is_refused_without_reading_it(recorded: Recorded) -> None:
    result = run_capped(["run", "/dev/zero"], recorded.db)
    assert_refused(result, "/dev/zero: not a regular file")
    assert_nothing_lost(recorded)


def test_an_oversized_suite_file_is_refused_after_reading_no_more_than_the_limit(
        tmp_path: Path, recorded: Recorded) -> None:
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as file:
        file.truncate(4 * 1024**3)  # sparse: 4 GiB to read, none of it on disk
    result = run_capped(["run", huge], recorded.db)
    assert_refused(result, f"{huge}: file is larger than the limit of 16 MiB")
    assert_nothing_lost(recorded)


def test_billion_laughs_is_refused_quickly_and_in_bounded_memory(tmp_path: Path, recorded: Recorded) -> None:
    lines = ["cases:", "  - id: a", "    metadata:", "      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 9):
        lines.append(f"      l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    lines.append("    input: [" + ", ".join(["*l8"] * 9) + "]")
    suite = write_suite(tmp_path, HEAD + "\n".join(lines) + "\n")
    result = run_capped(["run", suite], recorded.db, timeout=30)
    assert_refused(result, f"{suite}: cases[0 (id=a)]", "aliases expand the suite by more than 1000000 values")
    assert_nothing_lost(recorded)


def test_a_boolean_is_not_a_number_of_seconds(tmp_path: Path, recorded: Recorded) -> None:
    suite = write_suite(tmp_path, HEAD + "timeout_seconds: true\ncases: [{id: a, input: b}]\n")
    result = run_cli(["run", suite], recorded.db, log_format=None)
    assert_refused(result, f"{suite}: timeout_seconds: must be a number; got true")
    assert_nothing_lost(recorded)


def test_a_key_given_twice_is_refused_naming_the_key_and_its_lines(tmp_path: Path, recorded: Recorded) -> None:
    suite = write_suite(tmp_path, HEAD + "cases:\n  - id: a\n    input: b\n    input: c\n")
    result = run_cli(["run", suite], recorded.db, log_format=None)
    assert_refused(result, f"{suite}: cases[0 (id=a)].input: given twice (lines 5 and 6)")
    assert_nothing_lost(recorded)


def test_an_option_the_scorer_does_not_have_is_refused_listing_its_options(
        tmp_path: Path, recorded: Recorded) -> None:
    suite = write_suite(tmp_path, HEAD + "cases: [{id: a, input: b, expected: b, scorer: {name: exact, tolerance: 1}}]\n")
    result = run_cli(["run", suite], recorded.db, log_format=None)
    assert_refused(result, f"{suite}: cases[0 (id=a)].scorer: the exact scorer has no option `tolerance`; "
                           "its options are case_sensitive, strip")
    assert_nothing_lost(recorded)


def test_a_deeply_nested_dataset_value_is_refused_naming_its_line(tmp_path: Path, recorded: Recorded) -> None:
    rows = tmp_path / "cases.jsonl"
    rows.write_text('{"id": "a", "input": "x"}\n{"id": "b", "input": ' + "[" * 5000 + "]" * 5000 + "}\n")
    suite = write_suite(tmp_path, HEAD + "dataset: {path: cases.jsonl}\n")
    result = run_cli(["run", suite], recorded.db, log_format=None)
    assert_refused(result, f"{suite}: dataset[line 2 (id=b)].input: nested deeper than 100 levels")
    assert_nothing_lost(recorded)


# ---------------------------------------------------------------- databases


def truncated_database(tmp_path: Path, size: int) -> Path:
    whole = tmp_path / "whole.duckdb"
    assert run_cli(["run", SMOKE], whole).returncode == 0
    cut = tmp_path / "cut.duckdb"
    cut.write_bytes(whole.read_bytes()[:size])
    return cut


@pytest.mark.parametrize("size", [20_000, 300_000])
@pytest.mark.parametrize("command", [["doctor"], ["runs"], ["verify"], ["show", "2026"]])
def test_a_truncated_database_is_named_as_such_and_left_untouched(tmp_path: Path, size: int, command: list[str]) -> None:
    db = truncated_database(tmp_path, size)
    before = file_digest(db)
    result = run_cli(command, db, log_format=None)
    assert_refused(result, f"the file at {db} is not a readable DuckDB database (truncated or corrupt")
    assert file_digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.duckdb", "whole.duckdb", "whole.duckdb.reserve"]


def test_a_sqlite_file_is_named_as_such_without_any_download(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (x)")
    before = file_digest(db)
    offline = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HOME": str(tmp_path)}
    for command in (["runs"], ["run", str(SMOKE)]):
        result = run_cli(command, db, env=offline, log_format=None)
        assert_refused(result, f"{db} is not a DuckDB database (it is a SQLite database)")
        assert "extension" not in result.stderr.lower()
    assert file_digest(db) == before
    assert not (tmp_path / ".duckdb").exists(), "nothing was installed"


def test_the_store_never_loads_or_installs_extensions_by_itself(tmp_path: Path) -> None:
    from evalrunner.store import DuckDBStore

    store = DuckDBStore.open(tmp_path / "db.duckdb")
    try:
        settings = store._cur().execute(
            "SELECT current_setting('autoload_known_extensions'), current_setting('autoinstall_known_extensions')"
        ).fetchone()
    finally:
        store.close()
    assert settings == (False, False)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "said"),
    [
        pytest.param(["runs", "--limit", "-1"], "--limit: must be a whole number of at least 1, not '-1'", id="limit"),
        pytest.param(["--log-level", "bogus", "runs"], "--log-level: invalid choice: 'bogus'", id="log-level"),
        pytest.param(["run", str(SMOKE), "--deadline-grace", "nan"],
                     "--deadline-grace: must be a number of seconds, 0 or more, not 'nan'", id="deadline-grace"),
        pytest.param(["run", str(SMOKE), "--junit", "/nonexistent/dir/x.xml"],
                     "--junit: cannot write /nonexistent/dir/x.xml: no such directory /nonexistent/dir", id="junit"),
    ],
)
def test_a_bad_argument_is_refused_before_anything_runs(args: list[str], said: str, recorded: Recorded) -> None:
    result = run_cli(args, recorded.db, log_format=None)
    assert_refused(result, said)
    assert_nothing_lost(recorded)


@pytest.mark.parametrize("args", [["show", ""], ["recover", ""], ["run", str(SMOKE), "--resume", ""]],
                         ids=["show", "recover", "resume"])
def test_an_empty_run_id_is_bad_input(args: list[str], recorded: Recorded) -> None:
    result = run_cli(args, recorded.db, log_format=None)
    assert_refused(result, "a run id cannot be empty")
    assert_nothing_lost(recorded)


# ---------------------------------------------------------------- reports


def test_junit_xml_stays_well_formed_with_terminal_escapes_in_an_output(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, """\
        name: colours
        target: {command: {argv: ["printf", "\\x1b[31mred\\x1b[0m\\x01"]}}
        cases: [{id: a, input: x, expected: green}]
        """)
    report = tmp_path / "report.xml"
    result = run_cli(["run", suite, "--junit", report], tmp_path / "db.duckdb", log_format=None)
    assert result.returncode == 1, result.stderr  # the case failed: its output is not "green"
    (case,) = ET.parse(report).getroot().iter("testcase")
    assert case.find("system-out").text == "\\x1b[31mred\\x1b[0m\\x01"


def test_reports_say_what_the_run_did_when_its_final_status_write_fails(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    result = run_cli(["run", MIXED, "--json", "--junit", report], tmp_path / "db.duckdb", log_format=None,
                     env={"EVALRUNNER_FAULTS": "suite_status_write=*"})
    assert result.returncode == 3, result.stderr
    said = json.loads(result.stdout)
    assert said["status_write_failed"].startswith("IOException: IO Error: injected fault at suite_status_write")
    assert (said["run"]["status"], said["run"]["passed"], said["run"]["failed"], said["run"]["errored"]) == (
        "completed", 2, 2, 2)
    assert sorted(c["status"] for c in said["cases"]) == ["completed"] * 4 + ["failed"] * 2
    root = ET.parse(report).getroot()
    assert len(list(root.iter("testcase"))) == 6
    properties = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert properties["run.status_write_failed"].startswith("IOException")

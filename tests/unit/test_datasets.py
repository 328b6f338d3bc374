"""Suites whose cases come from a dataset file: JSON Lines, CSV and Parquet, read with DuckDB.

Each format loads with its column mapping; a bad row is refused with its line
(JSON Lines, CSV) or row number (Parquet) and what is wrong, every one at once;
a 100,000-row file loads in well under a second or two.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from pydantic import ValidationError

from helpers import EXAMPLES, copy_example_targets, run_cli
from evalrunner import datasets, suite_yaml
from evalrunner.models import Case, Dataset
from evalrunner.suites import SuiteFileError, load_suite, parse_suite

HEADER = """\
name: data
target: {python: {callable: "targets:echo_json"}}
"""


def write_jsonl(path: Path, rows: list[Any], blank_lines_after: tuple[int, ...] = ()) -> Path:
    with path.open("w") as out:
        for index, row in enumerate(rows):
            out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if index in blank_lines_after:
                out.write("\n")
    return path


def write_parquet(path: Path, select: str) -> Path:
    with duckdb.connect() as con:
        con.execute(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    return path


def suite_with(tmp_path: Path, dataset: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "dataset: " + dataset + "\n")
    return path


def refusal(path: Path) -> list[str]:
    """The problems of a refused suite file, one line each, without the file name."""
    with pytest.raises(SuiteFileError) as info:
        load_suite(path)
    assert all(line.strip().startswith(f"{path}: ") for line in str(info.value).splitlines()[1:])
    return [f"{p}: {m}" if p else m for p, m in info.value.problems]


# ---------------------------------------------------------------- the formats


def test_jsonl_keeps_json_values_structured(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [
        {"id": "text", "question": "2+2", "answer": "4", "topic": "math"},
        {"id": "object", "question": {"a": [1, None]}, "answer": {"length": 12}, "topic": None},
        {"id": 7, "question": [1, 2], "answer": 2.5, "topic": {"nested": True}},
        {"id": "date-like", "question": "2024-01-01", "answer": False},
    ])
    suite = load_suite(suite_with(tmp_path, "{path: cases.jsonl, id: id, input: question, expected: answer, "
                                            "metadata: [topic]}"))
    assert [(c.id, c.input, c.expected, c.metadata) for c in suite.cases] == [
        ("text", "2+2", "4", {"topic": "math"}),
        ("object", {"a": [1, None]}, {"length": 12}, {"topic": None}),
        ("7", [1, 2], 2.5, {"topic": {"nested": True}}),  # a numeric id becomes its text
        ("date-like", "2024-01-01", False, {"topic": None}),  # no dates guessed; a missing key is None
    ]


def test_csv_cells_are_text(tmp_path):
    (tmp_path / "cases.csv").write_text('id,question,answer,topic\nq1,2+2,4,math\nq2,"multi\nline","a, b",\n')
    suite = load_suite(suite_with(tmp_path, "{path: cases.csv, input: question, expected: answer, metadata: [topic]}"))
    assert [(c.id, c.input, c.expected, c.metadata) for c in suite.cases] == [
        ("q1", "2+2", "4", {"topic": "math"}),
        ("q2", "multi\nline", "a, b", {"topic": None}),
    ]


def test_parquet_values_in_their_json_form(tmp_path):
    write_parquet(tmp_path / "cases.parquet", """
        SELECT * FROM (VALUES
            (1, 'q1', {'a': 1, 'b': [1, 2]}, 42, DATE '2024-01-02', '{"k": [true]}'::JSON),
            (2, 'q2', {'a': 2, 'b': []}, NULL, NULL, NULL)
        ) t(n, name, prompt, answer, day, extra)""")
    suite = load_suite(suite_with(tmp_path, "{path: cases.parquet, id: name, input: prompt, expected: answer, "
                                            "metadata: [n, day, extra]}"))
    assert [(c.id, c.input, c.expected, c.metadata) for c in suite.cases] == [
        ("q1", {"a": 1, "b": [1, 2]}, 42, {"n": 1, "day": "2024-01-02", "extra": {"k": [True]}}),
        ("q2", {"a": 2, "b": []}, None, {"n": 2, "day": None, "extra": None}),
    ]


def test_format_from_the_extension_or_as_set(tmp_path):
    write_jsonl(tmp_path / "cases.txt", [{"input": "x"}])
    assert "cannot tell the format of cases.txt" in refusal(suite_with(tmp_path, "{path: cases.txt}"))[0]
    assert [c.input for c in load_suite(suite_with(tmp_path, "{path: cases.txt, format: jsonl}")).cases] == ["x"]
    assert datasets.format_of(Path("a.NDJSON")) == "jsonl"
    assert datasets.format_of(Path("a.csv.gz")) == "csv"
    assert datasets.format_of(Path("a")) is None


def test_gzipped_jsonl_with_its_line_numbers(tmp_path):
    import gzip

    with gzip.open(tmp_path / "cases.jsonl.gz", "wt") as out:
        out.write('{"id": "a", "input": "x"}\n\n{"id": "b"}\n')
    assert refusal(suite_with(tmp_path, "{path: cases.jsonl.gz}")) == [
        "dataset[line 3 (id=b)].input: missing (no value in column 'input')"
    ]


# ---------------------------------------------------------------- the mapping and its defaults


def test_defaults_are_the_id_input_and_expected_columns(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [{"id": "a", "input": "x", "expected": "y", "other": 1}])
    [case] = load_suite(suite_with(tmp_path, "{path: cases.jsonl}")).cases
    assert (case.id, case.input, case.expected, case.metadata) == ("a", "x", "y", {})


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_without_an_id_column_ids_are_row_numbers(tmp_path, fmt):
    if fmt == "jsonl":
        write_jsonl(tmp_path / "cases.jsonl", [{"input": "a"}, {"input": "b"}], blank_lines_after=(0,))
    elif fmt == "csv":
        (tmp_path / "cases.csv").write_text("input,other\na,1\n\nb,2\n")
    else:
        write_parquet(tmp_path / "cases.parquet", "SELECT * FROM (VALUES ('a'), ('b')) t(input)")
    suite = load_suite(suite_with(tmp_path, f"{{path: cases.{fmt}}}"))
    assert [(c.id, c.input, c.expected) for c in suite.cases] == [("row-1", "a", None), ("row-2", "b", None)]


def test_the_suite_scorer_applies_to_every_row(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [{"input": "x", "expected": "^x$"}, {"input": "y", "expected": "(["}])
    path = tmp_path / "suite.yaml"
    path.write_text(HEADER + "scorer: regex\ndataset: {path: cases.jsonl}\n")
    [problem] = refusal(path)
    assert "invalid regular expression '(['" in problem  # checked at load time, as for inline cases
    path.write_text(HEADER + "scorer: {name: contains, case_sensitive: false}\ndataset: {path: cases.jsonl}\n")
    suite = load_suite(path)
    assert all(suite.scorer_for(c) == suite.scorer for c in suite.cases)
    assert suite.scorer.name == "contains"


def test_a_relative_path_is_taken_from_the_suite_file_s_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "cases.jsonl", [{"input": "x"}])
    suite_file = suite_with(tmp_path, "{path: data/cases.jsonl}")
    monkeypatch.chdir("/")
    assert len(load_suite(suite_file).cases) == 1
    absolute = tmp_path / "elsewhere.yaml"
    absolute.write_text(HEADER + f"dataset: {{path: {tmp_path / 'data' / 'cases.jsonl'}}}\n")
    assert len(load_suite(absolute).cases) == 1
    text = HEADER + "dataset: {path: data/cases.jsonl}\n"
    assert len(parse_suite(text, "inline", base_dir=tmp_path).cases) == 1


def test_cases_and_a_dataset_are_exclusive(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [{"input": "x"}])
    path = tmp_path / "suite.yaml"
    path.write_text(HEADER + "dataset: {path: cases.jsonl}\ncases: [{id: a, input: b}]\n")
    assert refusal(path) == ["cases: take the cases from `cases` or from `dataset`, not both"]
    path.write_text(HEADER + "dataset: {path: cases.jsonl, colour: red}\n")
    assert refusal(path) == ["dataset.colour: unknown field"]  # and no complaint about the missing cases


def test_a_dataset_takes_no_unknown_field(tmp_path):
    assert refusal(suite_with(tmp_path, "{path: x.jsonl, inputColumn: q}")) == ["dataset.inputColumn: unknown field"]


# ---------------------------------------------------------------- bad rows, with their lines


def test_bad_jsonl_rows_are_named_by_line_all_at_once(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [
        {"id": "a", "q": "1"},
        {"id": "a", "q": "2"},  # line 2
        {"id": "bad id!", "q": "3"},  # line 4, after a blank line
        {"id": "c"},  # line 5
        "{broken",  # line 6
        "[1, 2]",  # line 7
        {"q": "no id"},  # line 8
        {"id": "x" * 64, "q": "4"},  # line 9
    ], blank_lines_after=(1,))
    assert refusal(suite_with(tmp_path, "{path: cases.jsonl, input: q}")) == [
        "dataset[line 2].id: duplicate case id 'a' (first at line 1)",
        "dataset[line 4].id: 'bad id!' does not match the pattern ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        "dataset[line 5 (id=c)].input: missing (no value in column 'q')",
        "dataset[line 6]: not valid JSON",
        "dataset[line 7]: a JSON array, not an object",
        "dataset[line 8].id: missing (no value in column 'id')",
        f"dataset[line 9].id: '{'x' * 64}' does not match the pattern ^[A-Za-z0-9][A-Za-z0-9._-]{{0,62}}$",
    ]


def test_bad_csv_rows_are_named_by_the_line_they_start_on(tmp_path):
    (tmp_path / "cases.csv").write_text(
        "id,question\n"  # 1
        'a,"spans\ntwo lines"\n'  # 2-3
        "b\n"  # 4: a field short
        "\n"  # 5
        "c,\n"  # 6: no input
        "a,again\n"  # 7: duplicate
        "d,x,extra\n"  # 8: a field too many
        "e e,y\n"  # 9: bad id
    )
    assert refusal(suite_with(tmp_path, "{path: cases.csv, input: question}")) == [
        "dataset[line 4]: malformed CSV row: Expected Number of Columns: 2 Found: 1",
        "dataset[line 6 (id=c)].input: missing (no value in column 'question')",
        "dataset[line 7].id: duplicate case id 'a' (first at line 2)",
        "dataset[line 8]: malformed CSV row: Expected Number of Columns: 2 Found: 3",
        "dataset[line 9].id: 'e e' does not match the pattern ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    ]


def test_in_a_one_column_csv_a_blank_line_is_an_empty_cell(tmp_path):
    (tmp_path / "cases.csv").write_text("input\na\n\nb\n")
    assert refusal(suite_with(tmp_path, "{path: cases.csv}")) == [
        "dataset[line 3 (id=row-2)].input: missing (no value in column 'input')"
    ]


def test_bad_parquet_rows_are_named_by_row_number(tmp_path):
    write_parquet(tmp_path / "cases.parquet",
                  "SELECT * FROM (VALUES ('a', 'x'), (NULL, 'y'), ('a', 'z'), ('b', NULL), ('c/d', 'w')) t(id, input)")
    assert refusal(suite_with(tmp_path, "{path: cases.parquet}")) == [
        "dataset[row 2].id: missing (no value in column 'id')",
        "dataset[row 3].id: duplicate case id 'a' (first at row 1)",
        "dataset[row 4 (id=b)].input: missing (no value in column 'input')",
        "dataset[row 5].id: 'c/d' does not match the pattern ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    ]


def test_many_bad_rows_are_summed_up_after_the_first_ones(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [{"id": "same", "input": str(i)} for i in range(1000)])
    problems = refusal(suite_with(tmp_path, "{path: cases.jsonl}"))
    assert len(problems) == datasets.MAX_ROW_PROBLEMS + 1
    assert problems[0] == "dataset[line 2].id: duplicate case id 'same' (first at line 1)"
    assert problems[-1] == f"dataset: {999 - datasets.MAX_ROW_PROBLEMS} more problem(s) in other rows not shown"


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("files", "dataset", "expected"),
    [
        pytest.param({}, "{path: absent.jsonl}", "dataset.path: no such file: ", id="missing-file"),
        pytest.param({"d/": None}, "{path: d, format: csv}", "dataset.path: ", id="directory"),
        pytest.param({"c.csv": "id,q\na,b\n"}, "{path: c.csv, input: question}",
                     "dataset.input: unknown column 'question'; the file's columns: id, q", id="csv-unknown-column"),
        pytest.param({"c.csv": "id,q\na,b\n"}, "{path: c.csv}",
                     "dataset.input: unknown column 'input' (the default; name the input column with `input:`)",
                     id="csv-default-input"),
        pytest.param({"c.csv": "id,q\na,b\n"}, "{path: c.csv, input: q, metadata: [q, topic]}",
                     "dataset.metadata[1]: unknown column 'topic'", id="csv-unknown-metadata"),
        pytest.param({"c.jsonl": '{"id": "a", "q": 1}\n'}, "{path: c.jsonl, input: question}",
                     "dataset.input: no row has the key 'question'; the rows' keys: id, q", id="jsonl-unknown-key"),
        pytest.param({"c.jsonl": '{"id": "a", "q": 1}\n'}, "{path: c.jsonl, input: q, id: qid}",
                     "dataset.id: no row has the key 'qid'", id="jsonl-unknown-id"),
        pytest.param({"c.jsonl": "id,q\na,b\n"}, "{path: c.jsonl}", "is not JSON Lines", id="csv-named-jsonl"),
        pytest.param({"c.jsonl": '{"input": "x"}\n'}, "{path: c.jsonl, format: parquet}",
                     "as Parquet: ", id="wrong-format"),
        pytest.param({"c.csv": 'id,q\na,"unterminated\n'}, "{path: c.csv, input: q}", "as CSV: ", id="unreadable-csv"),
        pytest.param({"c.jsonl": ""}, "{path: c.jsonl}", "has no rows; a suite needs at least 1 case", id="empty"),
        pytest.param({"c.csv": "id,input\n"}, "{path: c.csv}", "has no rows", id="header-only"),
    ],
)
def test_a_bad_file_is_named_with_what_is_wrong(tmp_path, files, dataset, expected):
    for name, text in files.items():
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text)
    problems = refusal(suite_with(tmp_path, dataset))
    assert any(expected in p for p in problems), problems


def test_a_bad_dataset_exits_2_with_every_problem(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [{"id": "a"}, {"id": "a", "input": "x"}])
    result = run_cli(["run", suite_with(tmp_path, "{path: cases.jsonl}")], tmp_path / "x.duckdb")
    assert result.returncode == 2, result.stderr
    assert "dataset[line 1 (id=a)].input: missing" in result.stderr
    assert "dataset[line 2].id: duplicate case id 'a' (first at line 1)" in result.stderr


# ---------------------------------------------------------------- size and speed


def test_a_100k_row_dataset_loads_and_runs_fast_enough(tmp_path):
    n = 100_000
    write_jsonl(tmp_path / "cases.jsonl",
                [{"id": f"c{i:06d}", "question": str(i), "answer": str(i), "topic": i % 7} for i in range(n)])
    suite_file = suite_with(tmp_path, "{path: cases.jsonl, input: question, expected: answer, metadata: [topic]}")
    started = time.perf_counter()
    suite = load_suite(suite_file)
    elapsed = time.perf_counter() - started
    assert len(suite.cases) == n
    assert suite.cases[-1] == Case(id="c099999", input="99999", expected="99999", metadata={"topic": 99999 % 7})
    assert elapsed < 5, f"loading {n:,} rows took {elapsed:.2f} s"  # about 0.5 s here; bounded loosely for CI


def test_cases_built_from_rows_are_the_cases_pydantic_builds(tmp_path):
    write_jsonl(tmp_path / "cases.jsonl", [{"id": "a", "input": {"x": 1}, "expected": [1], "m": "v"}])
    [case] = datasets.read_cases(Dataset(path="cases.jsonl", metadata=["m"]), tmp_path)
    validated = Case.model_validate({"id": "a", "input": {"x": 1}, "expected": [1], "metadata": {"m": "v"}})
    assert case == validated
    assert case.model_fields_set == validated.model_fields_set
    assert case.model_dump() == validated.model_dump()
    assert case.model_copy(update={"expected": 2}).expected == 2
    with pytest.raises(ValidationError, match="frozen"):
        case.id = "b"  # frozen, like any Case


# ---------------------------------------------------------------- the YAML loader and the examples


def test_the_fast_yaml_loader_is_used_and_keeps_line_numbers(tmp_path):
    assert suite_yaml.YAML_LOADER is getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with pytest.raises(SuiteFileError, match=r"bad YAML: line 4, column 1: "):
        parse_suite("name: x\ncases:\n  - {id: a, input: [unclosed\n")


def test_the_example_dataset_suite_passes(tmp_path):
    suite = load_suite(EXAMPLES / "arithmetic.yaml")
    assert suite.dataset is not None and len(suite.cases) == 12
    assert suite.cases[0].metadata == {"topic": "addition", "difficulty": 1}
    result = run_cli(["run", EXAMPLES / "arithmetic.yaml"], tmp_path / "x.duckdb")
    assert result.returncode == 0, result.stderr


def test_a_suite_beside_its_targets_reads_its_dataset_from_a_relative_path(tmp_path):
    copy_example_targets(tmp_path)
    write_jsonl(tmp_path / "cases.jsonl", [{"id": "one", "input": {"a": 1}, "expected": {"echo": {"a": 1},
                                                                                          "length": 8}}])
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(textwrap.dedent("""\
        name: echo
        target: {python: {callable: "targets:echo_json"}}
        scorer: json_equal
        dataset: {path: cases.jsonl}
        """))
    result = run_cli(["run", suite_file, "--json"], tmp_path / "x.duckdb", cwd="/")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run"]["passed"] == 1

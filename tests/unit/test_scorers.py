"""Each scorer's pass and fail, and how a suite author's mistakes surface."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from evalrunner.models import Case, Scorer, Suite
from evalrunner.scorers import Score, ScorerError, build_scorer, check_patterns
from evalrunner.suites import suite_from_data

CASE = Case(id="c1", input="q")


def score(spec: Scorer | str, output: Any, expected: Any) -> Score:
    scorer_spec = spec if isinstance(spec, Scorer) else Scorer(name=spec)  # type: ignore[arg-type]
    return build_scorer(scorer_spec)(output, expected, CASE)


def test_exact() -> None:
    assert score("exact", "  Paris\n", "Paris") == Score(True, 1.0)
    failed = score("exact", "paris", "Paris")
    assert (failed.passed, failed.score) == (False, 0.0)
    assert failed.detail == "expected 'Paris', got 'paris'"
    assert score(Scorer(name="exact", case_sensitive=False), "PARIS", "paris").passed
    assert not score(Scorer(name="exact", strip=False), " Paris", "Paris").passed
    assert score("exact", 42, 42).passed  # non-strings compare as JSON text
    assert score("exact", {"a": 1}, '{"a": 1}').passed


def test_contains() -> None:
    assert score("contains", "The capital is Paris.", "Paris").passed
    assert not score("contains", "The capital is paris.", "Paris").passed
    assert score(Scorer(name="contains", case_sensitive=False), "PARIS!", "paris").passed
    assert score("contains", [1, 2, 3], "2, 3").passed


def test_regex() -> None:
    assert score("regex", "order #1234 placed", r"#\d{4}\b").passed
    failed = score("regex", "no order", r"#\d+")
    assert not failed.passed and "does not match" in (failed.detail or "")
    assert score(Scorer(name="regex", case_sensitive=False), "HELLO", "^hello$").passed
    with pytest.raises(ScorerError, match="invalid regular expression 'a\\(b'"):
        score("regex", "x", "a(b")
    with pytest.raises(ScorerError, match="needs `expected` to be a pattern string"):
        score("regex", "x", 5)


def test_check_patterns_names_the_case() -> None:
    suite_data = {
        "name": "s",
        "target": {"command": {"argv": ["cat"]}},
        "scorer": "regex",
        "cases": [
            {"id": "ok", "input": "x", "expected": "a+"},
            {"id": "bad", "input": "x", "expected": "[z"},
            {"id": "other", "input": "x", "expected": "[z", "scorer": "exact"},
        ],
    }
    problems = check_patterns(Suite.model_validate(suite_data))
    assert [path for path, _ in problems] == ["cases[1 (id=bad)].expected"]
    assert "invalid regular expression '[z'" in problems[0][1]
    with pytest.raises(ValueError, match=r"cases\[1 \(id=bad\)\]\.expected"):
        suite_from_data(suite_data, "inline")


def test_json_equal() -> None:
    assert score("json_equal", '{"b": [1, 2], "a": {"x": null}}', {"a": {"x": None}, "b": [1, 2]}).passed
    assert score("json_equal", {"n": 1.0}, '{"n": 1}').passed
    failed = score("json_equal", '{"a": {"x": [1, 2, 4]}}', {"a": {"x": [1, 2, 3]}})
    assert not failed.passed and failed.detail == "$.a.x[2]: expected '3', got '4'"
    assert score("json_equal", {"a": 1, "b": 2}, {"a": 1}).detail == "$.b: unexpected key"
    assert score("json_equal", {}, {"a": 1}).detail == "$.a: missing"
    assert score("json_equal", [1], [1, 2]).detail == "$: expected 2 items, got 1"
    assert not score("json_equal", "true", 1).passed  # JSON true is not 1
    not_json = score("json_equal", "Sure! {\"a\": 1}", {"a": 1})
    assert not not_json.passed and "output is not JSON" in (not_json.detail or "")
    with pytest.raises(ScorerError, match="not JSON"):
        score("json_equal", "{}", "{oops")


def test_numeric() -> None:
    assert score("numeric", "The answer is 42.", 42).passed
    assert score("numeric", 3.5, "3.5").passed
    assert score("numeric", "-1.5e3 units", -1500).passed
    failed = score("numeric", "41", 42)
    assert (failed.passed, failed.score) == (False, 0.0)
    assert "difference 1" in (failed.detail or "")
    unparsable = score("numeric", "no idea", 42)
    assert not unparsable.passed and "no number in output" in (unparsable.detail or "")
    with pytest.raises(ScorerError, match="needs a number in `expected`"):
        score("numeric", "1", "n/a")


def test_numeric_tolerance_edges() -> None:
    absolute = Scorer(name="numeric", tolerance=0.01)
    assert score(absolute, "1.01", 1.0).passed  # exactly at the edge, despite float rounding
    assert not score(absolute, "1.0101", 1.0).passed
    assert score("numeric", 0.1 + 0.2, 0.3).passed
    relative = Scorer(name="numeric", relative_tolerance=0.1)
    assert score(relative, "110", 100).passed
    assert not score(relative, "110.5", 100).passed


@pytest.fixture()
def custom_module(tmp_path: Path) -> str:
    (tmp_path / "scorers_mod_a.py").write_text(
        textwrap.dedent(
            """\
            from evalrunner.scorers import Score
            def as_bool(output, expected, case):
                return output == expected
            def as_float(output, expected, case):
                return float(output)
            def as_tuple(output, expected, case):
                return (output == expected, 0.25, f"case {case.id}")
            def as_score(output, expected, case):
                return Score(True, 0.9, "fine")
            def as_nonsense(output, expected, case):
                return "yes"
            def out_of_range(output, expected, case):
                return 1.5
            def raising(output, expected, case):
                raise RuntimeError("scorer bug")
            async def asynchronous(output, expected, case):
                return True
            """
        )
    )
    return str(tmp_path)


def custom(directory: str, name: str, output: Any, expected: Any = None) -> Score:
    spec = Scorer(name="custom", callable=f"scorers_mod_a:{name}")
    return build_scorer(spec, [directory])(output, expected, CASE)


def test_custom_results(custom_module: str) -> None:
    assert custom(custom_module, "as_bool", "a", "a") == Score(True, 1.0)
    assert custom(custom_module, "as_bool", "a", "b") == Score(False, 0.0)
    assert custom(custom_module, "as_float", "0.5") == Score(True, 0.5)  # passes at >= 0.5
    assert custom(custom_module, "as_float", "0.49") == Score(False, 0.49)
    assert custom(custom_module, "as_tuple", "a", "a") == Score(True, 0.25, "case c1")
    assert custom(custom_module, "as_score", "a") == Score(True, 0.9, "fine")


def test_custom_misuse(custom_module: str) -> None:
    with pytest.raises(ScorerError, match="returned str 'yes'"):
        custom(custom_module, "as_nonsense", "a")
    with pytest.raises(ScorerError, match=r"scores lie in \[0, 1\]"):
        custom(custom_module, "out_of_range", "a")
    with pytest.raises(ScorerError, match="raised RuntimeError: scorer bug"):
        custom(custom_module, "raising", "a")
    with pytest.raises(ScorerError, match="is async"):
        custom(custom_module, "asynchronous", "a")
    with pytest.raises(ScorerError, match="has no attribute 'missing'"):
        custom(custom_module, "missing", "a")

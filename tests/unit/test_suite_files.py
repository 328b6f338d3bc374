"""A bad suite file is refused with a message naming the file, the field and the fault."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from evalrunner.models import HttpTarget, LockPolicy
from evalrunner.suites import SuiteFileError, load_suite

VALID = """\
name: greet
target:
  python:
    callable: "targets:greet"
cases:
  - id: hello
    input: "Hi"
    expected: "Hello"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(SuiteFileError) as info:
        load_suite(path)
    message = str(info.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    ("text", "field", "fault"),
    [
        pytest.param(
            VALID + "scorer: fuzzy\n", "scorer.name", "unknown scorer 'fuzzy'", id="unknown-scorer"
        ),
        pytest.param(
            VALID + "  - id: hello\n    input: again\n", "cases", "duplicate case id(s): hello", id="duplicate-ids"
        ),
        pytest.param(
            VALID + "timeout_seconds: -5\n", "timeout_seconds", "greater than 0", id="negative-timeout"
        ),
        pytest.param(
            "name: x\ncases: [{id: a, input: b}]\n", "target", "required field is missing", id="missing-target"
        ),
        pytest.param(
            VALID.replace("target:\n", "target:\n  command: {argv: [cat]}\n"),
            "target",
            "exactly one of `python`, `http` or `command` (got python, command)",
            id="two-targets",
        ),
        pytest.param(
            "name: x\ntarget: {command: {argv: [cat]}}\n", "cases", "required field is missing", id="missing-cases"
        ),
        pytest.param(
            "name: x\ntarget: {command: {argv: [cat]}}\ncases: []\n", "cases", "at least 1 item", id="empty-cases"
        ),
        pytest.param(VALID + "timeout_secnds: 3\n", "timeout_secnds", "unknown field", id="typo-field"),
        pytest.param(VALID + "concurrency: 0\n", "concurrency", "greater than or equal to 1", id="concurrency-0"),
        pytest.param(
            VALID + "scorer: {name: custom}\n", "scorer", "needs `callable: module:function`", id="custom-no-callable"
        ),
        pytest.param(
            VALID + "  - id: pat\n    input: x\n    scorer: regex\n    expected: 'a(b'\n",
            "cases[1 (id=pat)].expected",
            "invalid regular expression 'a(b'",
            id="invalid-regex",
        ),
        pytest.param(
            VALID + "  - id: when\n    input: 2024-01-01\n",
            "cases[1 (id=when)].input",
            "must be text or JSON",
            id="input-wrong-type",
        ),
        pytest.param(
            VALID + "  - id: bad id!\n    input: x\n", "cases[1 (id=bad id!)].id", "does not match", id="bad-case-id"
        ),
        pytest.param(
            VALID.replace('"targets:greet"', '"no-colon"'), "target.python.callable", "does not match", id="bad-callable"
        ),
    ],
)
def test_bad_field_is_named(tmp_path: Path, text: str, field: str, fault: str) -> None:
    message = refusal(write(tmp_path, text))
    assert f"{field}: " in message
    assert fault in message


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, "name: x\ncases:\n  - id: a\n   input: [unclosed\n"))
    assert "bad YAML" in message
    assert "line 4" in message


@pytest.mark.parametrize("text", ["- just\n- a list\n", "", "plain words\n"])
def test_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert "a suite must be a mapping" in refusal(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in refusal(tmp_path / "absent.yaml")


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, VALID + "concurrency: 0\ntimeout_secnds: 3\n"))
    assert "concurrency: " in message and "timeout_secnds: unknown field" in message


def test_camel_case_aliases_load(tmp_path: Path) -> None:
    suite = load_suite(
        write(
            tmp_path,
            """\
            name: chat
            timeoutSeconds: 12.5
            lockPolicy: Replace
            target:
              http:
                url: http://127.0.0.1:1/v1/chat/completions
                apiKeyEnv: MY_KEY
                systemPrompt: Be brief.
            scorer: {name: numeric, relativeTolerance: 0.1}
            cases:
              - {id: one, input: "1+1", expected: 2}
            """,
        )
    )
    assert suite.timeout_seconds == 12.5
    assert suite.lock_policy is LockPolicy.REPLACE
    assert isinstance(suite.target.http, HttpTarget)
    assert suite.target.http.api_key_env == "MY_KEY"
    assert suite.target.http.system_prompt == "Be brief."
    assert suite.scorer.relative_tolerance == 0.1


def test_scorer_shorthand_and_suite_default(tmp_path: Path) -> None:
    suite = load_suite(
        write(
            tmp_path,
            VALID
            + "  - id: partial\n    input: x\n    expected: ell\n    scorer: contains\n"
            + "scorer: {name: exact, case_sensitive: false}\n",
        )
    )
    hello, partial = suite.cases
    assert suite.scorer_for(hello).name == "exact"
    assert suite.scorer_for(hello).case_sensitive is False
    assert suite.scorer_for(partial).name == "contains"


def test_default_scorer_is_exact(tmp_path: Path) -> None:
    suite = load_suite(write(tmp_path, VALID))
    assert suite.scorer_for(suite.cases[0]).name == "exact"

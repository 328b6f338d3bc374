"""Load a suite file and refuse a malformed one with a message a person can act on.

Every problem is reported as `FILE: FIELD.PATH: what is wrong`, all of them at
once, so a user fixes the file in one go. A suite whose cases are in a dataset
file (`dataset:`) gets them here (`datasets.read_cases`), so the runner sees
`cases` alike either way.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import datasets, scorers
from .models import Suite
from .suite_yaml import YamlRefused, load_yaml

MAX_SUITE_BYTES = 16 * 1024 * 1024


class SuiteFileError(ValueError):
    """A suite file that cannot be used. `problems` holds (field path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {path}: {msg}" if path else f"{source}: {msg}" for path, msg in problems]
        super().__init__("invalid suite\n  " + "\n  ".join(lines))


def load_suite(path: str | Path) -> Suite:
    source = str(path)
    raw = _read_at_most(path, MAX_SUITE_BYTES, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteFileError(source, [("", f"not UTF-8 text (byte {exc.start})")]) from None
    return parse_suite(text, source, base_dir=Path(path).parent)


def _read_at_most(path: str | Path, limit: int, source: str) -> bytes:
    """The file's bytes, reading no more than `limit` + 1 of them: a device or a huge file never fills memory.

    Only a regular file is read: a device never ends, and opening a pipe with no writer never returns.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise SuiteFileError(source, [("", f"not a regular file ({_kind_of_file(mode)}); give a suite file")])
        with open(path, "rb") as file:
            raw = file.read(limit + 1)
    except FileNotFoundError:
        raise SuiteFileError(source, [("", "file not found")]) from None
    except OSError as exc:
        raise SuiteFileError(source, [("", f"cannot read file: {exc.strerror}")]) from None
    if len(raw) > limit:
        raise SuiteFileError(source, [("", f"file is larger than the limit of {limit // 2**20} MiB")])
    return raw


def _kind_of_file(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def parse_suite(text: str, source: str = "<suite>", base_dir: str | Path | None = None) -> Suite:
    """The suite in `text`; a relative dataset path is taken from `base_dir` (default: the working directory)."""
    try:
        data = load_yaml(text)
    except YamlRefused as exc:
        raise SuiteFileError(source, exc.problems) from None
    except RecursionError:  # only without libyaml: PyYAML's own composer recurses per level
        raise SuiteFileError(source, [("", "bad YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SuiteFileError(source, [("", f"bad YAML: {where}{problem}")]) from None
    return suite_from_data(data, source, base_dir)


def suite_from_data(data: Any, source: str = "<suite>", base_dir: str | Path | None = None) -> Suite:
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SuiteFileError(source, [("", f"a suite must be a mapping with name, target and cases; got {kind}")])
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        raise SuiteFileError(source, _describe_all(exc.errors(), data)) from None
    if suite.dataset is not None:
        try:
            cases = datasets.read_cases(suite.dataset, base_dir)
        except datasets.DatasetError as exc:
            raise SuiteFileError(source, exc.problems) from None
        suite = suite.model_copy(update={"cases": cases})
    problems = scorers.check_patterns(suite)
    if problems:
        raise SuiteFileError(source, problems)
    return suite


# Numbers and flags are strict (models.py): say what was expected and what the file gave.
STRICT_TYPES = {"float_type": "a number", "int_type": "a whole number", "bool_type": "true or false"}

# pydantic reports a value outside `JsonValue` once per union member (`.str`,
# `.int`, ...); those tags in a path mark errors to fold into one message.
JSON_UNION_TAGS = {"str", "int", "float", "bool", "list[any]", "dict[str,any]"}


def _describe_all(errors: list[Any], data: Any) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in errors:
        loc = list(err.get("loc", ()))
        tag_at = next((i for i, part in enumerate(loc) if part in JSON_UNION_TAGS), None)
        if tag_at is None:
            problems.append(_describe(err, data))
            continue
        path = _format_path(loc[:tag_at], data)
        value = _value_at(data, loc[:tag_at])
        got = "a mapping with non-string keys" if isinstance(value, dict) else f"a {type(value).__name__}"
        problem = (path, f"must be text or JSON (string, number, boolean, null, list or mapping); got {got}")
        if problem not in problems:
            problems.append(problem)
    return problems


def _value_at(data: Any, loc: list[Any]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe(err: dict[str, Any], data: Any) -> tuple[str, str]:
    loc = list(err.get("loc", ()))
    # pydantic reports union/validator internals in the path; keep what the user wrote.
    loc = [p for p in loc if p not in ("function-after[_exactly_one(), Target]",)]
    path = _format_path(loc, data)
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    kind = err.get("type")
    if kind == "missing":
        msg = "required field is missing"
    elif kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "literal_error" and path.endswith("name"):
        msg = f"unknown scorer {err.get('input')!r}; expected one of exact, contains, regex, json_equal, numeric, custom"
    elif kind in STRICT_TYPES and isinstance(err.get("input"), (bool, int, float, str)):
        msg = f"must be {STRICT_TYPES[kind]}; got {json.dumps(err['input'])}"
    elif kind == "string_pattern_mismatch":
        msg = f"{err.get('input')!r} does not match the pattern {err.get('ctx', {}).get('pattern')}"
    return path, msg


def _format_path(loc: list[Any], data: Any) -> str:
    """`cases[2].scorer.name`, naming a case by its id where it has one."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            label = str(part)
            if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) and "id" in node[part]:
                label = f"{part} (id={node[part]['id']})"
            out += f"[{label}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out

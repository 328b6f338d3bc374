"""The suite loader, fuzzed: any text either loads as a usable suite or is refused with SuiteFileError.

SuiteFileError is what the CLI turns into exit 2 with `FILE: FIELD.PATH:
problem` lines; any other exception would reach the user as a traceback.
Hypothesis generates random nested structures and mutations of a valid suite
(wrong types, deep nesting, alias chains, duplicated lines, huge strings,
scorer options, damaged text). A suite that loads must be usable: its cases
encode as JSON (as the runner sends and stores them). Loading and encoding
stay within a time and a memory bound, and a mutation that makes the suite
wrong beyond doubt (a key given twice, a scorer option the scorer lacks, a
boolean where a number goes) must be refused. The module reports how many
examples it ran.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import resource
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalrunner.models import Suite
from evalrunner.suites import SuiteFileError, parse_suite

# Per example: the time hypothesis allows (the machine is shared), the memory one load may take, and
# the most this process may grow by while it runs (a hard cap: an alias bomb fails fast, not the machine).
DEADLINE_MS = 3000
MAX_LOAD_BYTES = 256 * 1024 * 1024
GROWTH_CAP_BYTES = 768 * 1024 * 1024
FUZZ = settings(deadline=DEADLINE_MS, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])

VALID: dict[str, Any] = {
    "name": "fuzz",
    "description": "a valid suite to mutate",
    "timeout_seconds": 5,
    "concurrency": 2,
    "lock_policy": "Allow",
    "target": {"python": {"callable": "targets:calculator"}},
    "scorer": {"name": "numeric", "tolerance": 0.5},
    "cases": [
        {"id": "add", "input": "2+2", "expected": "4"},
        {"id": "json", "input": {"a": [1, 2]}, "expected": [1, 2], "scorer": "json_equal",
         "metadata": {"topic": "t"}},
    ],
}
# Where a mutation may put its value.
PATHS: list[tuple[Any, ...]] = [
    ("name",), ("description",), ("timeout_seconds",), ("concurrency",), ("lock_policy",), ("target",),
    ("target", "python"), ("target", "python", "callable"), ("scorer",), ("scorer", "name"), ("scorer", "tolerance"),
    ("cases",), ("cases", 0), ("cases", 0, "id"), ("cases", 0, "input"), ("cases", 0, "expected"),
    ("cases", 1, "scorer"), ("cases", 1, "metadata"), ("dataset",), ("timeoutSeconds",), ("unknown",),
]
NUMBERS = [("timeout_seconds",), ("concurrency",), ("scorer", "tolerance")]
SCORER_NAMES = ["exact", "contains", "regex", "json_equal", "numeric", "custom", "judge", "fuzzy"]
SCORER_OPTIONS = ["case_sensitive", "strip", "tolerance", "relative_tolerance", "callable", "http", "rubric",
                  "max_score", "threshold", "caseSensitive"]
# The options each scorer reads (the README's list), and the camelCase spellings of them.
OWN_OPTIONS_OF = {"exact": ("case_sensitive", "strip"), "contains": ("case_sensitive",),
                  "regex": ("case_sensitive",), "numeric": ("tolerance", "relative_tolerance"),
                  "custom": ("callable",), "judge": ("http", "rubric", "max_score", "threshold")}
OWN_OPTIONS = {"caseSensitive": "case_sensitive"}
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_]+:")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "2+2", "targets:calculator", "exact", "Forbid", "1e309", "-0", "~", "null", "yes"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)

outcomes: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_the_count(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    total = sum(outcomes.values())
    line = (f"suite loader fuzz: {total} examples in {time.monotonic() - started:.1f} s "
            f"({outcomes['loaded']} loaded, {outcomes['refused']} refused with SuiteFileError)")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():  # shown even under -q; a print would be captured
        reporter.write_line("\n" + line)


def load(text: str, must_refuse: bool = False) -> None:
    """Load `text`: a usable Suite or SuiteFileError, nothing else, in bounded memory."""
    tracemalloc.start()
    try:
        with memory_capped():
            suite = parse_suite(text, "fuzz.yaml")
            for case in suite.cases:  # what the runner encodes for its target and its store
                json.dumps([case.input, case.expected, case.metadata])
    except SuiteFileError as refused:
        outcomes["refused"] += 1
        assert str(refused).startswith("invalid suite\n  fuzz.yaml: "), str(refused)[:500]
    else:
        outcomes["loaded"] += 1
        assert isinstance(suite, Suite)
        assert not must_refuse, "a suite that is wrong beyond doubt was accepted"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_LOAD_BYTES, f"one load took {peak / 2**20:.0f} MiB"


@contextlib.contextmanager
def memory_capped() -> Iterator[None]:
    """Cap this process's address space a little above its present size, so runaway growth raises MemoryError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    cap = size + GROWTH_CAP_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def dump(data: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(data, allow_nan=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def put(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A copy of `data` with `value` at `path`, as far as the path still leads through `data`."""
    out = copy.deepcopy(data)
    node: Any = out
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return out
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node)):
        node[path[-1]] = value
    return out


def nested(depth: int, kind: str) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


def alias_chain(width: int, levels: int) -> str:
    """A suite whose first case's input expands to width**levels values (the billion laughs, sized)."""
    lines = ["name: fuzz", "target: {python: {callable: 'targets:calculator'}}", "cases:", "  - id: a",
             "    metadata:", "      l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"      l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    lines.append(f"    input: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def deep_alias_chain(links: int, depth: int) -> str:
    """A first case whose input nests links * depth levels, each anchor wrapping the one before."""
    lines = ["name: fuzz", "target: {python: {callable: 'targets:calculator'}}", "cases:", "  - id: a",
             "    metadata:", "      l0: &l0 " + "[" * depth + "]" * depth]
    for link in range(1, links):
        lines.append(f"      l{link}: &l{link} " + "[" * depth + f"*l{link - 1}" + "]" * depth)
    lines.append(f"    input: *l{links - 1}")
    return "\n".join(lines) + "\n"


@st.composite
def mutated_suites(draw: st.DrawFn) -> tuple[str, bool]:
    """The valid suite with one thing wrong, as YAML or JSON text, and whether it must be refused."""
    kind = draw(st.sampled_from(["wrong_type", "boolean", "deep", "deep_aliases", "aliases", "duplicate_line",
                                 "huge_string", "scorer", "damaged_text"]))
    as_json = draw(st.booleans())
    if kind == "wrong_type":
        return dump(put(VALID, draw(st.sampled_from(PATHS)), draw(json_values)), as_json), False
    if kind == "boolean":
        return dump(put(VALID, draw(st.sampled_from(NUMBERS)), draw(st.booleans())), as_json), True
    if kind == "deep":
        value = nested(draw(st.integers(1, 400)), draw(st.sampled_from(["list", "dict"])))
        return dump(put(VALID, draw(st.sampled_from(PATHS)), value), as_json=True), False  # PyYAML's dumper recurses
    if kind == "deep_aliases":
        return deep_alias_chain(draw(st.integers(1, 6)), draw(st.integers(1, 400))), False
    if kind == "aliases":
        return alias_chain(draw(st.integers(1, 12)), draw(st.integers(1, 12))), False
    if kind == "duplicate_line":
        lines = dump(VALID, as_json=False).splitlines()
        at = draw(st.integers(0, len(lines) - 1))
        # A key's line given twice repeats the key (or, `- id: ...`, adds a case with no input).
        return "\n".join(lines[: at + 1] + [lines[at]] + lines[at + 1:]) + "\n", bool(KEY_LINE.match(lines[at]))
    if kind == "huge_string":
        size = draw(st.sampled_from([10_000, 200_000, 1_000_000]))
        value = draw(st.sampled_from("x{[&*\n")) * size
        return dump(put(VALID, draw(st.sampled_from(PATHS)), value), as_json), False
    if kind == "scorer":
        name = draw(st.sampled_from(SCORER_NAMES))
        options = draw(st.dictionaries(st.sampled_from(SCORER_OPTIONS), scalars, max_size=3))
        foreign = any(OWN_OPTIONS.get(option, option) not in OWN_OPTIONS_OF.get(name, ()) for option in options)
        return dump(put(VALID, ("cases", 0, "scorer"), {"name": name, **options}), as_json), foreign
    text = dump(VALID, as_json)
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        text = text[:at] + draw(st.text(alphabet="[]{}:,-&*!|>'\"\n #?@`%\t\\x0", max_size=4)) + text[at + cut:]
    return text, False


STRUCTURES = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={key: json_values for key in VALID}),
    st.fixed_dictionaries({key: st.just(value) for key, value in VALID.items() if key != "cases"},
                          optional={"cases": st.lists(json_values, max_size=3), "dataset": json_values}),
)


@settings(FUZZ, max_examples=150)
@given(STRUCTURES, st.booleans())
def test_any_structure_loads_or_is_refused_clearly(data: Any, as_json: bool) -> None:
    if as_json and _has_non_finite(data):
        as_json = False  # JSON text cannot hold nan; the YAML dump can
    load(dump(data, as_json))


@settings(FUZZ, max_examples=250)
@given(mutated_suites())
def test_any_mutation_of_a_valid_suite_loads_or_is_refused_clearly(mutated: tuple[str, bool]) -> None:
    load(*mutated)


@settings(FUZZ, max_examples=100)
@given(st.text(max_size=300) | st.text(alphabet="[]{}:,-&*!|>'\"\n #?abc1", max_size=300))
def test_any_text_loads_or_is_refused_clearly(text: str) -> None:
    load(text)


def test_the_valid_suite_the_mutations_start_from_loads() -> None:
    assert isinstance(parse_suite(dump(VALID, as_json=False)), Suite)


def _has_non_finite(data: Any) -> bool:
    if isinstance(data, float):
        return not math.isfinite(data)
    if isinstance(data, dict):
        return any(_has_non_finite(v) for v in data.values())
    if isinstance(data, list):
        return any(_has_non_finite(v) for v in data)
    return False

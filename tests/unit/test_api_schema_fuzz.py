"""Schemathesis against the live store service: no 5xx, and every reply as the OpenAPI document says.

The service runs on 127.0.0.1 with a real DuckDB file and serves the
document fuzzed here. Each operation gets valid requests (positive) and
invalid ones (negative): the coverage phase's boundary values, then
MAX_EXAMPLES fuzzed ones, taking turns with the admin token, an EvalRun's
token and none, against runs that exist (its own, another EvalRun's, a
local one) and ids that do not. A schema fuzzer finds what the hand-written
cases of test_api_bad_inputs.py do not think of. The number of examples is
printed at the end of the module.

The schema is loaded at collection (`schema.parametrize()`), not from a
fixture: schemathesis's lazy fixture loader reads `Node._nodeid`, which
pytest 9.2 no longer has.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import urllib.request
from collections import Counter

import pytest
import schemathesis  # the `test` extra: a missing fuzzer must fail the run, not skip it
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import ServiceThread

from evalrunner.faults import Faults
from evalrunner.scope import Scope
from evalrunner.service.auth import new_token
from evalrunner.service.openapi import SPEC_PATH, shipped_spec
from evalrunner.store import DuckDBStore, RunRequest
from evalrunner.owner import this_process

ADMIN = "admin-token-for-fuzzing"
MAX_EXAMPLES = 50  # fuzzed per operation, after the examples and the coverage phase's boundary values
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class Live:
    """The service under test, the tokens and run ids the cases take turns with, and what was sent."""

    def __init__(self, service: ServiceThread):
        self.service = service
        self.scoped = new_token()
        mine = Scope("fuzz", "mine", "uid-mine")
        service.store.register_token(mine, self.scoped)
        self.tokens = (ADMIN, self.scoped)
        self.run_ids = tuple(
            service.store.start_run(RunRequest(suite, ("a", "b"), 5, this_process(), scope=scope, admitted=True)).run.id
            for suite, scope in (("mine", mine), ("theirs", Scope("fuzz", "theirs", "uid-t")), ("local", None)))
        self.sent = itertools.count()
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()


@pytest.fixture(scope="module")
def live(tmp_path_factory, request):
    """One live service for every operation's test, so the count below covers them all."""
    store = DuckDBStore.open(tmp_path_factory.mktemp("fuzz") / "fuzz.duckdb", faults=Faults(""))
    service = ServiceThread(store, ADMIN, max_body_bytes=1024 * 1024)
    with urllib.request.urlopen(f"{service.origin}{SPEC_PATH}", timeout=10) as resp:
        assert json.loads(resp.read()) == SPEC  # the document fuzzed is the one the service serves
    state = Live(service)
    yield state
    service.stop()
    store.close()
    seconds = time.monotonic() - state.started
    lines = [f"schemathesis: {sum(state.counts.values())} examples over {len(state.counts)} operations "
             f"in {seconds:.1f} s"] + [f"  {n:5d}  {label}" for label, n in sorted(state.counts.items())]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))


# Loaded when the module is collected, so each operation is a test of its own; the live fixture
# checks that the service serves this same document.
SPEC = json.loads(shipped_spec())
schema = schemathesis.openapi.from_dict(SPEC)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_documented_answers_and_never_a_5xx(case, live):
    n = next(live.sent)
    # Take turns: the admin and an EvalRun's token (and now and then none); its own run, another
    # EvalRun's, a local one, or the generated id.
    if "run_id" in (case.path_parameters or {}) and n % 4 != 3:
        case.path_parameters["run_id"] = live.run_ids[n % 4]
    headers = {"Authorization": f"Bearer {live.tokens[n % 2]}"} if n % 7 else {}
    live.counts[f"{case.operation.method.upper()} {case.operation.path}"] += 1
    case.call_and_validate(base_url=live.service.origin, headers=headers, checks=CHECKS, timeout=30)

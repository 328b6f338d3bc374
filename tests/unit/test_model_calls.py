"""Model calls as real APIs need them: retries, rate limits, token usage and the judge scorer.

Every call goes to a real local HTTP server (a thread of this process) that
answers from a script: 429 with Retry-After, 5xx, dropped connections, usage.
Waits are measured with an injected clock and sleep, so the tests are exact
and fast; one wait is real, to show the header is honoured in time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from evalrunner import case_context, retry, summary
from evalrunner.faults import Faults
from evalrunner.http_target import HttpInvoke
from evalrunner.judge import parse_score
from evalrunner.models import Case, Cause, HttpTarget, RunStatus, Scorer
from evalrunner.ratelimit import NoSlotInTime, RateLimiter
from evalrunner.runner.case import execute_case
from evalrunner.scorers import build_scorer
from evalrunner.store import DuckDBStore, wire
from evalrunner.store.records import CaseEvent
from evalrunner.targets import TargetError
from evalrunner.usage import Usage

from helpers import EXAMPLES, run_cli, write_suite
from service_support import Client, ServiceThread


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering


def chat(content: str, prompt: int = 10, completion: int = 2) -> Reply:
    return Reply(body={"choices": [{"message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}})


class ModelServer:
    """An HTTP endpoint on a thread: `respond(n, request_body)` says what the n-th request (from 0) gets."""

    def __init__(self, respond: Callable[[int, Any], Reply]):
        self.requests: list[Any] = []
        self.times: list[float] = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.times.append(time.monotonic())
                reply = respond(n, body)
                if reply.drop:
                    self.close_connection = True
                    return
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a case timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def model_server(respond: Callable[[int, Any], Reply]) -> Iterator[ModelServer]:
    server = ModelServer(respond)
    try:
        yield server
    finally:
        server.close()


class FakeTime:
    """A monotonic clock that only `sleep` moves: waits are exact and take no time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


NO_JITTER = retry.Backoff(random=lambda: 0.0)  # Retry-After exactly; backoff at half its step
FULL_STEP = retry.Backoff(random=lambda: 1.0)  # backoff at its full step: 0.5, 1, 2, ...


def call(spec: HttpTarget, input: Any = "hi", fake: FakeTime | None = None, backoff: retry.Backoff = NO_JITTER,
         calls: int = 1) -> tuple[list[Any], Usage]:
    """`calls` calls of one invoke (a run's), within one case context; the outputs and the case's usage."""

    async def body() -> tuple[list[Any], Usage]:
        options: dict[str, Any] = {"backoff": backoff}
        if fake:
            options.update(clock=fake.clock, sleep=fake.sleep)
        invoke = HttpInvoke(spec, **options)
        try:
            with case_context.CaseContext(3600) as context:
                return [await invoke(input) for _ in range(calls)], context.usage
        finally:
            await invoke.aclose()

    return asyncio.run(body())


# ---------------------------------------------------------------- retries


def test_retry_after_header_forms() -> None:
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert retry.retry_after_s({"retry-after": "3"}) == 3.0
    assert retry.retry_after_s({"retry-after-ms": "250", "retry-after": "3"}) == 0.25  # the precise one first
    assert retry.retry_after_s({"retry-after": format_datetime(now + timedelta(seconds=7), usegmt=True)}, now) == 7.0
    assert retry.retry_after_s({"retry-after": format_datetime(now - timedelta(seconds=7), usegmt=True)}, now) == 0.0
    assert retry.retry_after_s({"retry-after": "soon"}) is None
    assert retry.retry_after_s({}) is None
    # Jitter: up to 10% above the server's ask, never below; backoff between half and all of its step.
    assert FULL_STEP.delay_s(0, 3.0) == pytest.approx(3.3)
    assert [backoff.delay_s(n, None) for backoff in (NO_JITTER, FULL_STEP) for n in (0, 1, 5)] == [
        0.25, 0.5, 4.0, 0.5, 1.0, 8.0]


def test_429_with_retry_after_then_200() -> None:
    def respond(n: int, body: Any) -> Reply:
        if n < 2:
            return Reply(429, {"error": "slow down"}, {"Retry-After": "2"})
        return chat("4", prompt=12, completion=3)

    fake = FakeTime()
    with model_server(respond) as server:
        outputs, usage = call(HttpTarget(url=server.url, model="m"), fake=fake)
    assert outputs == ["4"] and len(server.requests) == 3
    assert fake.sleeps == [2.0, 2.0]  # what the server asked, each time
    assert usage == Usage(12, 3, 15)  # only the reply that worked reports usage


def test_retry_after_is_honoured_in_real_time() -> None:
    def respond(n: int, body: Any) -> Reply:
        return Reply(429, {}, {"retry-after-ms": "300"}) if n == 0 else chat("ok")

    with model_server(respond) as server:
        call(HttpTarget(url=server.url))
        waited = server.times[1] - server.times[0]
    assert 0.3 <= waited < 0.3 * 1.1 + 0.15  # the ask, its jitter, and some scheduling


def test_5xx_and_dropped_connections_are_retried_with_backoff() -> None:
    script = [Reply(503, {"error": "overloaded"}), Reply(drop=True), Reply(502, {}), chat("fine")]
    fake = FakeTime()
    with model_server(lambda n, body: script[n]) as server:
        outputs, _ = call(HttpTarget(url=server.url, max_retries=3), fake=fake, backoff=FULL_STEP)
    assert outputs == ["fine"]
    assert fake.sleeps == [0.5, 1.0, 2.0]  # exponential: 0.5 s doubling


def test_gives_up_after_max_retries_naming_the_last_error() -> None:
    fake = FakeTime()
    with model_server(lambda n, body: Reply(503, {"error": f"overloaded #{n}"})) as server:
        with pytest.raises(TargetError) as info:
            call(HttpTarget(url=server.url, max_retries=2), fake=fake, backoff=FULL_STEP)
    assert len(server.requests) == 3 and fake.sleeps == [0.5, 1.0]
    assert str(info.value) == (f'POST {server.url} returned HTTP 503: {{"error": "overloaded #2"}} '
                               "(gave up after 3 attempts)")
    # Not worth retrying: fails at once.
    with model_server(lambda n, body: Reply(400, {"error": "bad request"})) as server:
        with pytest.raises(TargetError, match="returned HTTP 400"):
            call(HttpTarget(url=server.url), fake=FakeTime())
        assert len(server.requests) == 1


def test_a_retry_that_would_pass_the_case_timeout_is_not_waited_for() -> None:
    """The runner's case: a 30 s Retry-After with 2 s left fails the case at once, saying why."""
    with model_server(lambda n, body: Reply(429, {"error": "quota"}, {"Retry-After": "30"})) as server:
        invoke = HttpInvoke(HttpTarget(url=server.url))
        case = Case(id="c", input="hi", expected="x")
        started = time.monotonic()
        outcome = asyncio.run(_closing(invoke, execute_case(case, invoke, build_scorer(Scorer(name="exact")), 2.0)))
        took = time.monotonic() - started
    assert took < 1.0 and len(server.requests) == 1
    assert outcome.status is RunStatus.FAILED and outcome.cause is Cause.CASE_RAISED
    assert "returned HTTP 429" in outcome.error and "not retried: waiting 3" in outcome.error
    assert "would pass the case's timeout" in outcome.error


async def _closing(invoke: HttpInvoke, work: Any) -> Any:
    try:
        return await work
    finally:
        await invoke.aclose()


# ---------------------------------------------------------------- rate limits


def test_requests_per_minute_makes_the_third_call_wait() -> None:
    fake = FakeTime()
    with model_server(lambda n, body: chat("ok")) as server:
        call(HttpTarget(url=server.url, requests_per_minute=2), fake=fake, calls=3)
        assert len(server.requests) == 3
    assert fake.sleeps == [30.0]  # a full bucket of 2, refilled at one per 30 s


def test_tokens_per_minute_counts_the_reply_usage() -> None:
    """10 tokens/s; each reply reports 500 tokens, far above the estimate, so the bucket goes into debt."""
    fake = FakeTime()
    with model_server(lambda n, body: chat("ok", prompt=400, completion=100)) as server:
        call(HttpTarget(url=server.url, tokens_per_minute=600), fake=fake, calls=3)
        estimate = len(json.dumps(server.requests[0], ensure_ascii=False)) // 4 + 1
    # 600 -> 100 after the first call; -400 after the second; the third waits until the bucket holds its estimate.
    assert fake.sleeps == [pytest.approx((400 + estimate) / 10)]


def test_rate_limit_is_first_come_first_served_and_refuses_a_slot_past_the_deadline() -> None:
    fake = FakeTime()
    limiter = RateLimiter(60, None, fake.clock, fake.sleep)  # one per second, 60 at once

    async def body() -> list[int]:
        order: list[int] = []

        async def one(i: int) -> None:
            await limiter.acquire(0)
            order.append(i)

        await asyncio.gather(*(one(i) for i in range(62)))
        with pytest.raises(NoSlotInTime, match=r"60 requests/min\): the next slot is 1.0s away"):
            await limiter.acquire(0, seconds_left=lambda: 0.5)
        return order

    assert asyncio.run(body()) == list(range(62))
    assert fake.sleeps == [1.0, 1.0]


# ---------------------------------------------------------------- usage


def test_usage_from_both_formats_and_missing() -> None:
    def respond(n: int, body: Any) -> Reply:
        if n == 0:
            return Reply(body={"output": "a", "tokens": {"input_tokens": 5, "output_tokens": 1}})
        return Reply(body={"output": "b"})

    with model_server(respond) as server:
        outputs, usage = call(HttpTarget(url=server.url, format="json", usage_field="tokens"), calls=2)
    assert outputs == ["a", "b"] and usage == Usage(5, 1, 6)
    outcome = asyncio.run(execute_case(Case(id="p", input=1, expected=1), _echo, build_scorer(Scorer(name="exact")), 5))
    assert outcome.usage == Usage(None, None, None)  # a python target reports none: unknown, not 0


async def _echo(value: Any) -> Any:
    return value


def test_wire_and_summary_carry_usage_only_when_known() -> None:
    now = datetime.now(timezone.utc)
    plain = CaseEvent("r/a", "r", "a", "completed", now, now, passed=True)
    assert "total_tokens" not in wire.case_event_to_json(plain)  # an older store service still takes it
    counted = CaseEvent("r/a", "r", "a", "completed", now, now, prompt_tokens=3, completion_tokens=1, total_tokens=4)
    assert wire.case_event_from_json(wire.case_event_to_json(counted), 0) == counted
    assert wire.case_event_from_json(wire.case_event_to_json(plain), 0) == plain  # an older runner's event
    with pytest.raises(wire.WireError, match=r"events\[0\].total_tokens: must be a token count"):
        wire.case_event_from_json({**wire.case_event_to_json(counted), "total_tokens": "4"}, 0)
    # The runner's summary (for a lost final write) carries usage too, so the close from it counts the tokens.
    assert summary.CaseResult.from_event(counted).to_event("r", now) == counted


# ---------------------------------------------------------------- the judge


def test_parse_score_forms() -> None:
    assert parse_score("Correct and complete.\nSCORE: 0.8") == 0.8
    assert parse_score("The format is SCORE: <n>. Mostly right.\n**Score:** 0.6.") == 0.6  # the last line counts
    assert parse_score('```json\n{"reason": "close", "score": 7}\n```') == 7.0
    assert parse_score({"score": 0.25}) == 0.25 and parse_score(" 1 ") == 1.0 and parse_score(0.5) == 0.5
    assert parse_score("I cannot grade this.") is None and parse_score('{"grade": 1}') is None


def judge_case(server: ModelServer, timeout_s: float = 10, **scorer: Any) -> Any:
    spec = Scorer(name="judge", http=HttpTarget(url=server.url, model="judge-m"), **scorer)
    case = Case(id="capital", input="Capital of France?", expected="Paris")

    async def target(value: Any) -> Any:  # a model target: reports its own usage to the case too
        case_context.add_usage(Usage(100, 20, 120))
        return "Paris."

    async def body() -> Any:
        judge = build_scorer(spec)
        try:
            return await execute_case(case, target, judge, timeout_s)
        finally:
            await judge.aclose()

    return asyncio.run(body())


def test_judge_scores_with_the_rubric_and_counts_its_tokens() -> None:
    with model_server(lambda n, body: chat("Right answer.\nSCORE: 0.9", prompt=80, completion=6)) as server:
        outcome = judge_case(server)
        prompt = server.requests[0]["messages"][-1]["content"]
    assert outcome.status is RunStatus.COMPLETED and outcome.passed and outcome.score == 0.9
    assert "Capital of France?" in prompt and "Paris." in prompt and "\nParis\n" in prompt
    assert server.requests[0]["model"] == "judge-m"
    assert outcome.detail.startswith("judge: 0.9, at or above the threshold 0.5: Right answer. SCORE: 0.9")
    assert outcome.usage == Usage(180, 26, 206)  # the target's and the judge's


def test_judge_json_score_on_its_scale_below_threshold() -> None:
    with model_server(lambda n, body: chat('{"score": 6, "reason": "vague"}')) as server:
        outcome = judge_case(server, rubric="Grade 0-10 as JSON: {output} vs {expected}", max_score=10, threshold=0.7)
        assert server.requests[0]["messages"][-1]["content"] == "Grade 0-10 as JSON: Paris. vs Paris"
    assert outcome.status is RunStatus.COMPLETED and not outcome.passed and outcome.score == 0.6


def test_judge_reply_without_score_or_off_scale_is_a_scorer_error() -> None:
    with model_server(lambda n, body: chat("Looks fine to me.")) as server:
        outcome = judge_case(server)
    assert outcome.status is RunStatus.FAILED and outcome.cause is Cause.CASE_RAISED
    assert outcome.error.startswith("scorer raised ScorerError: judge reply has no score")
    assert outcome.output == "Paris." and outcome.usage == Usage(110, 22, 132)  # spent all the same
    with model_server(lambda n, body: chat("SCORE: 7")) as server:
        outcome = judge_case(server)
    assert "judge score 7 is off the scale 0 to 1" in outcome.error


def test_judge_is_bounded_by_the_case_timeout() -> None:
    def slow(n: int, body: Any) -> Reply:
        time.sleep(1.0)
        return chat("SCORE: 1")

    with model_server(slow) as server:
        started = time.monotonic()
        outcome = judge_case(server, timeout_s=0.3)
    assert time.monotonic() - started < 0.9
    assert outcome.cause is Cause.CASE_TIMEOUT and outcome.error == "timed out after 0.3s (while scoring)"


def test_a_rubric_without_the_output_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs the placeholder \{output\}"):
        Scorer(name="judge", http=HttpTarget(url="http://x/"), rubric="Is {input} a question?")
    with pytest.raises(ValueError, match="the judge scorer needs `http"):
        Scorer(name="judge")


# ---------------------------------------------------------------- end to end


SUITE = """\
name: tokens-e2e
timeout_seconds: 10
concurrency: 2
target:
  http: {{url: "{url}", model: m, requests_per_minute: 600}}
cases:
  - {{id: add, input: "2+2", expected: "4"}}
  - {{id: mul, input: "3*3", expected: "9"}}
  - id: capital
    input: "Capital of France?"
    expected: "Paris"
    scorer: {{name: judge, http: {{url: "{url}", model: judge-m}}}}
"""


def test_usage_end_to_end_run_show_rows_page_and_metrics(tmp_path: Path) -> None:
    """A real `evalrunner run` against the local server (429 first), then every place usage is read."""

    def respond(n: int, body: Any) -> Reply:
        if n == 0:
            return Reply(429, {"error": "rate limited"}, {"retry-after-ms": "50"})
        question = body["messages"][-1]["content"]
        if "Answer to grade" in question:
            return chat("It says Paris.\nSCORE: 1", prompt=90, completion=7)
        answers = {"2+2": "4", "3*3": "9", "Capital of France?": "Paris"}
        return chat(answers[question], prompt=len(question), completion=1)

    db = tmp_path / "e2e.duckdb"
    with model_server(respond) as server:
        suite = write_suite(tmp_path, SUITE.format(url=server.url))
        ran = run_cli(["run", suite, "--json"], db)
    assert ran.returncode == 0, ran.stderr
    run = json.loads(ran.stdout)["run"]
    # Cases: prompt = len(input), completion = 1; the judge adds 90 + 7 to its case.
    assert (run["prompt_tokens"], run["completion_tokens"], run["total_tokens"]) == (3 + 3 + 18 + 90, 10, 124)

    shown = run_cli(["show", run["id"], "--json"], db)
    cases = {c["name"]: c for c in json.loads(shown.stdout)["cases"]}
    assert {n: (c["prompt_tokens"], c["completion_tokens"], c["total_tokens"]) for n, c in cases.items()} == {
        "add": (3, 1, 4), "mul": (3, 1, 4), "capital": (108, 8, 116)}
    text = run_cli(["show", run["id"]], db, log_format=None).stdout
    assert "124 tokens (114 prompt, 10 completion)" in text

    store = DuckDBStore.open(db, faults=Faults(""))
    service = ServiceThread(store, "admin")
    try:
        rows = store._cur().execute(
            "SELECT name, prompt_tokens, completion_tokens, total_tokens FROM eval_cases ORDER BY name").fetchall()
        assert rows == [("add", 3, 1, 4), ("capital", 108, 8, 116), ("mul", 3, 1, 4)]
        page = Client(service).get(f"/evals/runs/{run['id']}").text
        assert "<dt>Tokens</dt><dd>124 tokens (114 prompt, 10 completion)</dd>" in page
        assert '<td class="num tokens" title="116 tokens (108 prompt, 8 completion)">116</td>' in page
        assert '<td class="num tokens">124</td>' in Client(service).get("/evals").text
        metrics = Client(service).get("/metrics").text
        assert 'evalrunner_tokens_total{kind="prompt",suite="tokens-e2e"} 114.0' in metrics
        assert 'evalrunner_tokens_total{kind="completion",suite="tokens-e2e"} 10.0' in metrics
    finally:
        service.stop()
        store.close()


def test_a_python_target_run_does_not_import_aiohttp() -> None:
    """aiohttp costs tens of milliseconds to import; only http targets and judges need it."""
    probe = (
        "import sys\n"
        "from evalrunner import cli\n"
        "from evalrunner.runner.suite_run import _scorers\n"
        "from evalrunner.suites import load_suite\n"
        "from evalrunner.targets import build_target\n"
        f"suite = load_suite({str(EXAMPLES / 'smoke.yaml')!r})\n"
        f"build_target(suite.target, [{str(EXAMPLES)!r}]); _scorers(suite, ())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))\n"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"

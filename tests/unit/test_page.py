"""The /evals page over real HTTP: escaping, filters, keyset paging, stuck runs, login, CSRF and terminate."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from urllib.parse import quote

import pytest

from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.owner import this_process
from evalrunner.service import markup
from evalrunner.service.admin_session import AdminSessions
from evalrunner.service.stuck import why_stuck
from evalrunner.store import DuckDBStore
from evalrunner.store.duckdb_store import utcnow

from service_support import Client, ServiceThread, ago, dead_owner, finish, save, start

ADMIN = "page-admin-token-for-tests"
SCRIPT_SUITE = "<script>window.__xss=1</script>suite"
IMG_OUTPUT = '<img src=x onerror="window.__xss=2">'


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "page.duckdb", faults=Faults(""))
    yield s
    s.close()


@pytest.fixture
def service(store):
    svc = ServiceThread(store, ADMIN)
    yield svc
    svc.stop()


@pytest.fixture
def readonly_service(store):
    svc = ServiceThread(store, None)
    yield svc
    svc.stop()


def run_ids(text: str) -> list[str]:
    return re.findall(r'<tr class="run[^"]*" data-run-id="([^"]*)"', text)


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found, "no CSRF field on the page"
    return found.group(1)


def login(client: Client) -> None:
    reply = client.post("/evals/login", {"token": ADMIN, "next": "/evals"})
    assert reply.status == 303, reply.text
    assert "evalrunner_admin" in client.cookies


# ---------------------------------------------------------------- escaping


def test_markup_escapes_every_value_but_its_own():
    assert markup.html("<td>{}</td>", "<b>&\"'") == "<td>&lt;b&gt;&amp;&quot;&#x27;</td>"
    inner = markup.html("<i>{}</i>", "<x>")
    assert markup.html("<p>{}</p>", inner) == "<p><i>&lt;x&gt;</i></p>"
    assert markup.html('<a title="{t}">', t='" onmouseover="x') == '<a title="&quot; onmouseover=&quot;x">'


def test_user_strings_are_escaped_everywhere(service, store):
    hostile_id = 'run-"><svg onload=alert(3)>'
    run = start(store, SCRIPT_SUITE, cases=("<b>case</b>",), run_id=hostile_id)
    save(store, run, "<b>case</b>", None, output=IMG_OUTPUT, error="<script>alert(4)</script>")
    finish(store, run, RunStatus.FAILED, cause="case_raised")
    client = Client(service)

    listing = client.get("/evals")
    assert listing.status == 200
    for page in (listing.text, client.get(f"/evals/runs/{quote(hostile_id, safe='')}").text,
                 client.get("/evals?" + "suite=" + quote(SCRIPT_SUITE)).text):
        assert "<script>" not in page and "<img" not in page and "<svg" not in page
    detail = client.get(f"/evals/runs/{quote(hostile_id, safe='')}")
    assert detail.status == 200
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;suite" in detail.text
    assert "&lt;img src=x onerror=&quot;window.__xss=2&quot;&gt;" in detail.text
    assert "&lt;b&gt;case&lt;/b&gt;" in detail.text
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in detail.text
    # The link to the run keeps the id as one URL path segment.
    assert f'href="/evals/runs/{quote(hostile_id, safe="")}"' in listing.text
    csp = listing.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp  # no script is allowed at all


# ---------------------------------------------------------------- the list: columns, filters, paging


def test_list_shows_columns_counts_and_filters(service, store):
    done = start(store, "alpha", cases=("a", "b", "c"))
    for name, passed in (("a", True), ("b", False), ("c", None)):
        save(store, done, name, passed)
    finish(store, done)
    failed = finish(store, start(store, "beta"), RunStatus.FAILED, cause="killed")
    running = start(store, "alpha", cases=("a", "b"))
    save(store, running, "a", True)
    client = Client(service)

    page = client.get("/evals")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert run_ids(page.text) == [running.id, failed.id, done.id]  # newest first
    assert "3 runs match" in page.text
    row = re.search(rf'data-run-id="{done.id}".*?</tr>', page.text).group(0)
    assert re.search(r'num pass">1<.*num fail">1<.*num errored">1<', row)
    live = re.search(rf'data-run-id="{running.id}".*?</tr>', page.text).group(0)
    assert 'num pass">1<' in live  # a running run's counts come from its case rows
    assert "killed" in page.text  # the cause column
    assert "server-timing" in page.headers

    assert run_ids(client.get("/evals?status=failed").text) == [failed.id]
    assert run_ids(client.get("/evals?suite=alpha").text) == [running.id, done.id]
    assert run_ids(client.get("/evals?suite=alpha&status=completed").text) == [done.id]
    assert "No runs match" in client.get("/evals?suite=nope").text
    bad = client.get("/evals?status=stuck%3Cb%3E")
    assert bad.status == 400 and "status: must be one of" in bad.text and "<b>" not in bad.text
    assert client.get("/evals?limit=0").status == 400
    assert client.get("/evals?before=garbage").status == 400


def test_keyset_paging_visits_every_run_once_even_with_equal_timestamps(service, store):
    template = finish(store, start(store, "paged"))
    base = utcnow()
    rows = [dataclasses.replace(template, id=f"r{i:04d}", created_at=base - timedelta(seconds=i // 3))
            for i in range(125)]  # three runs per timestamp: the id breaks the ties
    assert store.import_runs(rows) == 125
    expected = [r.id for r in store.list_runs(suite="paged", limit=1000)]
    client = Client(service)

    seen, pages, url = [], [], "/evals?suite=paged&limit=50"
    while url:
        page = client.get(url.replace("&amp;", "&"))
        assert page.status == 200
        pages.append(page.text)
        seen += run_ids(page.text)
        older = re.search(r'<a href="([^"]+)" rel="next" id="older">', page.text)
        url = older.group(1) if older else None
    assert seen == expected and len(seen) == 126
    assert [len(run_ids(p)) for p in pages] == [50, 50, 26]
    # Newer from the last page returns exactly the page before it.
    newer = re.search(r'<a href="([^"]+)" rel="prev" id="newer">', pages[-1]).group(1).replace("&amp;", "&")
    assert run_ids(client.get(newer).text) == run_ids(pages[1])
    assert 'id="newer"' not in pages[0]


# ---------------------------------------------------------------- stuck runs


def test_stuck_runs_are_highlighted_with_why(service, store):
    dead = start(store, "dead-owner", owner=dead_owner())
    over_budget = start(store, "slow", cases=("a", "b"), timeout_s=60, at=ago(150))
    store.heartbeat(over_budget.id)  # fresh heartbeat, live owner (us): only the budget is exceeded
    healthy = start(store, "healthy")
    page = Client(service).get("/evals").text

    banner = re.search(r'id="stuck-banner">.*?</section>', page).group(0)
    assert "2 stuck runs" in banner and dead.id in banner and over_budget.id in banner and healthy.id not in banner
    assert "owner process is gone" in banner
    assert re.search(r"past its budget of 120s \(timeout_seconds 60 x 2 cases\)", banner)
    assert re.search(rf'class="run status-running stuck" data-run-id="{dead.id}"', page)
    assert re.search(rf'class="run status-running" data-run-id="{healthy.id}"', page)


def test_why_stuck_checks_deadline_heartbeat_and_owner():
    now = utcnow()
    base = finish_free_row(now)
    alive = lambda owner: "alive"  # noqa: E731
    assert why_stuck(base, now, alive) is None
    lost = why_stuck(dataclasses.replace(base, heartbeat_at=now - timedelta(seconds=31)), now, alive)
    assert lost.cause == "heartbeat_lost" and "no heartbeat for 31s" in lost.reason
    dead = why_stuck(base, now, lambda owner: "dead")
    assert dead.cause == "killed"
    late = why_stuck(dataclasses.replace(base, started_at=now - timedelta(seconds=31)), now, alive)
    assert late.cause == "deadline_exceeded" and "budget of 30s" in late.reason
    assert why_stuck(dataclasses.replace(base, status="failed", heartbeat_at=now - timedelta(hours=1)), now,
                     alive) is None


def finish_free_row(now):
    from evalrunner.store.records import RunRow

    return RunRow(id="r", suite="s", status="running", created_at=now, started_at=now, completed_at=None, error=None,
                  cause=None, owner=this_process(), heartbeat_at=now, deadline_at=now + timedelta(minutes=5),
                  attempt=1, parent_run_id=None, timeout_seconds=10, case_count=3, passed=None, failed=None,
                  errored=None, lock_policy="Allow", terminated_by=None, source=None)


# ---------------------------------------------------------------- run detail


def test_run_page_shows_cases_and_attempts(service, store):
    first = start(store, "resumable", cases=("a", "b"))
    save(store, first, "a", True, output="4", duration_ms=1500)
    save(store, first, "b", None, error="boom")
    finish(store, first, RunStatus.FAILED, cause="case_raised")
    from evalrunner.store import RunRequest

    second = store.start_run(RunRequest("resumable", ("b",), 30, this_process(), parent_run_id=first.id,
                                        carried_case_names=("a",))).run
    page = Client(service).get(f"/evals/runs/{second.id}")
    assert page.status == 200
    assert re.search(r'id="attempts">.*' + first.id + ".*" + second.id, page.text)
    assert "carried over from" in page.text and "<code>4</code>" in page.text
    failed_page = Client(service).get(f"/evals/runs/{first.id}").text
    assert "case_raised: boom" in failed_page and "1.5s" in failed_page
    assert 'id="terminate-form"' not in failed_page  # only a running run can be terminated
    assert Client(service).get("/evals/runs/no-such-run").status == 404


# ---------------------------------------------------------------- login, CSRF, terminate


def test_without_an_admin_token_the_page_is_read_only(readonly_service, store):
    run = start(store, "stuck", owner=dead_owner())
    client = Client(readonly_service)
    page = client.get(f"/evals/runs/{run.id}").text
    assert 'id="terminate-disabled"' in page and "EVALRUNNER_ADMIN_TOKEN" in page
    assert 'id="terminate-form"' not in page
    assert "EVALRUNNER_ADMIN_TOKEN" in client.get("/evals/login").text
    assert client.post("/evals/login", {"token": ""}).status == 403
    refused = client.post(f"/evals/runs/{run.id}/terminate", {"csrf": "x"})
    assert refused.status == 403 and "EVALRUNNER_ADMIN_TOKEN" in refused.text
    assert store.get_run(run.id).status == "running"


def test_login_sets_a_strict_httponly_cookie_and_never_shows_the_token(service, store):
    client = Client(service)
    wrong = client.post("/evals/login", {"token": "guess"})
    assert wrong.status == 401 and "not the admin token" in wrong.text and not client.cookies
    ok = client.post("/evals/login", {"token": ADMIN, "next": "https://evil.example/steal"})
    assert ok.status == 303 and ok.headers["location"] == "/evals?notice=logged-in"  # no open redirect
    cookie = ok.set_cookies[0]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/evals"):
        assert attribute in cookie
    assert ADMIN not in cookie
    page = client.get("/evals?notice=logged-in")
    assert ADMIN not in page.text and 'id="logout"' in page.text and "Logged in as admin" in page.text


def test_terminate_refuses_forgery_and_then_fails_the_run_as_manual(service, store):
    run = start(store, "stuck", cases=("a", "b"), owner=dead_owner(), at=ago(3600))
    save(store, run, "a", True)
    store.save_cases([dataclasses.replace(_running_case(run, "b"))])
    client = Client(service)
    path = f"/evals/runs/{run.id}/terminate"

    anonymous = client.post(path, {"csrf": "anything"})
    assert anonymous.status == 401 and "Log in" in anonymous.text
    login(client)
    token = csrf_of(client.get(f"/evals/runs/{run.id}").text)
    assert client.post(path, {}).status == 403  # no CSRF token
    assert client.post(path, {"csrf": token[:-2] + "xx"}).status == 403  # a wrong one
    cross = client.post(path, {"csrf": token}, origin="http://evil.example")
    assert cross.status == 403 and "another site" in cross.text
    assert client.post(path, {"csrf": token}, origin=None).status == 403  # neither Origin nor Referer
    assert client.post(path, {"csrf": token}, origin="null").status == 403
    forged = Client(service)
    forged.cookies = {"evalrunner_admin": client.cookies["evalrunner_admin"][:-3] + "abc"}
    assert forged.post(path, {"csrf": token}).status == 401
    assert store.get_run(run.id).status == "running"  # nothing got through

    done = client.post(path, {"csrf": token, "reason": "stuck <for> an hour"}, origin=None,
                       referer=f"{service.origin}/evals/runs/{run.id}")  # a Referer from this site will do
    assert done.status == 303 and done.headers["location"].endswith("notice=terminated")
    row = store.get_run(run.id)
    assert (row.status, row.cause, row.terminated_by) == ("failed", "manual", "manual")
    assert row.error == "Manual recovery: stuck <for> an hour (from the /evals page)"
    cases = {c.name: c for c in store.cases(run.id)}
    assert cases["a"].status == "completed" and (cases["b"].status, cases["b"].cause) == ("failed", "manual")
    after = client.get(done.headers["location"]).text
    assert "Run terminated" in after and "stuck &lt;for&gt; an hour" in after and 'id="terminate-form"' not in after
    again = client.post(path, {"csrf": token})
    assert again.status == 303 and again.headers["location"].endswith("notice=already-closed")


def test_terminate_refuses_a_live_owner_unless_forced(service, store):
    run = start(store, "live")  # owned by this test process, which is alive
    client = Client(service)
    login(client)
    page = client.get(f"/evals/runs/{run.id}").text
    assert 'name="force"' in page
    token = csrf_of(page)
    refused = client.post(f"/evals/runs/{run.id}/terminate", {"csrf": token})
    assert refused.status == 409 and "owned by a live process" in refused.text
    assert store.get_run(run.id).status == "running"
    forced = client.post(f"/evals/runs/{run.id}/terminate", {"csrf": token, "force": "yes"})
    assert forced.status == 303 and store.get_run(run.id).cause == "manual"


def test_logout_ends_the_session(service, store):
    run = start(store, "stuck", owner=dead_owner())
    client = Client(service)
    login(client)
    cookie = client.cookies["evalrunner_admin"]
    token = csrf_of(client.get("/evals").text)
    assert client.post("/evals/logout", {"csrf": token}).status == 303
    replay = Client(service)
    replay.cookies = {"evalrunner_admin": cookie}
    assert replay.post(f"/evals/runs/{run.id}/terminate", {"csrf": token}).status == 401
    assert store.get_run(run.id).status == "running"


def test_sessions_expire_and_do_not_survive_a_new_secret():
    sessions = AdminSessions("tok", ttl_s=60)
    value, session = sessions.issue(now=1000.0)
    assert sessions.check(value, now=1059.0) == session
    assert sessions.check(value, now=1061.0) is None
    assert AdminSessions("tok").check(value, now=1000.0) is None  # another process, another secret
    assert not sessions.csrf_ok(session, "") and sessions.csrf_ok(session, session.csrf_token)


def test_root_redirects_and_stylesheet_ships_with_the_package(service):
    client = Client(service)
    assert client.get("/").headers["location"] == "/evals"
    css = client.get("/evals/static/page.css")
    assert css.status == 200 and ".stuck-banner" in css.text


def _running_case(run, name):
    from evalrunner.store import CaseEvent

    return CaseEvent(f"{run.id}/{name}", run.id, name, "running", utcnow())

"""Read access over real HTTP on a real DuckDB file: with a read token, /evals and /metrics need a credential."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from evalrunner.cli import build_parser
from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.service.read_access import READ_COOKIE, guarded
from evalrunner.store import DuckDBStore

from service_support import Client, ServiceThread, dead_owner, finish, save, start

ADMIN = "admin-token-for-read-tests"
READ = "read-token-for-read-tests"


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "read.duckdb", faults=Faults(""))
    yield s
    s.close()


@pytest.fixture
def runs(store):
    """A finished run of suite `qa` and a stuck one, so every kind of page has something to show."""
    done = start(store, "qa", cases=("a",))
    save(store, done, "a", True)
    finish(store, done)
    earlier = start(store, "qa", cases=("a",))
    save(store, earlier, "a", False)
    finish(store, earlier)
    stuck = start(store, "qa", cases=("a",), owner=dead_owner())
    return done, earlier, stuck


@pytest.fixture
def guarded_service(store):
    svc = ServiceThread(store, ADMIN, read_token=READ)
    yield svc
    svc.stop()


def pages(runs) -> list[str]:
    done, earlier, stuck = runs
    return ["/evals", "/evals?status=failed&limit=5", f"/evals/runs/{stuck.id}",
            f"/evals/compare?a={earlier.id}&b={done.id}", "/evals/suites/qa"]


def bearer(client: Client, path: str, token: str):
    return client.request("GET", path, headers={"Authorization": f"Bearer {token}"})


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found, "no CSRF field on the page"
    return found.group(1)


def test_without_a_credential_metrics_is_401_and_pages_redirect_to_login_and_back(guarded_service, runs):
    client = Client(guarded_service)
    metrics = client.get("/metrics")
    assert metrics.status == 401 and metrics.headers["www-authenticate"].startswith("Bearer")
    assert "read token" in metrics.text and "evalrunner_runs" not in metrics.text
    for path in pages(runs):
        reply = client.get(path)
        assert reply.status == 303, path
        location = urlsplit(reply.headers["location"])
        assert location.path == "/evals/login" and parse_qs(location.query)["next"] == [path], path
        assert runs[0].id not in reply.text
    assert client.request("HEAD", "/evals").status == 303

    # Logging in with the read token comes back to the page one was sent away from.
    stuck_page = f"/evals/runs/{runs[2].id}"
    form = client.get(client.get(stuck_page).headers["location"])
    assert form.status == 200 and 'name="next" value="%s"' % stuck_page in form.text
    assert "Read or admin token" in form.text
    ok = client.post("/evals/login", {"token": READ, "next": stuck_page})
    assert ok.status == 303 and ok.headers["location"] == f"{stuck_page}?notice=logged-in-read"


def test_a_read_or_admin_bearer_token_opens_every_page_and_metrics_and_a_wrong_one_is_refused(guarded_service, runs):
    client = Client(guarded_service)
    for token in (READ, ADMIN):
        for path in [*pages(runs), "/metrics"]:
            reply = bearer(client, path, token)
            assert reply.status == 200, (token, path, reply.text[:200])
        assert "evalrunner_runs" in bearer(client, "/metrics", token).text
    for wrong in ("guess", READ + "x", READ[:-1], "tökén"):  # a non-ASCII token is refused, not a crash
        for path in ("/evals", f"/evals/runs/{runs[2].id}", "/metrics"):
            reply = client.request("GET", path, headers={"Authorization": f"Bearer {wrong}".encode("utf-8")})
            assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Bearer"), (wrong, path)
    assert client.request("GET", "/metrics", headers={"Authorization": f"Basic {READ}"}).status == 401


def test_a_read_session_reads_but_cannot_terminate_or_use_the_runner_api(guarded_service, store, runs):
    stuck = runs[2]
    client = Client(guarded_service)
    wrong = client.post("/evals/login", {"token": "guess"})
    assert wrong.status == 401 and "neither the read token nor the admin token" in wrong.text and not client.cookies
    ok = client.post("/evals/login", {"token": READ, "next": "https://evil.example/"})
    assert ok.status == 303 and ok.headers["location"] == "/evals?notice=logged-in-read"  # no open redirect
    assert set(client.cookies) == {READ_COOKIE}
    cookie = ok.set_cookies[0]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    assert READ not in cookie and "Secure" not in cookie  # plain HTTP, no secure_cookies

    for path in [*pages(runs), "/metrics"]:
        assert client.get(path).status == 200, path
    page = client.get(f"/evals/runs/{stuck.id}").text
    assert 'id="terminate-form"' not in page and 'id="login-to-terminate"' in page and "read-only" in page

    refused = client.post(f"/evals/runs/{stuck.id}/terminate", {"csrf": csrf_of(page)})
    assert refused.status == 401 and store.get_run(stuck.id).status == RunStatus.RUNNING.value
    api = client.request("GET", "/api/v1/runs", headers={"Authorization": f"Bearer {READ}"})
    assert api.status in (401, 403), api.text  # the runner API has its own tokens; the read token is not one
    assert client.request("GET", f"/api/v1/runs/{stuck.id}").status in (401, 403)  # nor is the cookie

    assert client.post("/evals/logout", {"csrf": "wrong"}).status == 403
    replay = dict(client.cookies)
    out = client.post("/evals/logout", {"csrf": csrf_of(page)})
    assert out.status == 303 and out.headers["location"] == "/evals/login?notice=logged-out" and not client.cookies
    ended = Client(guarded_service)
    ended.cookies = replay
    assert ended.get("/evals").status == 303 and ended.get("/metrics").status == 401


def test_the_admin_login_still_terminates_and_also_reads_metrics(guarded_service, store, runs):
    stuck = runs[2]
    client = Client(guarded_service)
    ok = client.post("/evals/login", {"token": ADMIN, "next": f"/evals/runs/{stuck.id}"})
    assert ok.status == 303 and ok.headers["location"].endswith("notice=logged-in")
    assert set(client.cookies) == {"evalrunner_admin", READ_COOKIE}  # the admin cookie's Path is /evals only
    assert client.get("/metrics").status == 200
    page = client.get(f"/evals/runs/{stuck.id}").text
    done = client.post(f"/evals/runs/{stuck.id}/terminate", {"csrf": csrf_of(page)})
    assert done.status == 303 and store.get_run(stuck.id).cause == "manual"

    admin_only = Client(guarded_service)  # an admin session alone (no read cookie) opens the pages too
    admin_only.cookies = {"evalrunner_admin": client.cookies["evalrunner_admin"]}
    assert admin_only.get("/evals").status == 200


def test_secure_cookies_marks_every_session_cookie_secure(store):
    svc = ServiceThread(store, ADMIN, read_token=READ, secure_cookies=True)
    try:
        for token in (ADMIN, READ):
            reply = Client(svc).post("/evals/login", {"token": token})
            assert reply.status == 303 and reply.set_cookies
            for cookie in reply.set_cookies:
                assert "Secure" in cookie, cookie
    finally:
        svc.stop()
    svc = ServiceThread(store, ADMIN, secure_cookies=True)  # without a read token as well
    try:
        reply = Client(svc).post("/evals/login", {"token": ADMIN})
        assert [c for c in reply.set_cookies if "Secure" in c] == reply.set_cookies != []
    finally:
        svc.stop()


def test_health_endpoints_stay_open(guarded_service):
    client = Client(guarded_service)
    for path in ("/healthz", "/livez", "/readyz"):
        assert client.get(path).status == 200, path
    assert client.get("/evals/login").status == 200
    assert client.get("/evals/static/page.css").status == 200  # the login form's stylesheet; no data in it


def test_without_a_read_token_everything_reads_as_before(store, runs):
    svc = ServiceThread(store, ADMIN)
    try:
        client = Client(svc)
        for path in [*pages(runs), "/metrics"]:
            assert client.get(path).status == 200, path
        form = client.get("/evals/login").text
        assert "Admin login" in form and "Admin token" in form
        assert client.post("/evals/login", {"token": READ}).status == 401  # no read token: nothing to match
        ok = client.post("/evals/login", {"token": ADMIN})
        assert ok.status == 303 and set(client.cookies) == {"evalrunner_admin"}
        assert not [c for c in ok.set_cookies if "Secure" in c]
    finally:
        svc.stop()


def test_a_read_token_without_an_admin_token_still_logs_readers_in(store, runs):
    svc = ServiceThread(store, None, read_token=READ)
    try:
        client = Client(svc)
        assert client.get("/evals").status == 303
        form = client.get("/evals/login").text
        assert 'id="token"' in form and "Read token" in form
        assert client.post("/evals/login", {"token": READ}).status == 303
        page = client.get(f"/evals/runs/{runs[2].id}")
        assert page.status == 200 and 'id="terminate-disabled"' in page.text
    finally:
        svc.stop()


def test_which_paths_are_guarded():
    for path in ("/metrics", "/evals", "/evals/", "/evals/runs/x", "/evals/compare", "/evals/suites/" + quote("a/b")):
        assert guarded(path), path
    for path in ("/", "/healthz", "/livez", "/readyz", "/api/v1/runs", "/evals/login", "/evals/logout",
                 "/evals/static/page.css", "/evalsx", "/metrics/x"):
        assert not guarded(path), path



def test_serve_and_controller_take_the_read_token_and_secure_cookie_flags():
    for command in ("serve", "controller"):
        args = build_parser().parse_args([command])
        assert args.read_token_env == "EVALRUNNER_READ_TOKEN" and args.secure_cookies is None
        args = build_parser().parse_args([command, "--read-token-env", "MY_READ", "--secure-cookies"])
        assert args.read_token_env == "MY_READ" and args.secure_cookies is True

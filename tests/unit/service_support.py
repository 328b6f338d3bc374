"""A real service on 127.0.0.1 for the page and metrics tests, and a small cookie-keeping HTTP client.

The app runs on its own event loop in a thread (as a separate process would,
but inspectable); the test reads and writes the same DuckDB store directly,
as another thread of the one writer process.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from aiohttp import web

from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import Owner, this_process
from evalrunner.service import build_app
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow
from evalrunner.store.records import RunRow


class ServiceThread:
    def __init__(self, store: DuckDBStore, admin_token: str | None, **kwargs):
        self.store = store
        self.loop = asyncio.new_event_loop()
        self.app = build_app(store, admin_token=admin_token, **kwargs)
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10), "the service did not start"
        self.origin = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str
    set_cookies: list[str] = field(default_factory=list)


class Client:
    """HTTP/1.1 without redirects, keeping cookies, sending an Origin header on POST like a browser."""

    def __init__(self, service: ServiceThread):
        self.service = service
        self.cookies: dict[str, str] = {}

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str], origin: str | None = "same", referer: str | None = None) -> Reply:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if origin == "same":
            headers["Origin"] = self.service.origin
        elif origin is not None:
            headers["Origin"] = origin
        if referer is not None:
            headers["Referer"] = referer
        return self.request("POST", path, urlencode(form).encode(), headers)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.service.port, timeout=10)
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        set_cookies = resp.headers.get_all("Set-Cookie") or []
        for line in set_cookies:
            jar = SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        conn.close()
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, text, set_cookies)


def start(store: DuckDBStore, suite: str, cases=("a", "b", "c"), timeout_s: float = 30.0, owner: Owner | None = None,
          at: datetime | None = None, run_id: str | None = None) -> RunRow:
    """Open a running run through the real store API, optionally as if at time `at`."""
    clock = store.clock
    if at is not None:
        store.clock = lambda: at
    try:
        return store.start_run(RunRequest(suite, tuple(cases), timeout_s, owner or this_process(),
                                          lock_policy=LockPolicy.ALLOW, run_id=run_id)).run
    finally:
        store.clock = clock


def save(store: DuckDBStore, run: RunRow, name: str, passed: bool | None, output: str | None = None,
         error: str | None = None, duration_ms: float = 25.0) -> None:
    now = utcnow()
    status = "failed" if passed is None else "completed"
    store.save_cases([CaseEvent(f"{run.id}/{name}", run.id, name, status, now, now, error=error,
                                cause="case_raised" if passed is None else None, passed=passed,
                                score=None if passed is None else float(passed), output=output,
                                duration_ms=duration_ms)])


def dead_owner() -> Owner:
    """An owner whose process is provably gone: a reaped child's PID on this host."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    me = this_process()
    return Owner(kind="process", host=me.host, pid=proc.pid, process_started_at=me.process_started_at)


def finish(store: DuckDBStore, run: RunRow, status: RunStatus = RunStatus.COMPLETED, cause: str | None = None) -> RunRow:
    return store.finish_run(run.id, status, cause, "it failed" if cause else None)


def ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)

"""Read access to the /evals page and /metrics: open by default, or behind a read token.

Without a read token (the default) nothing changes: whoever reaches the port
reads the page and /metrics. With one, every GET of `/evals…` and of
`/metrics` needs a credential, one of:

- `Authorization: Bearer <read token or admin token>`, for Prometheus scrapes
  and scripts;
- a read session cookie, from logging in on `/evals/login` with the read
  token (or with the admin token: an admin login opens a read session too);
- an admin session cookie (it only reaches `/evals…`: its Path is /evals).

Without one, /metrics answers 401 with `WWW-Authenticate: Bearer`, and a page
redirects to the login form with `next` pointing back to it; a wrong bearer
token gets 401 on pages too, since scripts, not people, send it.

Left open on purpose: the login form and logout (they are how one gets and
drops a credential), the stylesheet (the login form uses it; it is the
package's, not data), health endpoints, and the runner API (`/api/v1/…`),
which checks its own tokens and never accepts the read token.

A read session is an admin-style signed session under its own secret and its
own cookie, so it can never pass for an admin session: it cannot terminate a
run. Its cookie's Path is `/` so the browser sends it to /metrics as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiohttp import web

from .admin_session import COOKIE as ADMIN_COOKIE
from .admin_session import AdminSessions, Session
from .auth import bearer_token, same_secret
from .context import json_error
from .markup import query

READ_COOKIE = "evalrunner_read"
READ_COOKIE_PATH = "/"  # /metrics as well as /evals
LOGIN_PATH = "/evals/login"
OPEN_PREFIXES = (LOGIN_PATH, "/evals/logout", "/evals/static/")
REALM = 'Bearer realm="evalrunner"'


@dataclass
class ReadAccess:
    """Who may read the page and /metrics. `read_token` None or empty: everyone."""

    read_token: str | None
    admin_token: str | None = None
    admin_sessions: AdminSessions | None = None
    sessions: AdminSessions = field(init=False)  # read sessions: the admin machinery, its own secret

    def __post_init__(self) -> None:
        self.sessions = AdminSessions(self.read_token)

    @property
    def required(self) -> bool:
        return bool(self.read_token)

    def read_token_matches(self, candidate: str) -> bool:
        return self.sessions.token_matches(candidate)  # on bytes (auth.same_secret)

    def token_grants_reading(self, candidate: str) -> bool:
        admin = bool(self.admin_token and candidate) and same_secret(candidate, self.admin_token)  # type: ignore[arg-type]
        return self.read_token_matches(candidate) or admin

    def read_session(self, request: web.Request) -> Session | None:
        return self.sessions.check(request.cookies.get(READ_COOKIE))

    def session_grants_reading(self, request: web.Request) -> bool:
        if self.read_session(request) is not None:
            return True
        return self.admin_sessions is not None and self.admin_sessions.check(request.cookies.get(ADMIN_COOKIE)) is not None


def guarded(path: str) -> bool:
    if path == "/metrics":
        return True
    if path != "/evals" and not path.startswith("/evals/"):
        return False
    return not path.startswith(OPEN_PREFIXES)


def middleware(access: ReadAccess):
    """The one place that decides whether a read request may go on."""

    @web.middleware
    async def read_access(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if not access.required or request.method not in ("GET", "HEAD") or not guarded(request.path):
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization"))
        if token is not None and access.token_grants_reading(token):
            return await handler(request)
        if token is None and access.session_grants_reading(request):
            return await handler(request)
        if token is not None or request.path == "/metrics":
            why = "wrong token" if token is not None else "no credential"
            response = json_error(401, f"{why}: reading {request.path} needs `Authorization: Bearer <read token>` "
                                       "(or the admin token), or a session from /evals/login")
            response.headers["WWW-Authenticate"] = REALM
            return response
        return web.Response(status=303, headers={"Location": query(LOGIN_PATH, next=request.rel_url.raw_path_qs),
                                                 "Cache-Control": "no-store"})

    return read_access


def set_read_cookie(request: web.Request, response: web.StreamResponse, value: str, max_age: int,
                    secure_cookies: bool | None) -> None:
    # The admin cookie's attributes (admin_session.set_cookie) but Path=/, so /metrics gets it too.
    response.set_cookie(READ_COOKIE, value, max_age=max_age, path=READ_COOKIE_PATH, httponly=True,
                        samesite="Strict", secure=request.secure or bool(secure_cookies))


def clear_read_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(READ_COOKIE, path=READ_COOKIE_PATH)

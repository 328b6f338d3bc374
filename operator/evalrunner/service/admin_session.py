"""Admin sessions for the /evals page: log in once with the admin token, act with a signed cookie.

The page never shows the admin token. A person posts it once to the login
form; the answer is a session cookie (HttpOnly, SameSite=Strict, Path=/evals,
Secure when served over TLS or with `secure_cookies`) that holds only an expiry and a random nonce,
signed with HMAC-SHA256 under a secret made when the process starts. So a
restart, or a change of the admin token (which needs a restart), ends every
session.

Cross-site request forgery is refused three ways on every POST:
- the session cookie is SameSite=Strict, so another site's form cannot send it;
- a CSRF token derived from the session (HMAC of its nonce) must come back in
  a hidden form field;
- the Origin header (or, without one, the Referer) must name this host.
The login form has no session yet; the Origin check covers it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from .auth import same_secret

COOKIE = "evalrunner_admin"
COOKIE_PATH = "/evals"
SESSION_TTL_S = 8 * 3600.0


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    csrf_token: str


@dataclass
class AdminSessions:
    """Issues and checks sessions; `admin_token` None means the terminate action is disabled."""

    admin_token: str | None
    ttl_s: float = SESSION_TTL_S
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _ended: set[str] = field(default_factory=set)  # nonces logged out before they expired

    @property
    def enabled(self) -> bool:
        return bool(self.admin_token)

    def token_matches(self, candidate: str) -> bool:
        if not self.admin_token or not candidate:
            return False
        return same_secret(candidate, self.admin_token)

    def issue(self, now: float | None = None) -> tuple[str, Session]:
        nonce = secrets.token_urlsafe(18)
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        payload = f"{expires}.{nonce}"
        return f"{payload}.{self._sign('session', payload)}", Session(nonce, expires, self._csrf(nonce))

    def check(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie proves, or None (absent, forged, expired or logged out)."""
        if not self.enabled or not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3:
            return None
        expires_text, nonce, signature = parts
        if not same_secret(signature, self._sign("session", f"{expires_text}.{nonce}")):
            return None
        try:
            expires = int(expires_text)
        except ValueError:
            return None
        if expires < (now if now is not None else time.time()) or nonce in self._ended:
            return None
        return Session(nonce, expires, self._csrf(nonce))

    def end(self, session: Session) -> None:
        self._ended.add(session.nonce)

    def csrf_ok(self, session: Session, submitted: str | None) -> bool:
        return bool(submitted) and same_secret(submitted, session.csrf_token)  # type: ignore[arg-type]

    def _csrf(self, nonce: str) -> str:
        return self._sign("csrf", nonce)

    def _sign(self, purpose: str, payload: str) -> str:
        digest = hmac.new(self.secret, f"{purpose}:{payload}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def session_of(request: web.Request, sessions: AdminSessions) -> Session | None:
    return sessions.check(request.cookies.get(COOKIE))


def set_cookie(request: web.Request, response: web.StreamResponse, value: str, max_age: int,
               secure_cookies: bool | None = None) -> None:
    # Behind a TLS-terminating proxy this server sees plain HTTP: `secure_cookies` says what the browser uses.
    response.set_cookie(
        COOKIE, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="Strict",
        secure=request.secure or bool(secure_cookies),
    )


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path=COOKIE_PATH)


def cross_origin_problem(request: web.Request) -> str | None:
    """Why a POST does not come from this site's own pages, or None when it does."""
    origin = request.headers.get("Origin")
    if origin == "null":
        return "the request came from an opaque origin (Origin: null)"
    source = origin or request.headers.get("Referer")
    if not source:
        return "the request carries neither an Origin nor a Referer header"
    host = urlsplit(source).netloc.lower()
    if not host or host != (request.host or "").lower():
        return f"the request came from another site ({source})"
    return None

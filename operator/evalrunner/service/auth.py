"""Bearer tokens for the store service, and what each lets its caller do.

Three kinds of caller:
- the admin (the controller's, the CLI's and the page's token): everything;
- a runner pod, by its pod-bound service-account token (`controller/pod_tokens.py`
  turns it into a `RunnerGrant`): it writes exactly the one run the controller
  assigned to that pod, and reads the runs of its own EvalRun (the run it resumes);
- a token registered in the store's token table for a scope (`register_token`):
  reads and writes the runs of that scope. The controller no longer issues
  these; tests and the ingest benchmark use them to drive the API without a cluster.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..scope import Scope


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class RunnerGrant:
    """What a runner pod's token proves: the one run the controller assigned to that pod."""

    run_id: str
    parent_run_id: str | None
    suite: str | None
    namespace: str
    pod: str
    pod_uid: str


@dataclass(frozen=True)
class Caller:
    scope: Scope | None  # None for the admin
    is_admin: bool = False
    grant: RunnerGrant | None = None  # a runner pod: writes this run only

    def may_read(self, run_scope: Scope | None) -> bool:
        return self.is_admin or (run_scope is not None and run_scope == self.scope)

    def may_write(self, run_id: str, run_scope: Scope | None) -> bool:
        if not self.may_read(run_scope):
            return False
        return self.grant is None or run_id == self.grant.run_id


ADMIN = Caller(None, is_admin=True)


class TokenRefused(Exception):
    """A token that authenticates no caller; the message says why (it is safe to show to the caller)."""


PodTokenCheck = Callable[[str], Caller]  # a runner pod's token -> its caller, or TokenRefused (may call the API)


# A token found in the table is trusted this long before it is looked up again. Revocations by this
# process (the controller's, when an EvalRun ends) empty the cache at once; a miss is never cached,
# so a token registered a moment ago works on its first request.
TOKEN_TTL_S = 5.0
RUN_SCOPES_MAX = 100_000


def bearer_token(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    return header[len("Bearer "):].strip() or None


def is_service_account_token(token: str) -> bool:
    """A JWT (three dot-separated parts), as the API server issues; table tokens have no dots."""
    return token.count(".") == 2


def same_secret(given: str, expected: str) -> bool:
    """Constant-time, on bytes: `compare_digest` refuses non-ASCII text (a 500 instead of a 401)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


class TokenCheck:
    """Resolves a bearer token to a Caller, caching what the token table said for a few seconds.

    Every request is still checked: the cache only saves the store round
    trip. `revocations()` is the store's revocation counter: when it moves,
    everything cached is forgotten.
    """

    def __init__(self, lookup: Callable[[str], Scope | None], admin_token: str | None = None,
                 local_token: str | None = None,
                 ttl_s: float = TOKEN_TTL_S, revocations: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.monotonic):
        self._lookup = lookup
        self._admin = tuple(t for t in (admin_token, local_token) if t)  # either makes its caller the admin
        self._ttl_s = ttl_s
        self._revocations = revocations
        self._seen_revocations = revocations()
        self._clock = clock
        self._cache: dict[str, tuple[Scope, float]] = {}  # token -> (scope, trusted until)

    def cached(self, token: str) -> Caller | None:
        """The caller without a store lookup: the admin, or a token looked up less than the TTL ago."""
        if any(same_secret(token, admin) for admin in self._admin):
            return ADMIN
        revocations = self._revocations()
        if revocations != self._seen_revocations:
            self._cache.clear()
            self._seen_revocations = revocations
        hit = self._cache.get(token)
        if hit is None:
            return None
        scope, until = hit
        if self._clock() >= until:
            self._cache.pop(token, None)
            return None
        return Caller(scope)

    def look_up(self, token: str) -> Caller | None:
        """Ask the token table (a store read; run it off the event loop). None: unknown or revoked."""
        cached = self.cached(token)
        if cached is not None:
            return cached
        seen = self._seen_revocations
        scope = self._lookup(token)
        if scope is None:
            return None
        if self._revocations() == seen:  # a revocation during the lookup: do not cache what it may have undone
            self._cache[token] = (scope, self._clock() + self._ttl_s)
        return Caller(scope)

    def caller(self, header: str | None) -> Caller | None:
        token = bearer_token(header)
        return None if token is None else self.look_up(token)


class RunScopes:
    """run id -> the scope of its EvalRun, for runs that exist.

    A run's scope is written when its row is inserted and never changes, so
    an entry never goes stale while the row exists; entries are evicted
    least recently used. A run deleted by retention may linger here: its
    requests then pass the scope check and find no running row (fenced, or
    404), which is what they would get anyway.
    """

    def __init__(self, max_entries: int = RUN_SCOPES_MAX):
        self._max = max_entries
        self._scopes: OrderedDict[str, Scope | None] = OrderedDict()

    def get(self, run_id: str) -> tuple[bool, Scope | None]:
        """(known, scope); the scope of a known run may be None (a local run: the admin's alone)."""
        if run_id not in self._scopes:
            return False, None
        self._scopes.move_to_end(run_id)
        return True, self._scopes[run_id]

    def remember(self, run_id: str, scope: Scope | None) -> None:
        self._scopes[run_id] = scope
        self._scopes.move_to_end(run_id)
        while len(self._scopes) > self._max:
            self._scopes.popitem(last=False)

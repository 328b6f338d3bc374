"""Bearer tokens for the store service.

Each EvalRun gets its own token (a Secret the controller creates); the token
maps to the EvalRun's scope and may write only runs of that scope. An admin
token (the controller's and the CLI's) may read and write everything.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Callable

from ..scope import Scope


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    scope: Scope | None  # None for the admin
    is_admin: bool = False

    def may_write(self, run_scope: Scope | None) -> bool:
        return self.is_admin or (run_scope is not None and run_scope == self.scope)


ADMIN = Caller(None, is_admin=True)


class TokenCheck:
    """Resolves `Authorization: Bearer …` to a Caller; caches lookups of the token table."""

    def __init__(self, lookup: Callable[[str], Scope | None], admin_token: str | None = None):
        self._lookup = lookup
        self._admin = admin_token
        self._cache: dict[str, Scope] = {}

    def caller(self, header: str | None) -> Caller | None:
        if not header or not header.startswith("Bearer "):
            return None
        token = header[len("Bearer "):].strip()
        if not token:
            return None
        if self._admin and hmac.compare_digest(token, self._admin):
            return ADMIN
        scope = self._cache.get(token)
        if scope is None:
            scope = self._lookup(token)
            if scope is None:
                return None
            self._cache[token] = scope
        return Caller(scope)

"""A tiny autoescaping HTML builder for the server-rendered /evals page.

Every value that goes into markup is escaped unless it is already `Safe`
(markup this module built). Templates are `str.format` strings written in
this package, never user data, so a suite name, a case output or an error
cannot open a tag: `html("<td>{}</td>", run.suite)` escapes the suite name,
and so does every other interpolation.
"""

from __future__ import annotations

import html as _html
from typing import Any, Iterable
from urllib.parse import quote, urlencode


class Safe(str):
    """Markup that is already escaped; `esc` passes it through unchanged."""

    __slots__ = ()


def esc(value: Any) -> Safe:
    if isinstance(value, Safe):
        return value
    if value is None:
        return Safe("")
    return Safe(_html.escape(str(value), quote=True))


def html(template: str, *args: Any, **kwargs: Any) -> Safe:
    """Fill `template` (a constant written here) with escaped values."""
    return Safe(template.format(*(esc(a) for a in args), **{k: esc(v) for k, v in kwargs.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Safe:
    return Safe(esc(sep).join(esc(p) for p in parts))


def path_segment(value: str) -> str:
    """A value (a run id, say) as one URL path segment; the caller still escapes the whole URL."""
    return quote(value, safe="")


def query(base: str, **params: Any) -> str:
    """`base?k=v&...` without the empty parameters."""
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{base}?{urlencode(kept)}" if kept else base

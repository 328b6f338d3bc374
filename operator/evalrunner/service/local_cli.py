"""The CLI's commands on a database `evalrunner serve` holds, run inside the server.

A command run elsewhere cannot open the file (DuckDB: one process), so the
CLI sends its arguments here (`POST /api/v1/local/cli`) and prints what
comes back. Here the command runs as it would have run there, the same code
on the server's own store, so its writes (a recovery, a sweep) go through
the server's one writer, and its output and exit code are the same.

Only the same user may call it: the token is the one in the server's
record beside the database (local_server.py, mode 0600); the admin token
does not do. Only the commands that read or repair rows are accepted; the
server's own configuration (serve, controller) is not reachable this way.
Commands run one at a time: their `print`s are captured by swapping
sys.stdout, which the server itself never writes to.
"""

from __future__ import annotations

import contextlib
import io
import threading
from typing import Any

from aiohttp import web

from ..store import wire
from ..store.duckdb_store import DuckDBStore
from .auth import bearer_token, same_secret
from .context import CALLS, STORE, http_error

ACCEPTED = frozenset({"runs", "show", "recover", "verify", "sweep", "compare"})
_ONE_AT_A_TIME = threading.Lock()


def add_routes(app: web.Application, token: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        given = bearer_token(request.headers.get("Authorization"))
        if given is None or not same_secret(given, token):
            raise http_error(web.HTTPUnauthorized, "this call needs the token in the server's record beside the "
                                                   "database (<db>.server.json), readable by its user only")
        try:
            body = await request.json()
            argv = body["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise http_error(web.HTTPBadRequest, 'body: expected {"argv": ["COMMAND", "ARG", ...]}') from None
        answer = await request.app[CALLS](run_command, request.app[STORE], argv)
        return web.json_response(answer)

    app.router.add_post(f"{wire.API_PREFIX}/local/cli", handler)


def run_command(store: DuckDBStore, argv: list[str]) -> dict[str, Any]:
    """Parse and run an accepted `evalrunner` command on `store`: its exit code, stdout and stderr."""
    from .. import cli

    out, err = io.StringIO(), io.StringIO()
    with _ONE_AT_A_TIME, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = cli.parse(cli.build_parser(), argv)
        except SystemExit as exc:  # argparse said what was wrong, on the captured stderr
            return {"exit_code": exc.code if isinstance(exc.code, int) else 2, "stdout": out.getvalue(),
                    "stderr": err.getvalue()}
        if args.command not in ACCEPTED:
            return {"exit_code": cli.EXIT_BAD_INPUT, "stdout": "",
                    "stderr": f"evalrunner: error: `{args.command}` does not run through a server\n"}
        args._store = store
        args.db = store.path
        args.log_format = "console"  # its errors, as lines on the caller's stderr
        code = cli.dispatch(args, argv)
    return {"exit_code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

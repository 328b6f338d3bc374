"""The `evalrunner` command.

Exit codes:
  0  the run completed and every case passed (other commands: success; `compare`: no regression)
  1  a case failed or errored, or the run was terminated; `verify`/`doctor` found a problem;
     `compare` found a regression (a case that passed in the first run does not in the second)
  2  bad input: a malformed suite file, an unknown, ambiguous or empty run id, bad arguments,
     a --db file that is no usable DuckDB database (left untouched);
     `compare` given a run that is still running
  3  the run could not be recorded: the database is locked, unwritable or full,
     or the final status write failed (the row is closed by the next command)
  4  refused by the suite's lock policy (Forbid): another run of the suite is live
  130/143  interrupted by SIGINT/SIGTERM; the run row is failed with cause shutdown_requested
"""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb

# Imported here: what every local command needs. The store service, the controller, the HTTP
# store client and the doctor are imported by their commands, so `run` and `runs` start fast.
from . import __version__, admission, local_server, log, output, recovery, report, summary
from .arguments import PORT, SECONDS, number, whole_number
from .models import RunStatus, Suite
from .runner import ResumeError, RunOptions, RunResult, StatusWriteFailed, run_suite
from .timing import (API_REQUEST_TIMEOUT_S, DEADLINE_GRACE_S, HEARTBEAT_LEASE_S, JOB_TTL_S, SCAN_INTERVAL_S,
                     SHUTDOWN_DEFER_S, SWEEP_INTERVAL_S)
from .owner import pod_from_env, this_process
from .store import DuckDBStore, StoreError
from .store.errors import StoreFileUnusable, StoreLockedError, translate
from .store.duckdb_store import utcnow
from .store.records import CaseRow, RunRow, StrandedCases
from .suites import SuiteFileError, load_suite

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_RECORDED, EXIT_REFUSED = 0, 1, 2, 3, 4

# The event a refused command logs instead of its plain-text error line under --log-format json.
CLI_ERROR = "cli.error"


def default_db_path() -> str:
    """`$EVALRUNNER_DB`, else `$XDG_DATA_HOME/evalrunner/evalrunner.duckdb` (~/.local/share by default)."""
    if os.environ.get("EVALRUNNER_DB"):
        return os.environ["EVALRUNNER_DB"]
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "evalrunner", "evalrunner.duckdb")


class UsageError(Exception):
    pass


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    if args.junit is not None:
        refuse_unwritable("--junit", args.junit)  # before the run: a report it cannot write would fail it
    suite = load_suite(args.suite)
    try:
        with open_store(args) as store:
            store.require_reserve()
            return _run(args, suite, store, make_room=store.release_reserve)
    except StoreLockedError as exc:  # raised by the open, before anything ran
        server = local_server.find(args.db, exc.pid)
        if server is None:
            raise
    # `evalrunner serve` holds the file: the suite runs here, and the server writes its rows.
    from .store.http_client import HttpStore

    return _run(args, suite, HttpStore(server.url, server.token), make_room=None)


def _run(args: argparse.Namespace, suite: Suite, store: Any, make_room: Callable[[], bool] | None) -> int:
    """Run the suite on `store`: the local file, or the API of the server that holds it."""
    bar = report.ProgressBar(len(suite.cases), enabled=None if args.progress else False)
    if bar.enabled:
        # Log lines are written above the bar, never on its line. On a console the bar shows every
        # case, and a line per case would scroll it away (--log-level debug keeps them).
        quiet = log.PER_CASE_EVENTS if args.log_format == "console" else frozenset()
        log.configure(args.log_format, args.log_level, stream=bar.log_stream(), quiet=quiet)
    options = RunOptions(
        resume_from=resolve_run_id(store, args.resume).id if args.resume is not None else None,
        deadline_grace_s=args.deadline_grace,
        source=str(Path(args.suite).resolve()),
        search_path=(str(Path(args.suite).resolve().parent),),
        # Beside the database, in the room the reserve frees if the disk is full; and on stderr.
        keep_summary=summary.echoing(summary.spooler(args.db, make_room=make_room), args.log_format),
    )
    try:
        result = asyncio.run(run_suite(suite, store, options, progress=lambda _id, o: bar.update(o.verdict)))
    except StatusWriteFailed as failed:
        # The run happened; only its last write did not. Its reports still say what it did (exit 3 follows).
        bar.finish()
        if failed.run is not None and failed.unwritten is not None:
            _report(args, *report.as_the_runner_meant(failed.run, failed.unwritten),
                    status_write_failed=failed.unwritten.write_error)
        raise
    finally:
        bar.finish()
    _report(args, result.run, store.cases(result.run.id))
    return run_exit_code(result)


def _report(args: argparse.Namespace, run: RunRow, cases: Sequence[CaseRow],
            status_write_failed: str | None = None) -> None:
    """The run's reports: JUnit XML if asked for, and JSON or a table on stdout."""
    if args.junit is not None:
        Path(args.junit).write_bytes(report.junit_xml(run, cases, status_write_failed))
    if args.json:
        data: dict[str, Any] = {"run": report.run_to_dict(run), "cases": [report.case_to_dict(c) for c in cases]}
        if status_write_failed is not None:
            data["status_write_failed"] = status_write_failed
        print(report.dumps(data))
    else:
        text = report.run_summary_text(run, cases)
        if status_write_failed is not None:
            text += f"\nnot recorded: the final status write failed ({status_write_failed})"
        print(text)


def cmd_run_suite(args: argparse.Namespace) -> int:
    """Inside a Job pod: report to the store service, and leave a summary as the termination message."""
    suite = load_suite(args.suite)
    if not args.store_url:
        raise UsageError("run-suite needs --store-url (or EVALRUNNER_STORE_URL)")
    from .store.http_client import HttpStore

    store = HttpStore(args.store_url, os.environ.get("EVALRUNNER_STORE_TOKEN"),
                      token_file=os.environ.get("EVALRUNNER_STORE_TOKEN_FILE"))
    keep = summary.termination_message_writer(args.termination_log)
    options = RunOptions(
        owner=pod_from_env() or this_process(),
        resume_from=args.resume,
        run_id=args.run_id,
        deadline_grace_s=args.deadline_grace,
        source=str(args.suite),
        search_path=(str(Path(args.suite).resolve().parent),),
        keep_summary=summary.echoing(keep, args.log_format),
        shutdown_defer_s=args.shutdown_defer,
    )
    result = asyncio.run(run_suite(suite, store, options))
    run = result.run
    keep(summary.RunSummary(run.id, run.suite, run.status, run.cause, run.error,
                            run.passed or 0, run.failed or 0, run.errored or 0))
    return run_exit_code(result)


def cmd_serve(args: argparse.Namespace) -> int:
    """The store service on a local file: runners elsewhere report with --store-url, and this
    host's CLI works through it (local_server.py)."""
    from .service import build_app

    with open_store(args) as store:
        admin = os.environ.get(args.admin_token_env)
        local_token = local_server.new_token()
        app = build_app(store, admin_token=admin, sweep_interval_s=args.sweep_interval, retain_days=args.retain_days,
                        local_token=local_token, read_token=os.environ.get(args.read_token_env),
                        secure_cookies=args.secure_cookies)
        asyncio.run(_serve(app, args, store, admin, local_token))
    return EXIT_OK


async def _serve(app: Any, args: argparse.Namespace, store: DuckDBStore, admin: str | None, local_token: str) -> None:
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else args.port
    record = local_server.publish(store.path, local_server.client_url(args.host, port), local_token)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    log.get().info("service.listening", url=f"http://{args.host}:{port}", db=store.path,
                   page=f"{record.url}/evals", cli=f"commands on {store.path} work through it",
                   terminate="enabled" if admin else f"disabled (set ${args.admin_token_env} to enable)",
                   reading="needs the read token" if os.environ.get(args.read_token_env) else
                           f"open (set ${args.read_token_env} to require a token)")
    try:
        await stop.wait()
    finally:
        local_server.withdraw(store.path, record)
        await runner.cleanup()


def cmd_controller(args: argparse.Namespace) -> int:
    """The Kubernetes operator, with the store service in the same process (the one DuckDB writer)."""
    from .controller.main import ControllerOptions, NoKubernetesCredentials, run_controller

    options = ControllerOptions(
        db=args.db, kubeconfig=args.kubeconfig, namespaces=tuple(args.namespace or ()), host=args.host, port=args.port,
        store_url_for_pods=args.store_url_for_pods, admin_token=os.environ.get(args.admin_token_env),
        scan_interval_s=args.scan_interval, sweep_interval_s=args.sweep_interval,
        heartbeat_lease_s=args.heartbeat_timeout, job_ttl_s=args.job_ttl if args.job_ttl >= 0 else None,
        api_timeout_s=args.api_timeout, runner_image=args.runner_image, retain_days=args.retain_days,
        token_audience=args.token_audience,
        read_token=os.environ.get(args.read_token_env), secure_cookies=args.secure_cookies,
    )
    try:
        return run_controller(options)
    except NoKubernetesCredentials as exc:
        raise UsageError(str(exc)) from None


def run_exit_code(result: RunResult) -> int:
    """0 all passed; 1 a case failed or errored, or the run failed; 128+N after signal N."""
    if result.shutdown_signal is not None:
        return 128 + int(result.shutdown_signal)
    run = result.run
    if run.status == RunStatus.COMPLETED.value and not run.failed and not run.errored:
        return EXIT_OK
    return EXIT_FAILED


def cmd_runs(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        runs = store.list_runs(status=args.status, suite=args.suite, limit=args.limit)
        if args.json:
            print(report.dumps([report.run_to_dict(r) for r in runs]))
        elif args.quiet:
            print("\n".join(r.id for r in runs))
        else:
            print(report.runs_text(runs) if runs else "no runs")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        run = resolve_run_id(store, args.run_id)
        cases = store.cases(run.id)
        attempts = store.attempts(run.id)
        if args.json:
            print(report.dumps({
                "run": report.run_to_dict(run),
                "cases": [report.case_to_dict(c) for c in cases],
                "attempts": [a.id for a in attempts],
            }))
            return EXIT_OK
        print(report.run_summary_text(run, cases))
        if run.owner:
            print(f"owner: {run.owner.describe()}")
        if len(attempts) > 1:
            print("attempts: " + " -> ".join(f"{a.id} ({a.status})" for a in attempts))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare run A (before) with run B (after), case by case; exit 1 on a regression, so CI can gate on it."""
    from . import compare

    with open_store(args) as store:
        a, b = resolve_run_id(store, args.run_a), resolve_run_id(store, args.run_b)
        refused = compare.refusal(a, b)
        if refused:
            raise UsageError(refused)
        result = compare.read_comparison(store, a, b)
    print(compare.render(result, args.format, list_unchanged=args.all), end="" if args.format == "markdown" else "\n")
    return EXIT_FAILED if result.regressions else EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    with open_store(args, recovering=(args.run_id, recovery.manual_note(args.reason))) as store:
        run = resolve_run_id(store, args.run_id)
        swept = next((closed for closed in _swept(args).terminated if closed.id == run.id), None)
        if swept is not None:
            # Its owner is provably dead: closed with that cause (more precise than `manual`) and the reason.
            print(f"run {swept.id} terminated: {swept.status} ({swept.cause}): {swept.error}")
            return EXIT_OK
        if run.status != RunStatus.RUNNING.value:
            print(f"run {run.id} is already {run.status}" + (f" ({run.cause})" if run.cause else "") + "; nothing to do")
            return EXIT_OK
        try:
            closed = recovery.recover_run(store, run, args.reason, force=args.force)
        except recovery.RecoveryRefused as exc:
            raise UsageError(str(exc)) from None
        print(f"run {run.id} terminated: failed (manual)" if closed else f"run {run.id} was closed meanwhile")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    # open_store already swept with the default lease; sweep again with the one asked for.
    with open_store(args) as store:
        again = recovery.sweep(store, utcnow(), heartbeat_timeout_s=args.heartbeat_timeout, db_path=store.path)
        terminated = _swept(args).terminated + again.terminated
        repaired = _swept(args).repaired + again.repaired
        for run in terminated:
            print(f"terminated {run.id} ({run.suite}): {run.cause}: {run.error}")
        for stranded in repaired:
            print(_stranded_line("closed", stranded))
        print(f"{len(terminated)} run(s) terminated; {sum(s.count for s in repaired)} case row(s) closed; "
              f"{len(store.running_runs())} run(s) still running")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """The runbook's Verify: no row is still `running` whose owner is gone.

    Case rows found `running` under a closed run fail the check even when the
    recovery on open has just closed them: nothing the product does leaves
    them, so something (manual SQL, a bug) broke the invariant.
    """
    with open_store(args) as store:
        for run in _swept(args).terminated:
            print(f"terminated {run.id} ({run.suite}): {run.cause}: {run.error}")
        stranded = _swept(args).repaired + store.stranded_cases()
        for found in _swept(args).repaired:
            print(_stranded_line("REPAIRED", found))
        for found in store.stranded_cases():
            print(_stranded_line("STRANDED", found))
        stuck, live = [], []
        for run in store.running_runs():
            orphan = recovery.classify_orphan(run, utcnow(), lambda o: recovery.local_liveness(o))
            (stuck if orphan else live).append((run, orphan))
        for run, _ in live:
            state = "is live" if recovery.local_liveness(run.owner) == "alive" else "cannot be checked from this host"
            print(f"running {run.id} ({run.suite}): owner {run.owner.describe() if run.owner else '?'} {state}")
        for run, orphan in stuck:
            print(f"STUCK {run.id} ({run.suite}): {orphan.cause.value}: {orphan.reason}")
        if stuck:
            print(f"{len(stuck)} stuck run(s); `evalrunner sweep` terminates them")
        if stranded:
            print(f"{sum(s.count for s in stranded)} case row(s) were left running under closed runs "
                  "(the runbook's manual SQL updates only eval_runs); " +
                  ("they are now failed with their run's cause" if not store.stranded_cases()
                   else "`evalrunner sweep` closes them"))
        if stuck or stranded:
            return EXIT_FAILED
        print("ok: no run is stuck at running")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    checks = doctor.diagnose(args.db)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


# ---------------------------------------------------------------- helpers


def _swept(args: argparse.Namespace) -> recovery.SweepResult:
    """What the recovery on open did (nothing with --no-recover)."""
    return getattr(args, "_swept", None) or recovery.SweepResult()


def _stranded_line(label: str, stranded: StrandedCases) -> str:
    return (f"{label} {stranded.count} case row(s) running under {stranded.run_status} run {stranded.run_id} "
            f"({stranded.suite}); cause {stranded.cause}")


class open_store:
    """Open the database and, unless --no-recover, terminate orphaned runs first."""

    def __init__(self, args: argparse.Namespace, recovering: tuple[str, str] | None = None):
        self.args = args
        self.recovering = recovering  # (run id or prefix, note): `recover`'s run, closed with its reason

    def __enter__(self) -> DuckDBStore:
        given = getattr(self.args, "_store", None)  # inside `serve`, which holds the file (local_cli.py)
        self.store = given or DuckDBStore.open(self.args.db)
        self.owns_store = given is None
        if not self.args.no_recover:
            recovering = None
            if self.recovering is not None:
                with contextlib.suppress(UsageError):
                    recovering = (resolve_run_id(self.store, self.recovering[0]).id, self.recovering[1])
            self.args._swept = recovery.sweep(self.store, utcnow(), db_path=self.store.path, recovering=recovering)
        return self.store

    def __exit__(self, *exc: object) -> None:
        if self.owns_store:
            self.store.close()


def resolve_run_id(store: DuckDBStore, text: str) -> RunRow:
    if not text.strip():
        raise UsageError("a run id cannot be empty (an empty prefix would match any run)")
    run = store.get_run(text)
    if run:
        return run
    matches = store.find_runs_by_prefix(text)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"no run with id {text!r} in {store.path} (see `evalrunner runs`)")
    raise UsageError(f"run id prefix {text!r} is ambiguous: {', '.join(m.id for m in matches)}")


def refuse_unwritable(option: str, path: str) -> None:
    """A UsageError unless a file can be written at `path` (its directory exists and is writable)."""
    target = Path(path)
    directory = target.parent
    if target.is_dir():
        raise UsageError(f"{option}: cannot write {path}: it is a directory")
    if not directory.is_dir():
        raise UsageError(f"{option}: cannot write {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{option}: cannot write {path}: permission denied")


def add_retention_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retain-days", type=number("days"), default=0, metavar="N",
                   help="delete completed and failed runs (with their cases) that ended more than N days ago, "
                        "hourly; never a running one (default 0: keep everything)")



def add_read_access_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--read-token-env", default="EVALRUNNER_READ_TOKEN", metavar="VAR",
                   help="environment variable holding the read token: when it is set, reading /evals and /metrics "
                        "needs it (or the admin token) as a bearer token or a login (default %(default)s)")
    p.add_argument("--secure-cookies", action="store_true", default=None,
                   help="mark every session cookie Secure, for serving behind a TLS-terminating proxy "
                        "(default: Secure only when this server itself speaks TLS)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=f"DuckDB file (default: {default_db_path()})")
    common.add_argument("--log-format", choices=log.LOG_FORMATS, default=argparse.SUPPRESS)
    common.add_argument("--log-level", type=str.lower, choices=log.LOG_LEVELS, default=argparse.SUPPRESS)
    common.add_argument("--no-recover", action="store_true", default=argparse.SUPPRESS,
                        help="do not terminate orphaned runs on open (inspect only)")

    parser = argparse.ArgumentParser(
        prog="evalrunner", parents=[common], description="Run eval suites; never leave a run stuck at running.",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"evalrunner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=fn)
        return p

    p = add("run", cmd_run, "run a suite file and record it")
    p.add_argument("suite", metavar="SUITE.yaml")
    p.add_argument("--json", action="store_true", help="print the run and its cases as JSON")
    p.add_argument("--junit", metavar="PATH", help="also write JUnit XML to PATH")
    p.add_argument("--resume", metavar="RUN_ID", help="new attempt that carries over RUN_ID's completed cases")
    p.add_argument("--deadline-grace", type=SECONDS, default=DEADLINE_GRACE_S, metavar="S",
                   help="seconds added to timeout_seconds * cases for the run's deadline (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = add("run-suite", cmd_run_suite, "run a suite in a Job pod, reporting to the store service")
    p.add_argument("suite", metavar="SUITE.yaml")
    p.add_argument("--store-url", default=os.environ.get("EVALRUNNER_STORE_URL"),
                   help="store service URL (default $EVALRUNNER_STORE_URL); token from the file $EVALRUNNER_STORE_TOKEN_FILE names, or $EVALRUNNER_STORE_TOKEN")
    p.add_argument("--run-id", help="the run id the controller chose for this attempt")
    p.add_argument("--resume", metavar="RUN_ID", help="carry over RUN_ID's completed cases")
    p.add_argument("--deadline-grace", type=SECONDS, default=DEADLINE_GRACE_S, metavar="S")
    p.add_argument("--termination-log", default=os.environ.get("EVALRUNNER_TERMINATION_LOG", "/dev/termination-log"),
                   help="where the final summary goes (the container's terminationMessagePath)")
    p.add_argument("--shutdown-defer", type=SECONDS, default=SHUTDOWN_DEFER_S, metavar="S",
                   help="on SIGTERM, wait this long for the controller to record why before writing "
                        "shutdown_requested (default %(default)s)")

    p = add("serve", cmd_serve, "serve the /evals page, /metrics and the store API for a local database file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8080)
    p.add_argument("--admin-token-env", default="EVALRUNNER_ADMIN_TOKEN", metavar="VAR",
                   help="environment variable holding the admin token, which also enables the page's "
                        "terminate action (default %(default)s)")
    add_read_access_flags(p)
    add_retention_flag(p)
    p.add_argument("--sweep-interval", type=SECONDS, default=SWEEP_INTERVAL_S, metavar="S",
                   help="seconds between background sweeps for orphaned runs; 0 disables them (default %(default)s)")

    p = add("controller", cmd_controller, "run the Kubernetes operator and the store service")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                   help="kubeconfig file (default $KUBECONFIG, else in-cluster config)")
    p.add_argument("--namespace", action="append", metavar="NS",
                   help="watch this namespace; repeat for several (default: every namespace)")
    p.add_argument("--host", default="0.0.0.0", help="store service address (default %(default)s)")
    p.add_argument("--port", type=PORT, default=8080)
    p.add_argument("--store-url-for-pods", metavar="URL",
                   help="the store service URL as runner pods reach it (default http://HOST:PORT)")
    p.add_argument("--admin-token-env", default="EVALRUNNER_ADMIN_TOKEN", metavar="VAR")
    add_read_access_flags(p)
    p.add_argument("--scan-interval", type=SECONDS, default=SCAN_INTERVAL_S, metavar="S",
                   help="how often pods are classified against the clock (default %(default)s)")
    p.add_argument("--sweep-interval", type=SECONDS, default=SWEEP_INTERVAL_S, metavar="S")
    p.add_argument("--heartbeat-timeout", type=SECONDS, default=HEARTBEAT_LEASE_S, metavar="S")
    p.add_argument("--job-ttl", type=number("seconds", minimum=-1), default=JOB_TTL_S, metavar="S",
                   help="delete a finished runner Job (and its pod) this long after its run row closed; "
                        "-1 keeps them (default %(default)s)")
    p.add_argument("--runner-image", default=os.environ.get("EVALRUNNER_RUNNER_IMAGE", f"evalrunner:{__version__}"),
                   metavar="IMAGE", help="the image of runner pods whose EvalRun names none: the controller's own "
                                         "(the Helm chart passes it; default %(default)s)")
    p.add_argument("--api-timeout", type=SECONDS, default=API_REQUEST_TIMEOUT_S, metavar="S",
                   help="give up on a Kubernetes API request after this long (default %(default)s)")
    p.add_argument("--token-audience", default="evalrunner-store", metavar="AUDIENCE",
                   help="audience of the service-account tokens runner pods present to the store; give each "
                        "controller its own, so one's runners cannot write to another (default %(default)s)")
    add_retention_flag(p)

    p = add("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--status", choices=[s.value for s in RunStatus])
    p.add_argument("--suite")
    p.add_argument("--limit", type=whole_number(1), default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="run ids only, one a line (for scripts)")

    p = add("show", cmd_show, "show one run with its cases and attempts")
    p.add_argument("run_id", metavar="RUN_ID", help="run id or a unique prefix")
    p.add_argument("--json", action="store_true")

    p = add("compare", cmd_compare, "compare two runs case by case; exit 1 if a case that passed in A does not in B")
    p.add_argument("run_a", metavar="RUN_A", help="the run before: run id or a unique prefix")
    p.add_argument("run_b", metavar="RUN_B", help="the run after: run id or a unique prefix")
    p.add_argument("--format", choices=("table", "json", "markdown"), default="table",
                   help="markdown: for a pull-request comment (default %(default)s)")
    p.add_argument("--all", action="store_true", help="also list the unchanged cases")

    p = add("recover", cmd_recover, "terminate a stuck run (the runbook's manual recovery)")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--reason", help="recorded in the row's error")
    p.add_argument("--force", action="store_true", help="even if its owner process is alive")

    p = add("sweep", cmd_sweep, "terminate runs whose owner died, whose heartbeat lapsed or deadline passed")
    p.add_argument("--heartbeat-timeout", type=SECONDS, default=HEARTBEAT_LEASE_S, metavar="S")

    add("verify", cmd_verify, "the runbook's Verify: exit non-zero if any run is stuck at running")
    add("doctor", cmd_doctor, "check the database: lock holder, writability, free disk, schema version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    output.tolerate_closed_pipes()  # a reader that goes away (`| head`) must not change a run's result
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(parser, argv)
    try:
        log.configure(args.log_format, args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    return dispatch(args, argv)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    for name, default in (("db", default_db_path()), ("log_format", os.environ.get("EVALRUNNER_LOG_FORMAT", "console")),
                          ("log_level", os.environ.get("EVALRUNNER_LOG_LEVEL", "info")),
                          ("no_recover", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the command; a database held by `evalrunner serve` is worked on through it."""
    fail = functools.partial(_fail, log_format=args.log_format)
    try:
        return args.func(args)
    except StoreLockedError as exc:
        server = local_server.find(args.db, exc.pid) if args.command in THROUGH_SERVER else None
        if server is None:
            return fail(str(exc), EXIT_NOT_RECORDED)
        return _through_server(server, argv, fail)
    except SuiteFileError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except StoreFileUnusable as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except (UsageError, ResumeError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except admission.RunRefused as exc:
        return fail(str(exc), EXIT_REFUSED)
    except StatusWriteFailed as exc:
        return fail(str(exc), EXIT_NOT_RECORDED)
    except StoreError as exc:
        return fail(str(exc), EXIT_NOT_RECORDED)
    except duckdb.Error as exc:  # a read of a damaged file, past the checks at open
        translated = translate(exc, args.db)
        if translated is None:
            raise
        return fail(str(translated), EXIT_BAD_INPUT if isinstance(translated, StoreFileUnusable) else EXIT_NOT_RECORDED)
    except _target_errors() as exc:
        return fail(f"{args.__dict__.get('suite', 'suite')}: target: {exc}", EXIT_BAD_INPUT)


# Commands that, on a file `evalrunner serve` holds, run inside it (service/local_cli.py); `run` runs
# its suite here and records it through the server's API (cmd_run).
THROUGH_SERVER = frozenset({"runs", "show", "recover", "verify", "sweep", "compare"})


def _through_server(server: local_server.LocalServer, argv: Sequence[str], fail: Callable[[str, int], int]) -> int:
    from .store.http_client import HttpStore, StoreServiceError

    try:
        answer = HttpStore(server.url, server.token).run_cli(list(argv))
    except StoreServiceError as exc:
        return fail(f"the server holding the database ({server.url}, PID {server.pid}) did not run the command: "
                    f"{exc}", EXIT_NOT_RECORDED)
    sys.stdout.write(answer["stdout"])
    sys.stderr.write(answer["stderr"])
    return int(answer["exit_code"])


def _target_errors() -> tuple[type[BaseException], ...]:
    from .scorers import ScorerError
    from .targets import TargetError

    return (TargetError, ScorerError)


def _fail(message: str, code: int, log_format: str = "console") -> int:
    # With --log-format json every stderr line must stay a JSON object (log shippers parse them).
    if log_format == "json":
        log.get().error(CLI_ERROR, error=message, exit_code=code)
    else:
        print(f"evalrunner: error: {message}", file=sys.stderr)
    return code


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()


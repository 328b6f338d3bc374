"""The CLI on a database that a running `evalrunner serve` holds: every command works through it.

Real processes throughout: `evalrunner serve` on a temp DuckDB file, and the
CLI run beside it as a user would, on the same `--db`.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import EXAMPLES, cli_args, cli_env, copy_example_targets, kill_and_reap, read_run, run_cli, write_suite

from evalrunner import local_server

SMOKE = EXAMPLES / "smoke.yaml"


class Serve:
    def __init__(self, db: Path, log: Path):
        self.db, self.log = db, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cli_args(["serve", "--host", "127.0.0.1", "--port", "0"], db, "json"),
                                         stdout=out, stderr=subprocess.STDOUT, env=cli_env())
        deadline = time.monotonic() + 30
        while (record := local_server.find(db)) is None:
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no server record beside {db}:\n{log.read_text()}"
            time.sleep(0.1)
        self.record = record

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


@pytest.fixture
def serve(tmp_path):
    server = Serve(tmp_path / "shared.duckdb", tmp_path / "serve.log")
    yield server
    if server.proc.poll() is None:
        server.stop()


def slow_suite(directory: Path, name: str, policy: str, seconds: float = 0.4, cases: int = 6) -> Path:
    (directory / "slow_target.py").write_text(
        "import asyncio\n\nasync def wait(value):\n    await asyncio.sleep(%s)\n    return value\n" % seconds)
    rows = "\n".join(f"  - {{id: c{i}, input: x, expected: x}}" for i in range(cases))
    return write_suite(directory, f"""\
name: {name}
timeout_seconds: 5
concurrency: 1
lock_policy: {policy}
target: {{python: {{callable: "slow_target:wait"}}}}
cases:
{rows}
""", name=f"{name}.yaml")


def wait_running(db: Path, suite: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = run_cli(["runs", "--suite", suite, "--status", "running", "-q"], db, log_format=None)
        if listed.returncode == 0 and listed.stdout.strip():
            return listed.stdout.split()[0]
        time.sleep(0.2)
    raise AssertionError(f"no running run of {suite}")


def test_every_command_works_through_a_running_serve(serve, tmp_path):
    info = os.stat(local_server.record_path(serve.db))
    assert stat.S_IMODE(info.st_mode) == 0o600, "the record holds the token: its user's eyes only"

    first = run_cli(["run", SMOKE], serve.db, log_format=None)
    assert first.returncode == 0, first.stderr
    assert "in use by" not in first.stderr
    second = run_cli(["run", SMOKE, "--json"], serve.db, log_format=None)
    assert second.returncode == 0, second.stderr
    run_b = json.loads(second.stdout)["run"]["id"]

    listed = run_cli(["runs"], serve.db, log_format=None)
    assert listed.returncode == 0 and listed.stdout.count("smoke  completed") == 2, listed.stdout + listed.stderr
    run_a = [line.split()[0] for line in listed.stdout.splitlines()[2:] if not line.startswith(run_b)][0]
    shown = run_cli(["show", run_b[:-2]], serve.db, log_format=None)
    assert shown.returncode == 0 and "passed 6" in shown.stdout, shown.stdout + shown.stderr
    compared = run_cli(["compare", run_a, run_b, "--format", "json"], serve.db, log_format=None)
    assert compared.returncode == 0 and json.loads(compared.stdout)["regressions"] == []
    assert run_cli(["verify"], serve.db, log_format=None).returncode == 0
    swept = run_cli(["sweep"], serve.db, log_format=None)
    assert swept.returncode == 0 and "0 run(s) terminated" in swept.stdout
    recovered = run_cli(["recover", run_a, "--reason", "checking"], serve.db, log_format=None)
    assert recovered.returncode == 0 and "already completed" in recovered.stdout
    unknown = run_cli(["show", "no-such-run"], serve.db, log_format=None)
    assert unknown.returncode == 2 and "no run with id" in unknown.stderr, "errors come back as they would locally"

    assert serve.stop() == 0
    assert not local_server.record_path(serve.db).exists(), "the record goes with the server"
    alone = run_cli(["runs", "-q"], serve.db, log_format=None)
    assert sorted(alone.stdout.split()) == sorted([run_a, run_b]), "every run was written to the file"


def test_a_killed_run_is_recovered_through_the_server_with_its_reason(serve, tmp_path):
    suite = slow_suite(tmp_path, "killable", "Allow", seconds=5, cases=2)
    proc = subprocess.Popen(cli_args(["run", suite], serve.db, None), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    try:
        run_id = wait_running(serve.db, "killable")
    finally:
        kill_and_reap(proc)
    result = run_cli(["recover", run_id, "--reason", "laptop lid closed"], serve.db, log_format=None)
    assert result.returncode == 0, result.stderr
    assert "laptop lid closed" in result.stdout and "(killed)" in result.stdout, result.stdout
    serve.stop()
    row = read_run(serve.db, run_id)
    assert row is not None and (row.status, row.cause) == ("failed", "killed") and "laptop lid closed" in row.error


def test_forbid_refuses_a_second_local_run_with_exit_4_and_replace_takes_over(serve, tmp_path):
    copy_example_targets(tmp_path)
    forbid = slow_suite(tmp_path, "exclusive", "Forbid")
    proc = subprocess.Popen(cli_args(["run", forbid], serve.db, None), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=cli_env(), text=True)
    try:
        live = wait_running(serve.db, "exclusive")
        refused = run_cli(["run", forbid], serve.db, log_format=None)
        assert refused.returncode == 4, refused.stderr
        assert live in refused.stderr and "Forbid" in refused.stderr, refused.stderr
        assert proc.wait(30) == 0, "the first run goes on, untouched"
    finally:
        kill_and_reap(proc)

    replace_path = slow_suite(tmp_path, "exclusive", "Replace")
    first = subprocess.Popen(cli_args(["run", replace_path], serve.db, None), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=cli_env(), text=True)
    try:
        old = wait_running(serve.db, "exclusive")
        second = run_cli(["run", replace_path], serve.db, log_format=None)
        assert second.returncode == 0, second.stderr
        assert first.wait(30) != 0, "the replaced run's process is told to stop"
    finally:
        kill_and_reap(first)
    serve.stop()
    replaced = read_run(serve.db, old)
    assert replaced is not None and (replaced.status, replaced.cause) == ("failed", "replaced")


def test_a_run_holding_the_file_gets_a_message_that_says_what_works(tmp_path):
    suite = slow_suite(tmp_path, "holder", "Allow", seconds=5, cases=2)
    db = tmp_path / "held.duckdb"
    proc = subprocess.Popen(cli_args(["run", suite], db, None), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env())
    try:
        deadline = time.monotonic() + 20
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        result = run_cli(["runs"], db, log_format=None)
        assert result.returncode == 3
        assert f"process {proc.pid}" in result.stderr and "evalrunner serve --db FILE" in result.stderr, result.stderr
        assert "view it through" not in result.stderr
    finally:
        kill_and_reap(proc)


def test_another_users_or_an_open_record_is_not_trusted(tmp_path):
    db = tmp_path / "x.duckdb"
    record = local_server.publish(db, "http://127.0.0.1:9", local_server.new_token())
    assert local_server.find(db) is not None
    os.chmod(local_server.record_path(db), 0o644)
    assert local_server.find(db) is None, "a token others can read is no proof of the same user"
    os.chmod(local_server.record_path(db), 0o600)
    assert local_server.find(db, holder_pid=os.getpid() + 1) is None, "not the lock's holder"
    local_server.withdraw(db, record)
    assert not local_server.record_path(db).exists()


def test_the_local_endpoint_refuses_other_tokens(serve):
    req = urllib.request.Request(f"{serve.record.url}/api/v1/local/cli", data=b'{"argv": ["runs"]}', method="POST",
                                 headers={"Authorization": "Bearer not-the-token", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert refused.value.code == 401
    req = urllib.request.Request(f"{serve.record.url}/api/v1/local/cli", data=b'{"argv": ["serve"]}', method="POST",
                                 headers={"Authorization": f"Bearer {serve.record.token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        answer = json.loads(resp.read())
    assert answer["exit_code"] == 2 and "does not run through a server" in answer["stderr"]

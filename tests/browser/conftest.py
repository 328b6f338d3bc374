"""The /evals page in headless Chromium against a real `evalrunner serve` on a real DuckDB file.

The database is filled through the real store API (DuckDBStore.start_run,
save_cases, finish_run) before the server starts, since the server then
holds the file. It holds:

- a completed run, a failed run, and a run whose suite name and case output
  carry script (`SCRIPT_SUITE`);
- a healthy running run, owned by this test process (alive) and kept fresh by
  a thread that heartbeats through the server's runner API, as a remote
  runner would;
- a stuck run: `running`, owned by a PID that is provably gone, started and
  last heartbeated two hours ago, far past `timeout_seconds * cases`.

Why `--no-recover --sweep-interval 0`: `evalrunner serve` would otherwise
terminate the stuck run itself (on open, and every few seconds), and the test
must see it stuck and terminate it from the page. An owner that merely cannot
be checked (a live process on another "host") would not help: its old
heartbeat alone makes the sweeper terminate it. Disabling both sweeps is the
one deterministic set-up; the sweeper itself is tested elsewhere.

Chromium and chromedriver are Debian's (`scripts/test` installs them). These
tests fail, never skip, when they are missing. Screenshots go to
artifacts/browser/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from evalrunner.store.http_client import HttpStore
from seed_data import ADMIN_TOKEN, READ_TOKEN, Seeded, SeededHistory, seed, seed_history

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    seeded: Seeded


@dataclass
class HistoryServer:
    url: str
    history: SeededHistory


def _evalrunner() -> list[str]:
    script = Path(sys.executable).parent / "evalrunner"
    return [str(script)] if script.exists() else [sys.executable, "-m", "evalrunner.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`evalrunner serve` exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"`evalrunner serve` did not answer /healthz within {timeout_s}s:\n{log.read_text()}")


@contextlib.contextmanager
def serving(db: Path, log: Path, read_token: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`evalrunner serve` on `db` (no sweeps: see the module's docstring) until the block ends."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("EVALRUNNER_DB", "EVALRUNNER_FAULTS")}
    env["EVALRUNNER_ADMIN_TOKEN"] = ADMIN_TOKEN
    env.pop("EVALRUNNER_READ_TOKEN", None)
    if read_token:
        env["EVALRUNNER_READ_TOKEN"] = read_token
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [*_evalrunner(), "--db", str(db), "--no-recover", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--sweep-interval", "0"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    try:
        _wait_ready(url, proc, log)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    seeded = seed(tmp / "evals.duckdb")
    stop = threading.Event()
    with serving(seeded.db, tmp / "serve.log") as (url, proc):
        runner = HttpStore(url, ADMIN_TOKEN, retry_for_s=2)

        def heartbeat():  # the healthy run's runner, reporting over the runner API
            while not stop.wait(3.0):
                try:
                    runner.heartbeat(seeded.running)
                except Exception:
                    pass

        threading.Thread(target=heartbeat, daemon=True).start()
        try:
            yield Server(url, proc, seeded)
        finally:
            stop.set()


@pytest.fixture(scope="module")
def history_server(tmp_path_factory):
    """A database of one suite's history (its own, so the main page's counts stay as they are)."""
    tmp = tmp_path_factory.mktemp("history")
    history = seed_history(tmp / "history.duckdb")
    with serving(history.db, tmp / "serve.log") as (url, proc):
        yield HistoryServer(url, history)


@pytest.fixture(scope="module")
def read_server(tmp_path_factory):
    """The seeded database behind a read token: reading the page needs a login."""
    tmp = tmp_path_factory.mktemp("read")
    seeded = seed(tmp / "evals.duckdb")
    with serving(seeded.db, tmp / "serve.log", read_token=READ_TOKEN) as (url, proc):
        yield Server(url, proc, seeded)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/test (it installs Debian's chromium and "
                    "chromium-driver), or `apt-get install -y chromium chromium-driver`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run scripts/test (it installs the `test` extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="evalrunner-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shot(browser, request):
    """shot("name") saves artifacts/browser/<test>-<n>-<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    count = [0]

    def take(name: str) -> Path:
        count[0] += 1
        path = ARTIFACTS / f"{request.node.name}-{count[0]:02d}-{name}.png"
        browser.save_screenshot(str(path))
        return path

    return take

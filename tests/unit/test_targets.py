"""Each target kind against real code: temp modules, a local HTTP server, real subprocesses."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from evalrunner.models import CommandTarget, HttpTarget, PythonTarget, Target
from evalrunner.targets import TargetError, build_target


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def call_once(target: Target, input: Any, search_path: tuple[str, ...] = ()) -> Any:
    invoke = build_target(target, search_path)
    try:
        return await invoke(input)
    finally:
        await invoke.aclose()


# ---------------------------------------------------------------- python


def make_module(tmp_path: Path, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return str(tmp_path)


def test_python_sync_and_async_and_dotted(tmp_path: Path) -> None:
    directory = make_module(
        tmp_path,
        "targets_mod_a",
        """\
        import threading
        def shout(text):
            return text.upper() + ("" if threading.current_thread() is threading.main_thread() else "!")
        async def count(value):
            return len(value)
        class Agent:
            @staticmethod
            def reply(value):
                return {"echo": value}
        """,
    )
    sync = Target(python=PythonTarget(callable="targets_mod_a:shout"))
    assert run(call_once(sync, "hi", (directory,))) == "HI!"  # ran in a worker thread
    async_ = Target(python=PythonTarget(callable="targets_mod_a:count"))
    assert run(call_once(async_, [1, 2, 3], (directory,))) == 3
    dotted = Target(python=PythonTarget(callable="targets_mod_a:Agent.reply"))
    assert run(call_once(dotted, {"a": 1}, (directory,))) == {"echo": {"a": 1}}


def test_python_missing_module_attr_and_not_callable(tmp_path: Path) -> None:
    directory = make_module(tmp_path, "targets_mod_b", "VALUE = 3\n")
    with pytest.raises(TargetError, match="no module named 'no_such_module_xyz'"):
        build_target(Target(python=PythonTarget(callable="no_such_module_xyz:f")), [directory])
    with pytest.raises(TargetError, match="'targets_mod_b' has no attribute 'nope'"):
        build_target(Target(python=PythonTarget(callable="targets_mod_b:nope")), [directory])
    with pytest.raises(TargetError, match="is a int, not a callable"):
        build_target(Target(python=PythonTarget(callable="targets_mod_b:VALUE")), [directory])


def test_python_module_importing_missing_dependency(tmp_path: Path) -> None:
    directory = make_module(tmp_path, "targets_mod_c", "import missing_dep_xyz\ndef f(x): return x\n")
    with pytest.raises(TargetError, match="importing 'targets_mod_c' failed: No module named 'missing_dep_xyz'"):
        build_target(Target(python=PythonTarget(callable="targets_mod_c:f")), [directory])


# ---------------------------------------------------------------- http

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def with_server(handler: Handler, body: Callable[[str], Awaitable[Any]]) -> Any:
    app = web.Application()
    app.router.add_post("/endpoint", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        return await body(f"http://127.0.0.1:{port}/endpoint")
    finally:
        await runner.cleanup()


def test_http_openai_chat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVAL_TEST_KEY", "sekret-123")
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer sekret-123":
            return web.Response(status=401, text="bad key")
        body = await request.json()
        seen.append({"body": body, "extra": request.headers.get("X-Extra")})
        content = body["messages"][-1]["content"]
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": f"echo {content}"}}]})

    async def body(url: str) -> list[Any]:
        spec = HttpTarget(
            url=url, model="m1", system_prompt="Be brief.", api_key_env="EVAL_TEST_KEY", headers={"X-Extra": "1"}
        )
        invoke = build_target(Target(http=spec))
        try:
            return [await invoke("hello"), await invoke({"q": 1})]  # second call reuses the session
        finally:
            await invoke.aclose()

    assert run(with_server(handler, body)) == ["echo hello", 'echo {"q": 1}']
    assert seen[0] == {
        "body": {
            "model": "m1",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        },
        "extra": "1",
    }


def test_http_missing_key_env_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVAL_TEST_ABSENT_KEY", raising=False)
    spec = HttpTarget(url="http://127.0.0.1:9/x", api_key_env="EVAL_TEST_ABSENT_KEY")
    with pytest.raises(TargetError, match="EVAL_TEST_ABSENT_KEY is not set"):
        run(call_once(Target(http=spec), "hi"))


def test_http_non_2xx_and_invalid_json() -> None:
    async def failing(request: web.Request) -> web.Response:  # not worth a retry (test_model_calls.py: those that are)
        return web.Response(status=400, text="overloaded " + "x" * 500)

    async def garbled(request: web.Request) -> web.Response:
        return web.Response(status=200, text="<html>not json")

    async def attempt(url: str) -> None:
        await call_once(Target(http=HttpTarget(url=url, format="json")), "hi")

    with pytest.raises(TargetError, match="returned HTTP 400: overloaded x+$") as info:
        run(with_server(failing, attempt))
    assert len(str(info.value).split(": ", 1)[1]) == 200
    with pytest.raises(TargetError, match="invalid JSON: <html>not json"):
        run(with_server(garbled, attempt))


def test_http_json_format() -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"answer": {"got": body["input"]}})

    async def body(url: str) -> Any:
        return await call_once(Target(http=HttpTarget(url=url, format="json", output_field="answer")), [1, "a"])

    assert run(with_server(handler, body)) == {"got": [1, "a"]}


def test_http_connection_refused_is_target_error() -> None:
    spec = HttpTarget(url="http://127.0.0.1:9/x", format="json", max_retries=0)
    with pytest.raises(TargetError, match=r"POST http://127.0.0.1:9/x failed: .* \(gave up after 1 attempt"):
        run(call_once(Target(http=spec), "hi"))


# ---------------------------------------------------------------- command


def python_command(code: str, env: dict[str, str] | None = None) -> Target:
    return Target(command=CommandTarget(argv=[sys.executable, "-c", code], env=env or {}))


def test_command_echo_stdin_json_and_env() -> None:
    echo = python_command("import os, sys; sys.stdout.write(os.environ['GREETING'] + sys.stdin.read() + '\\n')", {"GREETING": ">"})
    assert run(call_once(echo, "héllo")) == ">héllo"
    assert json.loads(run(call_once(echo, {"a": [1]}))[1:]) == {"a": [1]}


def test_command_non_zero_exit() -> None:
    failing = python_command("import sys; sys.stderr.write('x' * 600 + 'boom'); sys.exit(3)")
    with pytest.raises(TargetError, match="exited with code 3") as info:
        run(call_once(failing, ""))
    assert str(info.value).endswith("boom")
    assert "x" * 496 + "boom" in str(info.value) and "x" * 497 not in str(info.value)


def test_command_not_found() -> None:
    with pytest.raises(TargetError, match="cannot start '/no/such/program'"):
        run(call_once(Target(command=CommandTarget(argv=["/no/such/program"])), ""))


def is_alive(pid: int) -> bool:
    """A zombie counts as gone: it runs no code and holds no resources but its pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_cancellation_kills_the_child_and_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code = textwrap.dedent(
        f"""\
        import os, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
        time.sleep(60)
        """
    )

    async def body() -> list[int]:
        invoke = build_target(python_command(code))
        task = asyncio.create_task(invoke("x"))
        for _ in range(500):
            if pids.exists() and pids.read_text():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [int(p) for p in pids.read_text().split()]

    child, grandchild = run(body())
    assert not is_alive(child)
    for _ in range(100):  # the grandchild is reaped by init, not by us
        if not is_alive(grandchild):
            break
        asyncio.run(asyncio.sleep(0.01))
    assert not is_alive(grandchild)

"""What can be checked of the image without a Docker engine (none runs here).

The Dockerfile's entry points must exist in the installed package, its base
must be pinned and its user non-root, and what the chart and the Job builder
run must be commands the CLI has.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_base_image_is_pinned_and_user_is_non_root():
    text = dockerfile()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[0]), bases
    assert "FROM ${PYTHON_IMAGE} AS build" in text and text.count("FROM ") == 2  # multi-stage
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert 'ENTRYPOINT ["evalrunner"]' in text


def test_entry_points_exist_in_the_installed_package():
    exe = shutil.which("evalrunner") or str(Path(sys.executable).parent / "evalrunner")
    for command in (["--version"], ["controller", "--help"], ["run-suite", "--help"], ["run", "--help"]):
        result = subprocess.run([exe, *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)


def test_what_the_jobs_run_is_a_real_command():
    from evalrunner.cli import build_parser
    from evalrunner.controller.builders import runner_command

    command = runner_command("/etc/evalrunner/suite/suite.yaml", "http://store:8080", "r-a1", 1, "r-a0", 60)
    assert command[0] == "evalrunner"
    build_parser().parse_args(command[1:])  # exits 2 on an unknown option


def test_dockerignore_keeps_the_build_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "tools"} <= ignored

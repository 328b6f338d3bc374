"""Every command block of README.md, run as written in a fresh clone, in the order a reader meets them.

The clone is of the checkout's last commit (CI runs in a fresh clone, so
that is what CI has), set up with `scripts/setup` like a newcomer's. Each
```sh block runs in bash from the clone's root with `.venv/bin` on PATH and
its own data directory, so the default database is the reader's first one.

A block may be preceded by a marker, an HTML comment the page does not show:

- `<!-- readme-check: skip: WHY -->`: not run, and WHY says where the same
  steps are proven instead (the test reports it);
- `<!-- readme-check: setup: SHELL -->`: run first, for what the prose
  assumes (two earlier runs to compare, say).

A command fails the block when it exits non-zero, unless its own comment
says so (`# exits 1: ...`), or when anything prints a Python traceback
(unless the block says it logs one).
`scripts/test` is not run: this check runs inside it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```sh\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
MARKER = re.compile(r"<!-- readme-check: (?P<kind>skip|setup): (?P<text>.*?) -->\s*$")
FAILED = re.compile(r"^README-CHECK-FAILED (?P<code>\d+) (?P<line>\d+)$", re.M)
BLOCK_TIMEOUT_S = 900
NOT_RUN_HERE = ("scripts/test",)  # this check is part of it
INSIDE = "EVALRUNNER_README_CHECK"  # set for the blocks: a nested run of this check refuses to start


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence in README.md
    code: str
    skip: str | None
    setup: str | None

    @property
    def title(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        return f"README.md:{self.line} {first[:60]}"


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        indent = len(match["indent"])
        code = "\n".join(ln[indent:] for ln in match["code"].splitlines())
        blocks.append(Block(line, code, marker["text"] if marker and marker["kind"] == "skip" else None,
                            marker["text"] if marker and marker["kind"] == "setup" else None))
    return blocks


BLOCKS = readme_blocks((REPO / "README.md").read_text())


def allowed_exit(line: str, code: int) -> bool:
    """The command's own comment says it exits with this code (`# ...; exits 1: why`)."""
    comment = line.partition("#")[2]
    return re.search(rf"\bexits {code}\b", comment) is not None


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get(INSIDE):
        pytest.fail("a README block ran the test suite (it must not: see NOT_RUN_HERE)")
    root = tmp_path_factory.mktemp("readme")
    work = root / "evalrunner"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(work)], check=True)
    subprocess.run(["scripts/setup"], cwd=work, check=True, capture_output=True)
    for leftover in ("/tmp/x.duckdb",):  # paths the README names, from an earlier reader
        Path(leftover).unlink(missing_ok=True)
    return work


def run_block(block: Block, clone: Path) -> tuple[str, list[tuple[int, str]]]:
    """Run it in bash; returns (output, [(exit code, command line)] of the commands that failed)."""
    lines = [ln for ln in block.code.splitlines() if ln.partition("#")[0].strip() not in NOT_RUN_HERE]
    body = "\n".join(lines)
    script = "\n".join([
        "trap 'echo \"README-CHECK-FAILED $? $LINENO\"' ERR",
        block.setup or ":",
        f"# --- README.md:{block.line}",
        body,
        "trap - ERR; jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null; true",  # what the block left running
    ])
    offset = 3  # lines before the block's first
    env = dict(os.environ, PATH=f"{clone / '.venv' / 'bin'}:{os.environ['PATH']}",
               XDG_DATA_HOME=str(clone.parent / "data"), **{INSIDE: "1"})
    for name in ("EVALRUNNER_DB", "EVALRUNNER_FAULTS", "KUBECONFIG", "VIRTUAL_ENV"):
        env.pop(name, None)
    result = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    output = result.stdout + result.stderr
    failed = []
    for match in FAILED.finditer(result.stdout):
        index = int(match["line"]) - offset - 1
        command = lines[index] if 0 <= index < len(lines) else "?"
        if not allowed_exit(command, int(match["code"])):
            failed.append((int(match["code"]), command))
    return output, failed


def test_the_markers_parse_and_every_skip_says_why():
    assert len(BLOCKS) >= 10
    for block in BLOCKS:
        assert block.skip is None or len(block.skip) > 20, block.title


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, clone: Path):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    if any(tool in block.code for tool in ("tools/k8s/cluster up --node real",)) and os.geteuid() != 0:
        pytest.fail("the real-node walkthrough needs root (CI runs as root)")
    output, failed = run_block(block, clone)
    assert not failed, f"README.md:{block.line}: failed {failed}\n{output[-4000:]}"
    if "traceback" not in block.code.lower():  # a block that injects a fault says it logs one
        assert "Traceback (most recent call last)" not in output, f"README.md:{block.line}:\n{output[-4000:]}"


def test_skipped_blocks_are_few():
    """Skips are for what needs a user's own cluster or minutes of measuring, not for what is awkward."""
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= 5, [b.title for b in skipped]


def teardown_module() -> None:
    shutil.rmtree("/tmp/evalrunner-cluster", ignore_errors=True)

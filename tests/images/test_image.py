"""The container image, built without Docker and run as the chart runs it.

`tools/images/build` builds the image (minutes the first time, then cached
under ~/.cache/evalrunner/images) and prints the archive a containerd node
imports. Here that archive is unpacked into a root filesystem and run with
runc the way the chart's pods run: uid 65532, read-only root, no
capabilities, a writable /tmp. Needs root (buildah, debootstrap, runc), as CI has.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tools" / "images" / "build"
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
SUITES = "/opt/evalrunner/examples/suites"
_ids = itertools.count()


def build() -> Path:
    result = subprocess.run([str(BUILD)], check=False, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class Image:
    tags: list[str]
    config: dict
    rootfs: Path
    state: Path  # runc's own state directory, so nothing is shared with the host's

    def run(self, args: list[str], env: dict[str, str] | None = None,
            entrypoint: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs the image (its entrypoint with `args`, else `args`) in a fresh container."""
        cfg = self.config["config"]
        uid, gid = (int(n) for n in cfg["User"].split(":"))
        bundle = self.state / f"bundle-{next(_ids)}"
        bundle.mkdir()
        no_caps = {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
        spec = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": uid, "gid": gid},
                "args": (cfg.get("Entrypoint") or []) + args if entrypoint else args,
                "env": cfg["Env"] + [f"{k}={v}" for k, v in (env or {}).items()],
                "cwd": cfg.get("WorkingDir") or "/",
                "capabilities": no_caps,
                "noNewPrivileges": True,
            },
            "root": {"path": str(self.rootfs), "readonly": True},
            "hostname": "evalrunner",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                # The chart's emptyDir: the one writable place.
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
            ],
            "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
        }
        (bundle / "config.json").write_text(json.dumps(spec))
        return subprocess.run(
            ["runc", "--root", str(self.state / "runc"), "run", "--bundle", str(bundle), bundle.name],
            check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def unpack(archive: Path, rootfs: Path) -> tuple[list[str], dict]:
    """Applies a docker-archive's layers in order, whiteouts included; returns its tags and config."""
    with tarfile.open(archive) as outer:
        (manifest,) = json.load(outer.extractfile("manifest.json"))
        config = json.load(outer.extractfile(manifest["Config"]))
        for name in manifest["Layers"]:
            with tarfile.open(fileobj=outer.extractfile(name)) as layer:
                members = layer.getmembers()
                for m in members:
                    folder, base = os.path.split(m.name)
                    if base == ".wh..wh..opq":
                        for child in (rootfs / folder).iterdir():
                            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                    elif base.startswith(".wh."):
                        gone = rootfs / folder / base[len(".wh."):]
                        shutil.rmtree(gone) if gone.is_dir() and not gone.is_symlink() else gone.unlink()
                layer.extractall(rootfs, [m for m in members if not os.path.basename(m.name).startswith(".wh.")],
                                 numeric_owner=True)
    return manifest["RepoTags"], config


@pytest.fixture(scope="module")
def archive() -> Path:
    return build()


@pytest.fixture(scope="module")
def image(archive: Path):
    assert os.geteuid() == 0, "runs the image with runc: needs root"
    assert shutil.which("runc"), "runc is missing (apt-get install runc)"
    with tempfile.TemporaryDirectory(prefix="evalrunner-image-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        rootfs.mkdir()
        tags, config = unpack(archive, rootfs)
        yield Image(tags, config, rootfs, Path(tmp))


def test_the_archive_is_named_as_the_kubelet_looks_it_up(image: Image):
    # The chart's image: repository `evalrunner`, tag its appVersion; containerd
    # (and so the kubelet) normalises `evalrunner:0.1.0` to this name.
    chart = (REPO / "charts" / "evalrunner" / "Chart.yaml").read_text()
    assert re.search(rf'^appVersion: "?{re.escape(VERSION)}"?$', chart, re.MULTILINE)
    assert image.tags == [f"docker.io/library/evalrunner:{VERSION}"]


def test_a_second_build_is_cached(archive: Path):
    start = time.monotonic()
    assert build() == archive
    assert time.monotonic() - start < 5


def test_the_entry_points_run_as_65532_on_a_read_only_root(image: Image):
    assert image.config["config"]["User"] == "65532:65532"
    result = image.run(["--version"])
    assert result.returncode == 0 and VERSION in result.stdout, result
    for command in (["controller", "--help"], ["run-suite", "--help"]):  # the chart's, the Jobs'
        result = image.run(command)
        assert result.returncode == 0, (command, result.stderr)
    probe = ("import os\n"
             "try: open('/opt/evalrunner/probe', 'w')\n"
             "except OSError as e: print(os.getuid(), os.getgid(), e.errno)\n")
    result = image.run(["python3", "-c", probe], entrypoint=False)
    assert result.stdout.split() == ["65532", "65532", str(errno.EROFS)], result


def test_the_smoke_suite_runs_in_the_image(image: Image):
    result = image.run(["run", f"{SUITES}/smoke.yaml", "--db", "/tmp/x.duckdb", "--json"],
                       env={"PYTHONPATH": SUITES})
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(result.stdout)["run"]
    assert (run["status"], run["passed"], run["failed"], run["errored"]) == ("completed", 6, 0, 0)


def test_the_image_holds_the_locked_wheels_and_no_build_leftovers(image: Image):
    def norm(name: str) -> str:  # PEP 503: dist-info and lock spell names differently
        return re.sub(r"[-_.]+", "-", name).lower()

    lock = (REPO / "tools/images/requirements.lock").read_text()
    locked = {norm(name): v for name, v in re.findall(r"^([\w.-]+)==(\S+) ", lock, re.MULTILINE)}
    site = image.rootfs / "usr/local/lib/python3.11/dist-packages"
    installed = {norm(name): v for name, v in
                 (re.fullmatch(r"(.+)-([^-]+)\.dist-info", p.name).groups() for p in site.glob("*.dist-info"))}
    assert installed.pop("evalrunner") == VERSION
    assert installed.items() <= locked.items()
    assert len(installed) > 30  # the whole dependency closure, from the lock
    for leftover in ("wheels", "wheelhouse", "src", "etc/pip.conf", "root/.config/pip", "root/.cache"):
        assert not (image.rootfs / leftover).exists(), leftover

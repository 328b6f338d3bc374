"""Test-wide set-up: import the package from the source root; runner pods find this interpreter."""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "operator"))

# Runner pods in the cluster tests are local processes started by the node
# agent with its PATH; put this interpreter's bin (the venv's `evalrunner`) first.
os.environ["PATH"] = str(pathlib.Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

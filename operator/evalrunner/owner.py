"""Who owns a running row, and whether that owner is still alive.

A local owner is (host, PID, process start time): the start time tells a
live owner from an unrelated process that later got the same PID. A pod
owner is (namespace, pod name, pod UID); only the controller can judge it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from typing import Literal

import psutil

# Process start times from psutil are floats derived from clock ticks; allow
# for rounding when comparing a recorded start time with a fresh reading.
_START_TIME_SLACK_S = 1.0


@dataclass(frozen=True)
class Owner:
    kind: Literal["process", "pod"]
    host: str | None = None
    pid: int | None = None
    process_started_at: float | None = None
    namespace: str | None = None
    pod: str | None = None
    pod_uid: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Owner | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        if self.kind == "pod":
            return f"pod {self.namespace}/{self.pod}" if self.pod else f"a pod in {self.namespace} (never started)"
        return f"PID {self.pid} on {self.host}"


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(
        kind="process",
        host=socket.gethostname(),
        pid=pid,
        process_started_at=psutil.Process(pid).create_time(),
    )


def pod_from_env() -> Owner | None:
    """The owner when running in a Job pod (downward API env vars set by the Job builder)."""
    name = os.environ.get("EVALRUNNER_POD_NAME")
    if not name:
        return None
    return Owner(
        kind="pod",
        namespace=os.environ.get("EVALRUNNER_POD_NAMESPACE"),
        pod=name,
        pod_uid=os.environ.get("EVALRUNNER_POD_UID"),
        host=socket.gethostname(),
        pid=os.getpid(),
    )


Liveness = Literal["alive", "dead", "unknown"]


def local_liveness(owner: Owner | None, host: str | None = None) -> Liveness:
    """`dead` only when we can prove it: same host, and the PID is gone or reused."""
    if owner is None or owner.kind != "process" or owner.pid is None:
        return "unknown"
    if owner.host != (host or socket.gethostname()):
        return "unknown"
    try:
        started = psutil.Process(owner.pid).create_time()
    except psutil.NoSuchProcess:
        return "dead"
    except psutil.Error:
        return "unknown"
    if owner.process_started_at is not None and abs(started - owner.process_started_at) > _START_TIME_SLACK_S:
        return "dead"  # the PID was reused by another process
    try:
        if psutil.Process(owner.pid).status() == psutil.STATUS_ZOMBIE:
            return "dead"
    except psutil.Error:
        pass
    return "alive"

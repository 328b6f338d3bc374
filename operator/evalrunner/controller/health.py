"""Liveness and readiness that mean what the kubelet does with them.

- Liveness (`/livez`): the controller's loops are still making progress. A
  loop that keeps failing on schedule (the API server is down, every call
  times out) is progressing: restarting the process would not bring the API
  server back, and a restarted controller would start by sweeping again. Only
  a loop that stopped turning for `STALL_S` fails it. How long a sweep takes
  does not matter, only that the loop comes round.
- Readiness (`/readyz`): the store answers (checked by the service). Runners
  report to this Service, so it stays an endpoint as long as they can write,
  even while the API server is away.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

LOOPS = ("scan", "refresh")
STALL_S = 120.0  # well over one request timeout (30 s) per step of a loop


@dataclass
class Health:
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    last_progress: dict[str, float] = field(default_factory=dict)
    last_event: float | None = None
    last_sweep: float | None = None
    details: Callable[[], dict] = field(default=lambda: {})  # extra facts for the report (index sizes)

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.last_progress = {loop: self.started for loop in LOOPS}

    def progressed(self, loop: str) -> None:
        self.last_progress[loop] = self.clock()

    def saw_event(self) -> None:
        self.last_event = self.clock()

    def swept(self) -> None:
        self.last_sweep = self.clock()

    def report(self) -> tuple[bool, dict[str, object]]:
        """(alive, details): alive while every loop has progressed within STALL_S."""
        now = self.clock()
        stalled = sorted(loop for loop, at in self.last_progress.items() if now - at > STALL_S)

        def age(at: float | None) -> float | None:
            return None if at is None else round(now - at, 3)

        return not stalled, {
            "stalled_loops": stalled,
            "seconds_since_progress": {loop: age(at) for loop, at in self.last_progress.items()},
            "seconds_since_sweep": age(self.last_sweep),
            "seconds_since_pod_event": age(self.last_event),
            "uptime_s": round(now - self.started, 3),
            **self.details(),
        }

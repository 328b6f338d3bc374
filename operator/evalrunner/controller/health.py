"""Liveness that means something: events still arrive and sweeps still run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Health:
    started: float = field(default_factory=time.monotonic)
    last_event: float | None = None
    last_sweep: float | None = None

    def saw_event(self) -> None:
        self.last_event = time.monotonic()

    def swept(self) -> None:
        self.last_sweep = time.monotonic()

    def report(self, sweep_interval_s: float) -> tuple[bool, dict[str, float | None]]:
        now = time.monotonic()
        sweep_age = None if self.last_sweep is None else now - self.last_sweep
        event_age = None if self.last_event is None else now - self.last_event
        # A sweep runs every interval; three missed in a row means the loop is stuck.
        ok = sweep_age is not None and sweep_age < max(3 * sweep_interval_s, 30)
        return ok, {"seconds_since_sweep": sweep_age, "seconds_since_pod_event": event_age,
                    "uptime_s": now - self.started}

"""Suite-level locking: may a new run of a suite start while others are live?

Pure decision; the store applies it inside the transaction that inserts the
new row, after orphan detection has already terminated dead owners' rows, so
a stale row never blocks a submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .models import LockPolicy


class RunRefused(Exception):
    """A Forbid policy found a live run of the same suite."""

    def __init__(self, suite: str, live_run_ids: Sequence[str], owners: Sequence[str]):
        self.suite = suite
        self.live_run_ids = tuple(live_run_ids)
        named = list(owners) + [""] * (len(live_run_ids) - len(owners))  # owners may be unknown (an API's answer)
        who = "; ".join(f"{rid} ({o})" if o else rid for rid, o in zip(live_run_ids, named))
        super().__init__(
            f"suite {suite!r} is already running: {who}. Its lock policy is Forbid. "
            "Wait for it, terminate it with `evalrunner recover RUN_ID`, "
            "or set lock_policy: Allow or Replace in the suite."
        )


@dataclass(frozen=True)
class Decision:
    admit: bool
    replace: tuple[str, ...] = ()  # live run ids to terminate with cause `replaced`


def decide(policy: LockPolicy, live_run_ids: Sequence[str]) -> Decision:
    if not live_run_ids or policy is LockPolicy.ALLOW:
        return Decision(admit=True)
    if policy is LockPolicy.REPLACE:
        return Decision(admit=True, replace=tuple(live_run_ids))
    return Decision(admit=False)

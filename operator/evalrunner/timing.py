"""How long things may take, in one place: the numbers that decide when a run is declared dead.

A run's owner proves it is alive by its heartbeat; a detector that cannot see
the owner declares the run lost once the lease has passed without one. The
deadline bounds every run, whatever its owner's state. Change one of these and
the others' meaning shifts, so they live together (docs/ARCHITECTURE.md,
"Detectors").
"""

from __future__ import annotations

# Group commit of case rows: a SIGKILL loses at most this window (plus one batch write).
FLUSH_INTERVAL_S = 0.05

# A running owner renews its heartbeat this often ...
HEARTBEAT_INTERVAL_S = 5.0
# ... and a detector that cannot see the owner declares it lost after this long without one.
HEARTBEAT_LEASE_S = 30.0

# A run's deadline is started_at + timeout_seconds x cases + this grace (also the Job's deadline).
DEADLINE_GRACE_S = 60.0

# A runner pod stuck Pending (image pull, unschedulable) this long fails as never_started.
START_TIMEOUT_S = 120

# On SIGTERM in a pod, the runner waits this long for the controller to record the precise cause.
SHUTDOWN_DEFER_S = 2.0

# How often the controller classifies runner pods against the clock, and sweeps rows against pods.
SCAN_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 5.0

# A finished runner Job (and its pod) is deleted this long after its run row closed; the rows stay.
JOB_TTL_S = 600.0

# Every Kubernetes API request of the controller gives up after this long (connect, then read):
# the client's default is to wait forever, and one hung call would hold a loop.
API_CONNECT_TIMEOUT_S = 5.0
API_REQUEST_TIMEOUT_S = 30.0

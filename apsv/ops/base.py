"""Constants, the error every operation raises, and the progress callback type."""

from __future__ import annotations

from collections.abc import Callable

STATE_VERSION = 1
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
MULTIPLEXER_NAME = "apsv-multiplexer"  # = apsv.runtime.cluster.MULTIPLEXER_NAME (not imported: Ray)
VPSM_NAME = "apsv-vpsm"  # = apsv.runtime.vpsm.VPSM_NAME
CALL_TIMEOUT_S = 60.0
JOB_NAME_KEY = "job_name"  # the job metadata the dashboard shows as a job's name
STATUS_MAX_AGE_S = 15.0  # a published status older than this is not the control loop's (it stopped)

Progress = Callable[[str], None]  # told each step as it starts


class OpsError(RuntimeError):
    """An operation that cannot be done; the message says why and what to do."""

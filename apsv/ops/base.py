"""Constants, the error every operation raises, and the progress callback type."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

STATE_VERSION = 1
STATE_FILE = "state.json"
STARTING_FILE = "starting.json"  # a deployment on its way, not recorded in STATE_FILE yet
TOKEN_FILE = "auth_token"
MULTIPLEXER_NAME = "apsv-multiplexer"  # = apsv.runtime.cluster.MULTIPLEXER_NAME (not imported: Ray)
VPSM_NAME = "apsv-vpsm"  # = apsv.runtime.vpsm.VPSM_NAME
CALL_TIMEOUT_S = 60.0
JOB_NAME_KEY = "job_name"  # the job metadata the dashboard shows as a job's name
STATUS_MAX_AGE_S = 15.0  # a published status older than this is not the control loop's (it stopped)

Progress = Callable[[str], None]  # told each step as it starts


class OpsError(RuntimeError):
    """An operation that cannot be done; the message says why and what to do."""


class DeploymentStarting(OpsError):
    """No deployment is recorded yet, but a process that will record one is starting it."""

    def __init__(self, starting: dict[str, Any]) -> None:
        self.starting = starting  # {"owner", "pid", "since"}: the starting marker's
        since = time.strftime("%H:%M:%S", time.localtime(float(starting["since"])))
        super().__init__(
            f"{starting['owner']} is starting (pid {starting['pid']}, since {since}): "
            "its deployment is not recorded yet, ask again in a moment"
        )

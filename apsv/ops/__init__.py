"""Operating a deployment: `apsv up`, `status`, `replay`, `down`, and the state file between them.

`up` either joins a cluster (``ray.address``) or starts a local Ray head with ``ray start``:
loopback only, its own temp dir, Ray's token authentication on with a token file of its own. It
then deploys the multiplexer and the VPSM as named, detached actors (they outlive the command)
and, if configured, the forecaster's Serve application. What later commands need to find it all
again - address, token file, namespace, actor names, the processes it started - goes into a
state file, ``$APSV_STATE_DIR/state.json`` (default ``~/.apsv/state.json``). `apsv demo` writes
the same file for its own cluster while it runs, so `apsv status` can watch it. A process
starting a deployment it has not recorded yet can leave a starting marker beside the state file
(`mark_starting`): `apsv status` then says that it is starting rather than that there is none.

Ray reads ``RAY_AUTH_MODE`` and the token's path when it is first imported, so every function
here sets them (`use_auth`) before Ray is imported, and refreshes Ray's cached settings if it
already was.

Modules: state.py (the state file and the starting marker), access.py (token, loopback,
connecting), deployment.py (`up`, `down`), status.py and replay.py; base.py holds the constants,
`OpsError` and `DeploymentStarting`. The CLI
(`apsv/cli/ops.py`) and the job scripts (jobs/) call these.
"""

from apsv.ops.access import auth_env, connect, disconnect, ensure_token, loopback_env, use_auth, use_loopback
from apsv.ops.base import (
    CALL_TIMEOUT_S,
    JOB_NAME_KEY,
    MULTIPLEXER_NAME,
    STARTING_FILE,
    STATE_FILE,
    STATE_VERSION,
    STATUS_MAX_AGE_S,
    TOKEN_FILE,
    VPSM_NAME,
    DeploymentStarting,
    OpsError,
    Progress,
)
from apsv.ops.deployment import UP_STEPS, deploy_control_plane, deploy_forecaster, down, forget_deployment, up
from apsv.ops.replay import replay_file
from apsv.ops.state import (
    clear_starting,
    clear_state,
    mark_starting,
    read_starting,
    read_state,
    starting_path,
    state_dir,
    state_path,
    write_state,
)
from apsv.ops.status import REFUSED_KEYS, build_status, collect_status, connected, published_status, status

__all__ = [
    "CALL_TIMEOUT_S",
    "JOB_NAME_KEY",
    "MULTIPLEXER_NAME",
    "REFUSED_KEYS",
    "STARTING_FILE",
    "STATE_FILE",
    "STATE_VERSION",
    "STATUS_MAX_AGE_S",
    "TOKEN_FILE",
    "UP_STEPS",
    "VPSM_NAME",
    "DeploymentStarting",
    "OpsError",
    "Progress",
    "auth_env",
    "build_status",
    "clear_starting",
    "clear_state",
    "collect_status",
    "connect",
    "connected",
    "deploy_control_plane",
    "deploy_forecaster",
    "disconnect",
    "down",
    "ensure_token",
    "forget_deployment",
    "loopback_env",
    "mark_starting",
    "published_status",
    "read_starting",
    "read_state",
    "replay_file",
    "starting_path",
    "state_dir",
    "state_path",
    "status",
    "up",
    "use_auth",
    "use_loopback",
    "write_state",
]

"""Token authentication, loopback, and connecting to a recorded deployment's cluster."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from apsv.local_head import (
    SINGLE_NODE_ENV,
    cluster_processes,
    is_loopback,
)
from apsv.ops.base import JOB_NAME_KEY, OpsError


def ensure_token(path: Path) -> Path:
    """A token file at `path` (made, owner-only, if missing: 256 random bits in hex)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def auth_env(token_path: str | None, mode: str = "token") -> dict[str, str]:
    """The environment a Ray process needs to join the cluster (`apsv env` prints it)."""
    env = {"RAY_AUTH_MODE": mode}
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env


def use_auth(token_path: str | None, mode: str = "token") -> None:
    """Make this process (and what it starts) use the cluster's token."""
    if token_path:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray prefers it to the file: the file is the truth here
    os.environ.update(auth_env(token_path, mode))
    if "ray" in sys.modules:
        # Ray caches RAY_AUTH_MODE and the token at import; refresh both the way Ray itself does
        # when it turns token auth on (ray._private.authentication.authentication_token_setup).
        with contextlib.suppress(ImportError, AttributeError):
            raylet: Any = importlib.import_module("ray._raylet")
            raylet.Config.initialize("")
            raylet.AuthenticationTokenLoader.instance().reset_cache()


def loopback_env(address: str) -> dict[str, str]:
    """What a process needs to reach a loopback-only head: Ray otherwise rewrites 127.0.0.1 in
    an address to the host's own address, where nothing of that head listens."""
    return {SINGLE_NODE_ENV: "0"} if is_loopback(address.rsplit(":", 1)[0]) else {}


def use_loopback(address: str) -> None:
    """Make this process reach a loopback-only head at `address` (`loopback_env`)."""
    env = loopback_env(address)
    os.environ.update(env)
    if env and "ray" in sys.modules:
        # Ray reads the switch once, at import (ray._private.ray_constants); services reads the
        # constant at each call.
        with contextlib.suppress(ImportError, AttributeError):
            constants: Any = importlib.import_module("ray._private.ray_constants")
            constants.ENABLE_RAY_CLUSTER = False


def connect(
    address: str, namespace: str, token_path: str | None, auth_mode: str = "token", job_name: str = "apsv"
) -> None:
    """Join the cluster as a driver (quietly: no worker logs, no INFO lines on the terminal),
    named `job_name` in the dashboard's job list."""
    use_auth(token_path, auth_mode)
    use_loopback(address)
    import ray

    if ray.is_initialized():
        return  # an in-process caller (the demo) that is already connected
    env_address = os.environ.pop("RAY_ADDRESS", None)  # ours, not whatever the shell had
    try:
        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.ERROR,
            job_config=ray.job_config.JobConfig(metadata={JOB_NAME_KEY: job_name}),
        )
    except Exception as e:
        raise OpsError(
            f"cannot connect to the Ray cluster at {address}: {e}".splitlines()[0]
            + (f" (token file: {token_path})" if token_path else "")
        ) from None
    finally:
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address


def _ray_connected() -> bool:
    if "ray" not in sys.modules:  # not imported: certainly not connected (and no import cost)
        return False
    import ray

    return bool(ray.is_initialized())


def disconnect() -> None:
    if _ray_connected():
        import ray

        ray.shutdown()


def _alive(state: Mapping[str, Any]) -> bool:
    """Whether a recorded deployment may still be running (for a head we started: its processes
    are; for a demo's: the demo is; otherwise we cannot tell without connecting: assume so)."""
    owner = state.get("owner_pid")
    if owner is not None and not psutil.pid_exists(int(owner)):
        return False
    if state.get("started_head"):
        return bool(cluster_processes(state.get("process_session"), state.get("pids")))
    return True

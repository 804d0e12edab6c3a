"""The state file: where `apsv up` records what later commands need to find the deployment; and
the starting marker: that a process (`apsv demo`) is starting one it has not recorded yet."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from apsv.atomic_file import write_atomic
from apsv.ops.base import MULTIPLEXER_NAME, STARTING_FILE, STATE_FILE, STATE_VERSION, VPSM_NAME, OpsError


def state_dir() -> Path:
    """$APSV_STATE_DIR, else ~/.apsv."""
    return Path(os.environ.get("APSV_STATE_DIR") or Path.home() / ".apsv").expanduser()


def state_path() -> Path:
    return state_dir() / STATE_FILE


def write_state(info: Mapping[str, Any]) -> Path:
    """Record a running deployment (atomically, readable by the owner only). Keys, all optional
    but `address`: address, namespace, multiplexer, vpsm (actor names), token_path, auth_mode,
    temp_dir, pids ([{pid, create_time}] of processes to stop on `down`), started_head (whether
    `down` stops the cluster), owner ("apsv up", "apsv demo"), owner_pid (set when the actors
    live only as long as that process), forecaster_app, dashboard_url, metrics_export_port,
    telemetry_dir, config. This process's starting marker (`mark_starting`) goes: its deployment
    is recorded now."""
    if not info.get("address"):
        raise ValueError("the state needs the cluster's 'address'")
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {
        "version": STATE_VERSION,
        "namespace": "apsv",
        "multiplexer": MULTIPLEXER_NAME,
        "vpsm": VPSM_NAME,
        "auth_mode": "token",
        "started_head": False,
        **dict(info),
        "written": time.time(),
    }
    # Readers (status, down, another up) see the old state or the new one, never half of one.
    path = write_atomic(d / STATE_FILE, json.dumps(data, indent=2, sort_keys=True))
    clear_starting()  # this process's deployment is recorded: no longer starting
    return path


def read_state() -> dict[str, Any] | None:
    """The recorded deployment, or None if there is none."""
    path = state_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OpsError(f"{path}: unreadable state file ({e}); remove it if no deployment is running") from None
    if not isinstance(data, dict) or not data.get("address"):
        raise OpsError(f"{path}: not an APSV state file (no address); remove it if no deployment is running")
    return data


def clear_state() -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path().unlink()


def starting_path() -> Path:
    return state_dir() / STARTING_FILE


def mark_starting(owner: str) -> Path:
    """Record that this process (`owner`: "apsv demo") is starting a deployment, until
    `write_state` records it or `clear_starting` gives up on it, so that `apsv status` meanwhile
    says so rather than that there is none. Readable by the owner only, like the state file."""
    marker = {"owner": owner, "pid": os.getpid(), "create_time": psutil.Process().create_time(), "since": time.time()}
    return write_atomic(starting_path(), json.dumps(marker, indent=2, sort_keys=True))


def read_starting() -> dict[str, Any] | None:
    """{"owner", "pid", "since"} of the process starting a deployment, or None if none is. A
    stale marker (its process has ended, or it is not a marker) is removed."""
    path = starting_path()
    try:
        text = path.read_text()
    except OSError:  # none (or not ours to read)
        return None
    starting = _live_marker(text)
    if starting is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return starting


def clear_starting() -> None:
    """Remove this process's starting marker (another process's is left alone)."""
    path = starting_path()
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        if int(json.loads(path.read_text())["pid"]) == os.getpid():
            path.unlink()


def _live_marker(text: str) -> dict[str, Any] | None:
    """The marker's {"owner", "pid", "since"} if its process still runs, else None."""
    try:
        marker = json.loads(text)
        pid, create_time = int(marker["pid"]), float(marker["create_time"])
        starting = {"owner": str(marker["owner"]), "pid": pid, "since": float(marker["since"])}
    except (ValueError, TypeError, KeyError):
        return None
    return starting if _still_running(pid, create_time) else None


def _still_running(pid: int, create_time: float) -> bool:
    """Whether process `pid` runs and is the one created at `create_time`, not a later process
    given the same pid."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - create_time) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's: it runs, though it cannot be told apart
        return True

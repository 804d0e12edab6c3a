"""The state file: where `apsv up` records what later commands need to find the deployment."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apsv.atomic_file import write_atomic
from apsv.ops.base import MULTIPLEXER_NAME, STATE_FILE, STATE_VERSION, VPSM_NAME, OpsError


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
    telemetry_dir, config."""
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
    return write_atomic(d / STATE_FILE, json.dumps(data, indent=2, sort_keys=True))


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

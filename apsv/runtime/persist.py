"""The control plane's small persisted state, in Ray's internal key-value store (the GCS).

The multiplexer keeps its plan here (which instances exist, where, with what quota) and the VPSM
its control state (the instances it manages, its policies' state, the load history), so that
either, restarted by Ray after its process dies, takes up where it was: the multiplexer
rebuilds its routes from the instances named in its plan (each knows its sessions, their owners
and epochs), the VPSM re-attaches to its instances by name and goes on scaling. Values are JSON,
written whole on each change; a few kilobytes.

What it does not survive: the loss of the head node, which holds the GCS (Ray's own state goes
with it).
"""

from __future__ import annotations

import json
from typing import Any

STATUS_KEY = "status"  # what the VPSM publishes for `apsv status` (apsv/<namespace>/<vpsm>/status)


def _key(owner: str, what: str) -> bytes:
    return f"apsv/{owner}/{what}".encode()


def save(owner: str, what: str, value: Any) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_key(owner, what), json.dumps(value, separators=(",", ":")).encode(), overwrite=True)


def load(owner: str, what: str) -> Any:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_key(owner, what))
    return None if raw is None else json.loads(raw)


def forget(owner: str) -> None:
    """Everything kept for `owner` (a deployment stopped on purpose)."""
    from ray.experimental import internal_kv

    for k in internal_kv._internal_kv_list(f"apsv/{owner}/".encode()):
        internal_kv._internal_kv_del(k)

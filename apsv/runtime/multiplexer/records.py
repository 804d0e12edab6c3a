"""The multiplexer's records: instances, sessions (the session table), clients, counters."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from apsv.runtime.host import Key
from apsv.scaling.placement import InstanceLoad

LIVE, PENDING, MOVING, UNPLACED = "live", "pending", "moving", "unplaced"


@dataclass
class Inst:
    instance_id: str
    handle: Any
    protocol: str
    quota_bytes: int
    max_sessions: int
    node_id: str = ""
    endpoint: str = ""
    sessions: set[Key] = field(default_factory=set)
    busy: float = 0.0  # smoothed fraction of wall time applying batches (the VPSM observes it)
    accepting: bool = True
    alive: bool = True

    def load(self) -> InstanceLoad:
        return InstanceLoad(
            self.instance_id,
            len(self.sessions),
            self.max_sessions,
            0,
            self.quota_bytes,
            self.busy,
            self.accepting and self.alive,
        )

    def plan(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "quota_bytes": self.quota_bytes,
            "max_sessions": self.max_sessions,
            "node_id": self.node_id,
            "endpoint": self.endpoint,
            "accepting": self.accepting,
        }


@dataclass
class Rec:
    """A session's record: where it is, for whom."""

    key: Key
    protocol: str
    owner: str
    instance_id: str  # "" while unplaced
    epoch: int
    state: str = LIVE
    version: int = 0  # the route version when it last changed
    moves: int = 0

    def route(self) -> tuple[str, int, str]:
        return (self.instance_id, self.epoch, self.state)


@dataclass
class Client:
    client_id: str
    node_id: str = ""
    buffer_bytes: int = 0  # its buffer pool, as it declared at registration
    watching: int = 0  # its route watches outstanding here (a live client always has one)
    last_seen: float = field(default_factory=time.monotonic)  # when one last came or went
    keys: set[Key] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Counters:
    moves: int = 0
    move_seconds: float = 0.0  # summed over moved sessions: from the decision to their new route
    move_failed: int = 0  # sessions a target refused (they stayed where they were)
    move_not_found: int = 0  # sessions a move did not find on their source
    recoveries: int = 0  # instances found dead whose sessions were placed elsewhere
    sessions_recovered: int = 0  # placed again, to be restored from their clients' custody
    sessions_unplaced: int = 0  # recovered with no instance of their protocol left: waited for one
    sessions_reclaimed: int = 0  # re-registered by their clients after this multiplexer restarted
    restarts: int = 0  # times this multiplexer rebuilt its state after starting again
    rebuilt_sessions: int = 0
    clients_reaped: int = 0  # clients holding sessions that stopped watching for the lease: gone
    sessions_reaped: int = 0  # their sessions, closed
    tenant_refusals: int = 0  # sessions a client asked for outside the tenant it is registered for
    quota_refusals: int = 0  # sessions, or registrations, refused by a tenant quota

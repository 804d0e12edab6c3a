"""What every part of the multiplexer actor may use: its state, and the helpers actor.py
defines. The parts (clients.py, moves.py, recovery.py, inspection.py) derive from `Parts`, and
`Multiplexer` from them all; the declarations here are for the type checker only (at run time
`Parts` is empty), and it checks that the actor's definitions match them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from apsv.runtime.host import Key
from apsv.runtime.metrics import MultiplexerMetrics
from apsv.runtime.multiplexer.records import Client, Counters, Inst, Rec
from apsv.runtime.tenancy import TenantQuotas


class Parts:
    name: str
    owner: str
    node_id: str
    incarnation: str
    version: int
    client_lease_s: float
    quotas: TenantQuotas
    tenant_sessions: dict[int, int]
    instances: dict[str, Inst]
    sessions: dict[Key, Rec]
    clients: dict[str, Client]
    kept: set[str]
    c: Counters
    rng: random.Random
    metrics: MultiplexerMetrics
    offered: dict[str, dict[str, int]]
    _key: bytes
    _closed_offers: dict[str, tuple[float, dict[str, int]]]
    _recovering: dict[str, asyncio.Task[None]]

    if TYPE_CHECKING:

        async def _up(self) -> None: ...
        def _save_plan(self) -> None: ...
        def _client(self, client_id: str) -> Client: ...
        def _check(self, client: str, cred: bytes) -> Client: ...
        def _changed(self, recs: list[Rec]) -> None: ...
        async def _notify_settled(self) -> None: ...
        def _answer(self, recs: Mapping[Key, Rec | None]) -> dict[str, Any]: ...
        def _alive(self, iid: str) -> bool: ...
        async def _place(self, recs: list[Rec]) -> None: ...
        async def _close_keys(self, cl: Client, keys: list[Key]) -> None: ...
        async def arrivals(self) -> dict[str, int]: ...
        def _recover_soon(self, instance_id: str, probe: bool = False) -> None: ...
        async def move_sessions(self, keys: list[Key], dst: str, reason: str = "manual") -> int: ...
        async def instance_loads(self) -> dict[str, dict[str, Any]]: ...
        async def stats(self) -> dict[str, Any]: ...

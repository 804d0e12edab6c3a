"""What every part of the VPSM actor may use: its state, and the helpers other parts define.
The parts (instances.py, observe.py, inspection.py) derive from `Parts`, and `VPSM` from them
all; the declarations here are for the type checker only (at run time `Parts` is empty), and it
checks that the definitions match them."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from apsv.runtime.pending import PendingStarts
from apsv.runtime.telemetry import TelemetryWriter
from apsv.runtime.vpsm.metrics import VpsmMetrics
from apsv.runtime.vpsm.plan import Managed, ProtocolPlan


class Parts:
    plans: dict[str, ProtocolPlan]
    instance_resources: dict[str, float]
    name: str
    namespace: str | None
    multiplexer_name: str
    owner: str
    forecaster_app: str | None
    forecasts: dict[str, dict[str, tuple[float, ...]]]
    forecast_errors: int
    forecast_ok_at: float | None
    _forecast_misses: int
    forecaster_down_since: float | None
    im: Any
    interval_s: float
    telemetry: TelemetryWriter | None
    managed: dict[str, Managed]
    policy_state: dict[str, dict[str, Any]]
    forecast_trust: dict[str, float | None]
    last_reason: dict[str, str]
    history: dict[str, deque[float]]
    events: deque[dict[str, Any]]
    start_latencies: dict[str, deque[float]]
    _next_id: int
    _lock: asyncio.Lock
    steps: int
    _images: dict[str, str]
    lifetimes: deque[tuple[str, float, float]]
    actions: dict[str, int]
    _starting: dict[str, int]
    pending: PendingStarts
    desired: dict[str, int]
    warnings: list[dict[str, Any]]
    _tasks: set[asyncio.Task[None]]
    _imbalances: dict[str, float]
    _jobs: dict[str, deque[tuple[str, str | None]]]
    _movers: dict[str, asyncio.Task[None]]
    move_errors: int
    _metrics: VpsmMetrics
    restarts: int
    last_loads: dict[str, dict[str, Any]]

    if TYPE_CHECKING:

        def _save(self) -> None: ...
        def _count(self, protocol: str) -> int: ...
        def _counts(self, protocol: str) -> dict[str, int]: ...
        def _start_latency(self, protocol: str) -> float: ...

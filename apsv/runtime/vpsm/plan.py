"""What the VPSM runs per protocol (`ProtocolPlan`), and its record of each instance (`Managed`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apsv.runtime.instance import Allocation


@dataclass
class ProtocolPlan:
    """How one protocol's instances are run."""

    protocol: str
    backend: str = "process"
    min_instances: int = 1
    max_instances: int = 8
    allocation: Allocation = field(default_factory=Allocation)
    policy: str = "reactive"
    policy_config: dict[str, Any] = field(default_factory=dict)
    capacity_per_instance: float = 20_000.0  # messages/s, refined from telemetry as it runs
    slo_ms: float = 100.0  # p99 message latency objective (BFD: 10 ms)
    season: int = 60  # forecaster season in control intervals
    rebalance_by: str = "load"  # "load" (sessions weighted by their traffic) or "sessions" (counts)

    def __post_init__(self) -> None:
        if self.rebalance_by not in ("load", "sessions"):
            raise ValueError(f"{self.protocol}: rebalance_by {self.rebalance_by!r}: expected load or sessions")


@dataclass
class Managed:
    instance_id: str
    handle: Any
    protocol: str
    started: float
    start_latency_s: float
    requested: float = 0.0  # when the VPSM asked for it: billed from here (it is starting)
    draining: bool = False  # chosen for scale-down: takes no sessions, its drain is queued
    last_frames: int = 0
    last_cpu: float = 0.0
    last_busy: float = 0.0
    last_ts: float = 0.0

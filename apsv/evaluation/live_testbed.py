"""The live system a trace is replayed through: its configuration, the sessions the agents open,
the echo protocol's plan for the VPSM, and the units that convert trace rates to live ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from apsv.frame import HEADER_LEN, ProtocolId
from apsv.runtime.host import Key
from apsv.scaling.simulator import SimConfig

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LiveConfig:
    speed: float = 0.5  # trace seconds per wall second (slow motion: half the Ray calls per trace second)
    peak_rate: float = 1000.0  # live messages per wall second at the trace's peak (2,000 at speed 1 saturates 2 cores)
    sessions_per_vrouter: int = 4
    vrouters: int = 50
    payload_bytes: int = 64
    batch_delay_s: float = 0.04  # each agent's batching delay, in trace seconds (wall: / speed)
    agents: int = 5  # agents (clients) the virtual routers are spread over
    # Batches an agent's client may have in flight, and its buffers. A buffer is free again when
    # the slowest instance its batch touches has answered its part: the window must outlast the
    # longest backlog an instance builds before scaling relieves it (seconds), or one backlogged
    # instance stalls the agent's traffic to every instance (head-of-line blocking).
    max_inflight: int = 240
    buffer_slots: int = 256
    buffer_bytes: int = 8 << 10
    cpu_per_instance: float = 0.05  # Ray logical CPUs an instance reserves
    max_steps: int | None = None  # replay only the first N steps of the evaluated part
    calibrate_s: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.speed <= 0 or self.peak_rate <= 0 or self.batch_delay_s <= 0:
            raise ValueError("speed, peak_rate and batch_delay_s must be positive")
        if self.vrouters < 1 or self.sessions_per_vrouter < 1:
            raise ValueError("need at least one virtual router with one session")
        if self.agents < 1:
            raise ValueError("need at least one agent")
        # A client never has more batches out than buffers: a larger window would be simulated
        # (`agent_window_ms`) but not run.
        if not 1 <= self.max_inflight <= self.buffer_slots:
            raise ValueError(f"max_inflight {self.max_inflight} must be 1 to buffer_slots ({self.buffer_slots})")
        if HEADER_LEN + self.payload_bytes > self.buffer_bytes:
            raise ValueError(f"a {self.payload_bytes}-octet message does not fit a {self.buffer_bytes}-octet buffer")


def rate_scale(test: FloatArray, live: LiveConfig) -> float:
    """Live messages per trace message: the trace's peak becomes `peak_rate` per wall second."""
    peak = float(test.max()) or 1.0
    return live.peak_rate / (peak * live.speed)


def session_keys(live: LiveConfig) -> list[Key]:
    """Every echo session: `sessions_per_vrouter` on each of `vrouters` virtual routers."""
    return [
        (1, vr, int(ProtocolId.ECHO), sid)
        for vr in range(1, live.vrouters + 1)
        for sid in range(1, live.sessions_per_vrouter + 1)
    ]


def echo_plan(
    policy: str, policy_config: Mapping[str, Any], cfg: SimConfig, live: LiveConfig, capacity_trace: float
) -> Any:
    """The VPSM's plan for the echo stack on the process backend, scaled by `policy`."""
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import ProtocolPlan

    return ProtocolPlan(
        "echo",
        backend="process",
        min_instances=cfg.min_instances,
        max_instances=cfg.max_instances,
        allocation=Allocation(cpu=live.cpu_per_instance, memory_bytes=256 << 20, buffer_quota_bytes=4 << 20),
        policy=policy,
        policy_config=dict(policy_config),
        capacity_per_instance=capacity_trace,
        slo_ms=cfg.slo_ms,
    )


# one counter for every live deployment of this process: their actors' names never collide
_RUNS = iter(range(1, 1_000_000))


def deployment_suffix() -> str:
    """A name suffix no earlier live deployment of this process has used."""
    return f"-live-{next(_RUNS)}"

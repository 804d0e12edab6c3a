"""What a simulator run is given: the modelled system's settings (`SimConfig`) and the quantile
forecasts its policy sees at each step (`Forecasts`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SimConfig:
    protocol: str = "bgp"
    capacity: float = 2000.0  # messages/s one instance serves
    start_latency_s: float = 2.0
    drain_s: float = 1.0  # a draining instance stays (and is billed) this long
    session_move_s: float = 0.005  # the pause a moved session's messages see (measured: 4.9 ms)
    base_latency_ms: float = 1.0  # transport and framing floor
    slo_ms: float = 100.0
    step_s: float = 1.0
    interval_s: float = 1.0  # policy decisions
    min_instances: int = 1
    max_instances: int = 64
    budget_instances: int | None = None
    vrouters: int = 1000
    sessions_per_vrouter: int = 4  # the unit of placement is a session, not a whole router
    nodes: int = 100
    instances_per_node: int = 4
    max_queue_s: float = 2.0  # queue bound, in seconds of service
    zipf: float = 0.8  # skew of the routers' shares of the load
    # Random (Poisson) arrivals queue even below capacity: an M/D/1 wait per busy instance on
    # top of the fluid backlog. False: fluid only (no wait below capacity).
    poisson_arrivals: bool = True
    # The agents' batching delay (ms): an agent sends a batch at once when none is in flight,
    # else when its first message has waited this long. A batch comes back when its slowest
    # instance has applied its part, so a message waits up to min(delay, that round trip) at
    # its agent - and one backlogged instance makes every session of the agent wait the delay.
    batch_delay_ms: float = 0.0
    # The agents' in-flight window (ms of batches: batches in flight x batch delay; 0: no
    # coupling). An agent's batch touches every instance, and its buffer is free again only when
    # the slowest has read it: an instance whose backlog exceeds the window holds every agent up,
    # so every message waits at least the excess.
    agent_window_ms: float = 0.0
    # The host's CPU at instance starts: starting a Ray worker is CPU-bound (the interpreter, its
    # imports, registration) and takes a core for the start latency. A node has `node_cpus`
    # cores and its message path needs one, so when `node_cpus` or more instances start at once
    # on a node, the path there stops for `start_stall_s` (measured live with `node_cpus` at
    # once) per start beyond `node_cpus - 1`: what it should have served then waits, and so do
    # the messages that arrive meanwhile. 0: not modelled.
    node_cpus: int = 0
    start_stall_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.step_s <= 0 or self.interval_s < self.step_s:
            raise ValueError("capacity and step_s must be positive and interval_s >= step_s")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(f"need 1 <= min_instances ({self.min_instances}) <= max_instances ({self.max_instances})")
        if self.node_cpus < 0 or not 0 <= self.start_stall_s <= self.step_s:
            raise ValueError(f"need node_cpus >= 0 and 0 <= start_stall_s <= step_s ({self.step_s})")
        if self.max_instances > self.nodes * self.instances_per_node:
            raise ValueError(
                f"max_instances {self.max_instances} exceeds nodes x instances_per_node "
                f"({self.nodes} x {self.instances_per_node})"
            )


@dataclass
class Forecasts:
    """Quantile forecasts made every `every` steps: name ("p50", "p90", ...) -> (origins, horizon)."""

    every: int
    values: dict[str, FloatArray]

    def at(self, t: int) -> dict[str, tuple[float, ...]]:
        k = min(t // self.every, next(iter(self.values.values())).shape[0] - 1)
        offset = t - k * self.every
        return {q: tuple(float(x) for x in v[k, offset:]) for q, v in self.values.items()}

"""The one builder of a `ScalingContext`, so that the live VPSM and the simulator hand a policy
the same thing by construction: the same history length, the same oracle horizon, the same
fields. Each caller measures in its own way (the VPSM from its instances, the simulator from its
model) and passes the measurements here. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from apsv.scaling.policy import ScalingContext

HISTORY_STEPS = 600  # the load history a policy may read, in decisions (most recent last)
ORACLE_HORIZON = 64  # steps of the actual load ahead that the oracle sees (a trace knows them)


@dataclass(frozen=True)
class Limits:
    """What a protocol's configuration fixes for its scaling (`ProtocolPlan`, `SimConfig`)."""

    protocol: str
    capacity_per_instance: float
    min_instances: int
    max_instances: int
    slo_ms: float | None
    budget_instances: int | None = None


def with_interval(config: Mapping[str, Any], interval_s: float) -> Mapping[str, Any]:
    """A policy config with the decision interval (`interval_s`: the time between decisions, in
    the context's units) where it sets none; `config` itself where it sets one."""
    return config if "interval_s" in config else {**config, "interval_s": interval_s}


def build_context(
    limits: Limits,
    *,
    now: float,
    current_instances: int,
    load: float,
    load_history: Sequence[float],
    inflight: float,
    sessions: int,
    start_latency_s: float,
    forecast: Mapping[str, tuple[float, ...]] | None,
    forecast_step_s: float,
    instance_ages: Sequence[float] = (),
    latency_p99_ms: float | None = None,
    cpu_utilization: float | None = None,
    load_imbalance: float = 1.0,
    table_backlog: float = 0.0,
    trace: Sequence[float] | npt.NDArray[np.float64] = (),
    step: int = 0,
    state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> ScalingContext:
    """`load_history`: the rates so far (the last `HISTORY_STEPS` are kept); `trace` and `step`:
    a known load trace and the step it is at, whose next `ORACLE_HORIZON` values are the
    oracle's foresight (none without a trace)."""
    return ScalingContext(
        protocol=limits.protocol,
        now=now,
        current_instances=current_instances,
        load=load,
        inflight=inflight,
        sessions=sessions,
        capacity_per_instance=limits.capacity_per_instance,
        min_instances=limits.min_instances,
        max_instances=limits.max_instances,
        instance_ages=tuple(instance_ages),
        start_latency_s=start_latency_s,
        load_history=tuple(load_history[-HISTORY_STEPS:]),
        forecast=forecast,
        forecast_step_s=forecast_step_s,
        budget_instances=limits.budget_instances,
        latency_p99_ms=latency_p99_ms,
        slo_ms=limits.slo_ms,
        cpu_utilization=cpu_utilization,
        future_load=tuple(float(x) for x in trace[step + 1 : step + 1 + ORACLE_HORIZON]),
        load_imbalance=load_imbalance,
        table_backlog=table_backlog,
        state=state if state is not None else {},
        config=config if config is not None else {},
    )

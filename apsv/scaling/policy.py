"""Scaling policies as pure functions of a context (the shape of Ray Serve's autoscaling_policy.py).

A policy gets a `ScalingContext` - what the VPSM (or the simulator) observes for one protocol at
one instant, plus the state the policy returned last time - and returns a `Decision`: how many
instances it wants and the state to keep. It reads no clock and touches nothing; the same code
drives the live system and the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScalingContext:
    protocol: str
    now: float  # seconds, the caller's clock
    current_instances: int
    load: float  # messages/s over the last interval, all instances of the protocol
    inflight: float  # frames in flight or queued across the protocol's instances
    sessions: int
    capacity_per_instance: float  # messages/s one instance sustains (measured or configured)
    min_instances: int = 1
    max_instances: int = 16
    instance_ages: tuple[float, ...] = ()
    start_latency_s: float = 1.0
    load_history: tuple[float, ...] = ()  # most recent last
    forecast: Mapping[str, tuple[float, ...]] | None = None  # quantile name -> values ahead
    forecast_step_s: float = 1.0
    budget_instances: int | None = None  # a cost cap, in instances
    state: Mapping[str, Any] = field(default_factory=dict)  # what the policy returned last time
    config: Mapping[str, Any] = field(default_factory=dict)  # policy parameters


@dataclass(frozen=True)
class Decision:
    instances: int
    state: dict[str, Any]
    reason: str = ""


def clamp(n: int, ctx: ScalingContext) -> int:
    hi = ctx.max_instances if ctx.budget_instances is None else min(ctx.max_instances, ctx.budget_instances)
    return max(ctx.min_instances, min(hi, n))


def reactive(ctx: ScalingContext) -> Decision:
    """Ray Serve's algorithm on messages instead of requests.

    The error ratio is the load against `target_utilization` of the instances' capacity, smoothed
    (upscale/downscale smoothing factors); a change is made only after the wish has lasted for the
    up or down delay; bounds and budget apply.
    """
    cfg = ctx.config
    target = float(cfg.get("target_utilization", 0.7))
    up_smooth = float(cfg.get("upscale_smoothing", 1.0))
    down_smooth = float(cfg.get("downscale_smoothing", 0.5))
    up_delay = float(cfg.get("upscale_delay_s", 5.0))
    down_delay = float(cfg.get("downscale_delay_s", 30.0))
    cur = max(ctx.current_instances, 1)
    per = max(ctx.capacity_per_instance * target, 1e-9)
    error = ctx.load / (per * cur)
    smooth = up_smooth if error >= 1.0 else down_smooth
    desired = clamp(math.ceil(cur * (1.0 + (error - 1.0) * smooth)), ctx)
    if ctx.current_instances < ctx.min_instances:
        return Decision(clamp(ctx.min_instances, ctx), {}, "below the minimum")
    since = ctx.state.get("since")
    direction = (desired > ctx.current_instances) - (desired < ctx.current_instances)
    if direction == 0:
        return Decision(ctx.current_instances, {}, "on target")
    if ctx.state.get("direction") != direction or since is None:
        return Decision(ctx.current_instances, {"direction": direction, "since": ctx.now}, "waiting out the delay")
    delay = up_delay if direction > 0 else down_delay
    if ctx.now - float(since) < delay:
        return Decision(ctx.current_instances, dict(ctx.state), "waiting out the delay")
    return Decision(desired, {}, f"load {ctx.load:.0f}/s against {per:.0f}/s per instance")


def fixed(ctx: ScalingContext) -> Decision:
    """Hold `config['instances']` (or the current count): for forced scaling and tests."""
    n = int(ctx.config.get("instances", ctx.current_instances))
    return Decision(clamp(n, ctx), {}, "fixed")


Policy = Callable[[ScalingContext], Decision]
POLICIES: dict[str, Policy] = {"reactive": reactive, "fixed": fixed}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scaling policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None

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

from apsv.scaling import settings


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
    latency_p99_ms: float | None = None  # agent receive -> applied, over the last interval
    slo_ms: float | None = None  # the protocol's latency objective
    cpu_utilization: float | None = None  # busy fraction of the protocol's allocated CPU, 0..1
    future_load: tuple[float, ...] = ()  # the actual load ahead (oracle only: simulators know it)
    load_imbalance: float = 1.0  # busiest instance's load over the mean (placement is not perfect)
    # Messages (in the unit of `load`) that BGP peers which reset are expected to re-send: each
    # such session's table as it was before it went down, less what it has sent since it came
    # back (the VPSM gets frames from the hosts; a trace counts UPDATEs). A leading
    # indicator the forecast cannot have: a full-table peer that reconnects re-announces its
    # whole table within seconds (its initial transfer, ended by End-of-RIB, RFC 4724).
    table_backlog: float = 0.0
    state: Mapping[str, Any] = field(default_factory=dict)  # what the policy returned last time
    config: Mapping[str, Any] = field(default_factory=dict)  # policy parameters


@dataclass(frozen=True)
class Decision:
    instances: int
    state: dict[str, Any]
    reason: str = ""
    forecast_trust: float | None = None  # how far a forecast drove it (0..1); None: no forecast read


def clamp(n: int, ctx: ScalingContext) -> int:
    hi = ctx.max_instances if ctx.budget_instances is None else min(ctx.max_instances, ctx.budget_instances)
    return max(ctx.min_instances, min(hi, n))


def reactive(ctx: ScalingContext) -> Decision:
    """Ray Serve's algorithm on messages instead of requests.

    The error ratio is the load against `target_utilization` of the instances' capacity, smoothed
    (upscale/downscale smoothing factors); a change is made only after the wish has lasted for the
    up or down delay; bounds and budget apply.
    """
    s = settings.parse(settings.Reactive, ctx.config, "reactive")
    target, up_smooth, down_smooth = s.target_utilization, s.upscale_smoothing, s.downscale_smoothing
    up_delay, down_delay = s.upscale_delay_s, s.downscale_delay_s
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


def static(ctx: ScalingContext) -> Decision:
    """Provisioned once for the peak: `config['peak_load']` at `target_utilization` (or a fixed
    `config['instances']`); never changes."""
    s = settings.parse(settings.Static, ctx.config, "static")
    if s.instances is not None:
        return Decision(clamp(s.instances, ctx), {}, "static")
    peak = s.peak_load if s.peak_load is not None else max(ctx.load_history, default=ctx.load)
    per = ctx.capacity_per_instance * s.target_utilization
    return Decision(clamp(math.ceil(peak / max(per, 1e-9)), ctx), {}, f"static for a peak of {peak:.0f}/s")


def threshold(ctx: ScalingContext) -> Decision:
    """The Kubernetes HPA: desired = ceil(current x utilization / target), ignored within the
    tolerance; scaling down takes the highest recommendation of the stabilization window
    (default 300 s), scaling up is immediate but at most doubles (or +4) per step."""
    s = settings.parse(settings.Threshold, ctx.config, "threshold")
    target, tolerance, window = s.target_cpu, s.tolerance, s.stabilization_s
    cur = max(ctx.current_instances, 1)
    util = ctx.cpu_utilization
    if util is None:  # no CPU figure: the load against capacity stands in for it
        util = ctx.load / max(ctx.capacity_per_instance * cur, 1e-9)
    ratio = util / target
    raw = cur if abs(ratio - 1.0) <= tolerance else math.ceil(cur * ratio)
    recs = [(t, n) for t, n in ctx.state.get("recommendations", []) if ctx.now - float(t) < window]
    recs.append((ctx.now, raw))
    state = {"recommendations": recs}
    if raw > ctx.current_instances:
        desired = min(raw, max(2 * cur, cur + 4))
        return Decision(clamp(desired, ctx), state, f"utilization {util:.0%} over target {target:.0%}")
    stable = max(n for _, n in recs)  # the highest recommendation in the window
    return Decision(clamp(min(stable, ctx.current_instances), ctx), state, f"utilization {util:.0%}")


def instances_for(load: float, ctx: ScalingContext, target: float) -> int:
    """Instances for `load` when the busiest one, carrying `load_imbalance` times the mean, may
    run at `target` of its capacity."""
    per = ctx.capacity_per_instance * target / max(ctx.load_imbalance, 1.0)
    return math.ceil(load / max(per, 1e-9))


def slo_utilization(ctx: ScalingContext, fraction: float = 0.8) -> float:
    """The highest utilization at which one instance's p99 latency stays within `fraction` of the
    SLO, from queueing alone: messages arriving at random to a server of fixed service time
    S = 1 / capacity (M/D/1) wait with probability rho, S / (2 (1 - rho)) on average when they do,
    so p99 ~ S + S / (2 (1 - rho)) ln(100 rho), on top of the latency every message has
    (`fixed_latency_ms` in the config). 1.0 without an SLO. (At 2,000 msgs/s per instance
    a 100 ms SLO allows 0.99; BFD's 10 ms allows 0.85: above it random arrivals alone miss it.)"""
    if ctx.slo_ms is None or ctx.capacity_per_instance <= 0:
        return 1.0
    # `service_ms` in the config: one message's service time when the capacity is counted in
    # other units (a replayed trace: the VPSM counts trace messages, an instance serves live ones)
    s = settings.common(ctx.config)
    service_ms = s.service_ms if s.service_ms is not None else 1000.0 / ctx.capacity_per_instance
    # `fixed_latency_ms`: what every message has whatever the load (the transport floor, the
    # agents' batching wait); queueing gets what is left of the budget
    budget = fraction * ctx.slo_ms - s.fixed_latency_ms
    lo, hi = 0.0, 0.99
    for _ in range(30):
        rho = 0.5 * (lo + hi)
        p99 = service_ms + service_ms / (2.0 * (1.0 - rho)) * math.log(max(100.0 * rho, 1.0))
        lo, hi = (rho, hi) if p99 <= budget else (lo, rho)
    return max(lo, 0.05)


def utilization_target(ctx: ScalingContext, target: float, slo_fraction: float) -> float:
    """The policy's target utilization, never above what the SLO allows (`slo_fraction` of it)."""
    return min(target, slo_utilization(ctx, slo_fraction))


def predictive(ctx: ScalingContext) -> Decision:
    """The forecast-driven policy, weighted by the forecast's measured skill
    (`apsv/scaling/predictive.py`, which builds on this module)."""
    from apsv.scaling.predictive import predictive as skill_weighted

    return skill_weighted(ctx)


def oracle(ctx: ScalingContext) -> Decision:
    """Perfect foresight: what the actual load (`future_load`) needs at `target_utilization`
    (default 0.9) over the next lead time plus `hold_s` (default 20 s, so an instance is not
    drained just before it is needed again: every drain moves sessions); the cost floor for
    running without SLO violations - so never busier than the SLO allows from the queueing of
    random arrivals alone (`slo_utilization`)."""
    s = settings.parse(settings.Oracle, ctx.config, "oracle")
    target = utilization_target(ctx, s.target_utilization, s.slo_fraction)
    lead = ctx.start_latency_s + s.interval_s
    k = max(1, math.ceil((lead + s.hold_s) / max(ctx.forecast_step_s, 1e-9)))
    peak = max((ctx.load, *ctx.future_load[:k]))
    return Decision(clamp(instances_for(peak, ctx, target), ctx), {}, f"actual peak {peak:.0f}/s ahead")


def fixed(ctx: ScalingContext) -> Decision:
    """Hold `config['instances']` (or the current count): for forced scaling and tests."""
    s = settings.parse(settings.Fixed, ctx.config, "fixed")
    n = ctx.current_instances if s.instances is None else s.instances
    return Decision(clamp(n, ctx), {}, "fixed")


def ray_serve(ctx: ScalingContext) -> Decision:
    """Ray Serve's own default policy, called through an adapter (`apsv/scaling/ray_serve.py`,
    imported on first use: it loads Ray Serve)."""
    from apsv.scaling.ray_serve import ray_serve as serve_policy

    return serve_policy(ctx)


Policy = Callable[[ScalingContext], Decision]
POLICIES: dict[str, Policy] = {
    "static": static,
    "reactive": reactive,
    "ray_serve": ray_serve,
    "threshold": threshold,
    "predictive": predictive,
    "oracle": oracle,
    "fixed": fixed,
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scaling policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None

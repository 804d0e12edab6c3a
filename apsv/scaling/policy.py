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


def static(ctx: ScalingContext) -> Decision:
    """Provisioned once for the peak: `config['peak_load']` at `target_utilization` (or a fixed
    `config['instances']`); never changes."""
    cfg = ctx.config
    if "instances" in cfg:
        return Decision(clamp(int(cfg["instances"]), ctx), {}, "static")
    peak = float(cfg.get("peak_load", max(ctx.load_history, default=ctx.load)))
    per = ctx.capacity_per_instance * float(cfg.get("target_utilization", 0.7))
    return Decision(clamp(math.ceil(peak / max(per, 1e-9)), ctx), {}, f"static for a peak of {peak:.0f}/s")


def threshold(ctx: ScalingContext) -> Decision:
    """The Kubernetes HPA: desired = ceil(current x utilization / target), ignored within the
    tolerance; scaling down takes the highest recommendation of the stabilization window
    (default 300 s), scaling up is immediate but at most doubles (or +4) per step."""
    cfg = ctx.config
    target = float(cfg.get("target_cpu", 0.7))
    tolerance = float(cfg.get("tolerance", 0.1))
    window = float(cfg.get("stabilization_s", 300.0))
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


def _needed(load: float, ctx: ScalingContext, target: float) -> int:
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
    service_ms = float(ctx.config.get("service_ms", 1000.0 / ctx.capacity_per_instance))
    # `fixed_latency_ms`: what every message has whatever the load (the transport floor, the
    # agents' batching wait); queueing gets what is left of the budget
    budget = fraction * ctx.slo_ms - float(ctx.config.get("fixed_latency_ms", 0.0))
    lo, hi = 0.0, 0.99
    for _ in range(30):
        rho = 0.5 * (lo + hi)
        p99 = service_ms + service_ms / (2.0 * (1.0 - rho)) * math.log(max(100.0 * rho, 1.0))
        lo, hi = (rho, hi) if p99 <= budget else (lo, rho)
    return max(lo, 0.05)


def _target(ctx: ScalingContext, default: float) -> float:
    """The configured `target_utilization`, never above what the SLO allows (`slo_fraction`)."""
    cfg = ctx.config
    return min(float(cfg.get("target_utilization", default)), slo_utilization(ctx, float(cfg.get("slo_fraction", 0.8))))


def predictive(ctx: ScalingContext) -> Decision:
    """Provision now for the forecast at now + lead time, and for the live load plus its backlog.

    - lead time = the measured instance start latency plus one decision interval: an instance
      asked for now serves from then on;
    - need = the peak of the chosen forecast quantile (`quantile`, default p90) from now to the
      end of the lead time plus `dwell_s` (5: a join moves only part of the sessions, the rest
      follow at later joins, so a burst wants its instances a few seconds early), at the target
      utilization of the per-instance capacity (learned from telemetry by the VPSM);
    - utilization: `target_utilization`, but never above what the SLO allows from queueing alone
      (`slo_utilization`, within `slo_fraction` 0.8 of it: 0.85 busy for a 10 ms SLO);
    - the upper quantile is bounded by `max_forecast_ratio` (3) times the larger of the median
      forecast and the highest load of the last `recent_s` (60) steps (a storm a minute gone no
      longer licenses the band it left in the model's context);
    - live correction: never below what the live load plus draining the measured backlog
      (`inflight` past `backlog_tolerance_s` of service per instance) within `backlog_s` (2 s)
      needs at the target - except that a live load between the target and `live_band` (half)
      of the way to full utilization is held through, not scaled for (noise; it would flap);
      a p99 latency above the SLO while the instances are busier than the target adds one
      instance on top;
    - table transfers: peers that reset re-send their tables (`table_backlog`), known from the
      moment a session goes down; a transfer arrives as fast as the receiver takes it, fastest at
      first, so it is sized as `table_backlog / table_transfer_s` (20 s: the backlog's time
      constant) on top of the forecast, which models the organic load only;
    - up at once; down only after the wish has held for `downscale_delay_s` and only instances
      older than `min_lifetime_s` may go (against churn).
    """
    cfg = ctx.config
    q = str(cfg.get("quantile", "p90"))
    target = _target(ctx, 0.8)
    interval = float(cfg.get("interval_s", 1.0))
    dwell = float(cfg.get("dwell_s", 5.0))
    down_delay = float(cfg.get("downscale_delay_s", 30.0))
    min_life = float(cfg.get("min_lifetime_s", 60.0))
    backlog_s = float(cfg.get("backlog_s", 2.0))
    lead = ctx.start_latency_s + interval
    forecast = (ctx.forecast or {}).get(q, ())
    ratio = float(cfg.get("max_forecast_ratio", 3.0))
    recent = ctx.load_history[-int(cfg.get("recent_s", 60)) :]
    k = max(1, math.ceil((lead + dwell) / max(ctx.forecast_step_s, 1e-9)))
    predicted = max(forecast[:k], default=0.0)
    if ratio > 0 and q != "p50":
        # An upper quantile far above both the median forecast and anything seen lately is the
        # model's band exploding after an outlier (a reset storm in its context), not a
        # prediction: bound it. A burst the median itself predicts is kept.
        median = max((ctx.forecast or {}).get("p50", ())[:k], default=0.0)
        predicted = min(predicted, ratio * max(median, max(recent, default=0.0), ctx.load))

    # the live load, plus the backlog drained within backlog_s (a backlog a few instances hold
    # drains only as fast as their sessions move away: size for the load that would clear it).
    # Up to `backlog_tolerance_s` of service per instance (50 ms, at most half the SLO) is the
    # queueing of random arrivals, not a backlog: it flickers, and sizing for it would flap.
    tolerance_s = float(cfg.get("backlog_tolerance_s", 0.05))
    if ctx.slo_ms is not None:
        tolerance_s = min(tolerance_s, ctx.slo_ms / 2000.0)
    normal = tolerance_s * ctx.capacity_per_instance * max(ctx.current_instances, 1)
    live = ctx.load + max(ctx.inflight - normal, 0.0) / max(backlog_s, 1e-9)
    # hysteresis on the live load: past the target but not past `live_band` of the way to full
    # utilization (half) is noise to hold through (scaling for it would flap); beyond, size for
    # it at the target. Scaling down never goes below what it needs at the target.
    live_need = _needed(live, ctx, target)
    if _needed(live, ctx, target + (1.0 - target) * float(cfg.get("live_band", 0.5))) <= ctx.current_instances:
        live_need = min(live_need, ctx.current_instances)
    table_rate = max(ctx.table_backlog, 0.0) / max(float(cfg.get("table_transfer_s", 20.0)), 1e-9)
    desired = max(_needed(predicted + table_rate, ctx, target), live_need)
    reason = f"{q} {predicted:.0f}/s within {lead + dwell:.1f}s, live {ctx.load:.0f}/s + backlog {ctx.inflight:.0f}"
    if table_rate > 0:
        reason += f", tables to re-send {ctx.table_backlog:.0f} ({table_rate:.0f}/s)"
    late = ctx.latency_p99_ms is not None and ctx.slo_ms is not None and ctx.latency_p99_ms > ctx.slo_ms
    busy = ctx.cpu_utilization is None or ctx.cpu_utilization > target
    if late and busy:
        # over the SLO while the instances are busy: reality exceeds the forecast. (A backlog that
        # is only draining is not helped by new instances: queued messages do not move.)
        desired = max(desired, ctx.current_instances + 1)
        reason += f", p99 {ctx.latency_p99_ms:.0f} ms over the {ctx.slo_ms:.0f} ms SLO"
    desired = clamp(desired, ctx)
    if desired >= ctx.current_instances:
        return Decision(desired, {}, reason)
    since = ctx.state.get("down_since")
    if since is None:
        return Decision(ctx.current_instances, {"down_since": ctx.now}, reason + " (down: waiting)")
    if ctx.now - float(since) < down_delay:
        return Decision(ctx.current_instances, {"down_since": since}, reason + " (down: waiting)")
    removable = sum(1 for age in ctx.instance_ages if age >= min_life) if ctx.instance_ages else ctx.current_instances
    floor = ctx.current_instances - removable
    return Decision(clamp(max(desired, floor), ctx), {"down_since": since}, reason)


def oracle(ctx: ScalingContext) -> Decision:
    """Perfect foresight: what the actual load (`future_load`) needs at `target_utilization`
    (default 0.9) over the next lead time plus `hold_s` (default 20 s, so an instance is not
    drained just before it is needed again: every drain moves sessions); the cost floor for
    running without SLO violations - so never busier than the SLO allows from the queueing of
    random arrivals alone (`slo_utilization`)."""
    cfg = ctx.config
    target = _target(ctx, 0.9)
    lead = ctx.start_latency_s + float(cfg.get("interval_s", 1.0))
    k = max(1, math.ceil((lead + float(cfg.get("hold_s", 20.0))) / max(ctx.forecast_step_s, 1e-9)))
    peak = max((ctx.load, *ctx.future_load[:k]))
    return Decision(clamp(_needed(peak, ctx, target), ctx), {}, f"actual peak {peak:.0f}/s ahead")


def fixed(ctx: ScalingContext) -> Decision:
    """Hold `config['instances']` (or the current count): for forced scaling and tests."""
    n = int(ctx.config.get("instances", ctx.current_instances))
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

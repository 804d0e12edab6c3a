"""The predictive policy: provision ahead of the forecast only as far as the forecast has earned.

Each decision forms two recommendations and weighs them by the forecast's measured skill:

- `reactive_n`: the fallback rule's (`fallback`, default `threshold` with `fallback_config`,
  default the HPA rule at target 0.6 and a 60 s stabilization window) - what a user runs without
  prediction, its own state kept across decisions;
- `proactive_n`: full proactive provisioning (`proactive` below) for the forecast over the lead
  time, at the utilization the SLO allows.

With `trust` (0..1, `apsv.scaling.skill`: the forecast's recent error against persistence and its
upper band's coverage, on windows already seen):

    desired = ceil(reactive_n + trust x (proactive_n - reactive_n))

At trust 0 the decision is the fallback's, unchanged. Above it, churn is a cost:

- scale-out is immediate (a late instance costs violations; a start costs one stall);
- scale-in takes the highest recommendation of the last `stabilization_s` (default the
  fallback's window, never shorter than the lead time: no scale-in that the need of the next
  start latency would undo), and only instances older than `min_lifetime_s` may go;
- the forecast alone never scales in: `proactive_n` is never below what the live load needs.

Tables that peers which reset will re-send (`table_backlog`) are announced, not forecast: what
they and the live load need is provisioned whatever the trust.

`Decision.forecast_trust` carries the trust to status and metrics ("forecast trusted at 0.8").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from apsv.scaling import skill
from apsv.scaling.policy import (
    Decision,
    ScalingContext,
    clamp,
    get_policy,
    instances_for,
    utilization_target,
)

# The fallback when none is configured: the HPA rule with the repository's baseline settings
DEFAULT_FALLBACK = "threshold"
DEFAULT_FALLBACK_CONFIG = {"target_cpu": 0.6, "stabilization_s": 60.0}


def check_config(config: Mapping[str, Any]) -> None:
    """ValueError naming what is wrong in a predictive policy config (checked where it is read)."""
    fallback = config.get("fallback", DEFAULT_FALLBACK)
    if fallback in ("predictive", "oracle") or not isinstance(fallback, str):
        raise ValueError(
            f"fallback: {fallback!r} cannot be the fallback (a reactive rule is: threshold, ray_serve, ...)"
        )
    get_policy(fallback)  # an unknown name raises with the known ones
    if not isinstance(config.get("fallback_config", {}), Mapping):
        raise ValueError("fallback_config: expected a mapping of the fallback policy's settings")
    for key in ("trust", "skill_full_at", "skill_coverage_floor", "scale_tolerance"):
        if key in config and not 0.0 <= float(config[key]) <= 1.0:
            raise ValueError(f"{key}: expected a number in 0..1, got {config[key]!r}")


def proactive(ctx: ScalingContext, margin: float = 1.0) -> tuple[int, str, float | None, float | None, float, int]:
    """Full proactive provisioning: (instances, reason, the median forecast's peak over the
    window and the upper quantile's as provisioned for, None without a forecast, the window's
    seconds, the instances the live load plus announced table transfers need - known, not
    forecast: 0 without a transfer).

    - the band: the upper quantile's distance from the median, times `margin` (calibrated
      online, `apsv.scaling.skill`);

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
      constant) on top of the forecast, which models the organic load only.
    """
    cfg = ctx.config
    q = str(cfg.get("quantile", "p90"))
    target = utilization_target(ctx, 0.8)
    interval = float(cfg.get("interval_s", 1.0))
    dwell = float(cfg.get("dwell_s", 5.0))
    backlog_s = float(cfg.get("backlog_s", 2.0))
    lead = ctx.start_latency_s + interval
    forecast = (ctx.forecast or {}).get(q, ())
    ratio = float(cfg.get("max_forecast_ratio", 3.0))
    recent = ctx.load_history[-int(cfg.get("recent_s", 60)) :]
    k = max(1, math.ceil((lead + dwell) / max(ctx.forecast_step_s, 1e-9)))
    median = max((ctx.forecast or {}).get("p50", ())[:k], default=0.0)
    predicted = max(forecast[:k], default=0.0)
    if q != "p50" and predicted > median:
        predicted = median + margin * (predicted - median)
    if ratio > 0 and q != "p50":
        # An upper quantile far above both the median forecast and anything seen lately is the
        # model's band exploding after an outlier (a reset storm in its context), not a
        # prediction: bound it. A burst the median itself predicts is kept.
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
    live_need = instances_for(live, ctx, target)
    if instances_for(live, ctx, target + (1.0 - target) * float(cfg.get("live_band", 0.5))) <= ctx.current_instances:
        live_need = min(live_need, ctx.current_instances)
    table_rate = max(ctx.table_backlog, 0.0) / max(float(cfg.get("table_transfer_s", 20.0)), 1e-9)
    desired = max(instances_for(predicted + table_rate, ctx, target), live_need)
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
    known = instances_for(ctx.load + table_rate, ctx, target) if table_rate > 0 else 0
    return (
        desired,
        reason,
        (median if forecast else None),
        (predicted if forecast else None),
        k * ctx.forecast_step_s,
        known,
    )


def predictive(ctx: ScalingContext) -> Decision:
    cfg = ctx.config
    q = str(cfg.get("quantile", "p90"))
    level = int(q[1:]) / 100.0 if q[1:].isdigit() else 0.9
    sk_cfg = skill.SkillConfig.from_config(cfg, nominal=level)
    state: dict[str, Any] = dict(ctx.state)

    margin = float(state.get("skill", {}).get("margin", 1.0)) if "margin" not in cfg else float(cfg["margin"])
    proactive_n, pro_reason, median_peak, band_peak, window_s, known_n = proactive(ctx, margin)
    fallback_name = str(cfg.get("fallback", DEFAULT_FALLBACK))
    fallback_cfg = dict(cfg.get("fallback_config", DEFAULT_FALLBACK_CONFIG))
    fb = get_policy(fallback_name)(replace(ctx, state=state.get("fallback", {}), config=fallback_cfg))
    # what each recommendation provisions for, in load: instances x what one serves at the target
    per = ctx.capacity_per_instance * utilization_target(ctx, 0.8) / max(ctx.load_imbalance, 1.0)
    sk = skill.observe(
        state.get("skill"),
        now=ctx.now,
        load=ctx.load,
        window_s=window_s,
        median_peak=median_peak,
        provisioned=(proactive_n * per, fb.instances * per),
        band_peak=band_peak,
        tau=level,
        score_tau=float(cfg["skill_level"]) if "skill_level" in cfg else None,
        halflife=sk_cfg.halflife,
    )
    w = float(cfg["trust"]) if "trust" in cfg else skill.trust(sk, sk_cfg)
    trust_note = (
        f"forecast trusted at {w:.2f} (loss {skill.ratio(sk):.2f}x {fallback_name}'s, "
        f"covers {skill.coverage(sk):.0%}, median error {skill.forecast_ratio(sk):.2f}x persistence's)"
    )
    interval = float(cfg.get("interval_s", 1.0))
    # the scale-in window: the fallback's at trust 0, `stabilization_s` (the proactive rule's;
    # default the fallback's) at trust 1, in between by the trust; never shorter than the lead
    # time (no scale-in the next start would undo) nor than `hold_decisions` decisions
    fb_window = float(fallback_cfg.get("stabilization_s", 60.0))
    own_window = float(cfg.get("stabilization_s", fb_window))
    window = max(
        fb_window + w * (own_window - fb_window),
        ctx.start_latency_s + interval,
        float(cfg.get("hold_decisions", 2)) * interval,
    )
    recs = [(float(t), int(n)) for t, n in state.get("recs", []) if ctx.now - float(t) < window - 1e-9]
    since = float(state.get("since", ctx.now))  # the first decision this state has seen
    new_state: dict[str, Any] = {"skill": sk, "fallback": fb.state, "trust": w, "since": since}
    if w <= 0.0 and known_n <= fb.instances:
        # no skill shown (and no table transfer announced): exactly the fallback rule
        recs.append((ctx.now, fb.instances))
        new_state["recs"] = recs
        return Decision(fb.instances, new_state, f"{trust_note}: {fallback_name}: {fb.reason}", w)

    # tables peers are re-sending are known, not forecast: provisioned whatever the trust
    blended = clamp(max(math.ceil(fb.instances + w * (proactive_n - fb.instances) - 1e-9), known_n), ctx)
    recs.append((ctx.now, blended))
    new_state["recs"] = recs
    reason = f"{trust_note}: {pro_reason}; {fallback_name} {fb.instances}"
    tolerance = float(cfg.get("scale_tolerance", 0.1))
    if blended > ctx.current_instances:
        late = ctx.latency_p99_ms is not None and ctx.slo_ms is not None and ctx.latency_p99_ms > ctx.slo_ms
        busy = ctx.cpu_utilization is not None and ctx.cpu_utilization > utilization_target(ctx, 0.8)
        small = blended <= ctx.current_instances + max(1.0, tolerance * ctx.current_instances)
        if not (late or busy) and (small or proactive_n <= ctx.current_instances):
            # nothing live says the instances are short (p99 within the SLO, utilization within
            # the target), and the ask is for one more or within the tolerance (HPA's 10 %), or
            # only the fallback's headroom asks (the forecast does not, its weight moved): noise,
            # not worth a start and the moves it brings
            return Decision(ctx.current_instances, new_state, reason + " (up: within tolerance)", w)
        return Decision(blended, new_state, reason, w)
    if blended == ctx.current_instances:
        return Decision(blended, new_state, reason, w)
    # scale-in: the highest recommendation of the window, and only instances past their minimum
    # lifetime go
    # (a window not yet seen in full holds everything: no scale-in on a fresh start)
    stable = max(n for _, n in recs) if ctx.now - since >= window - 1e-9 else ctx.current_instances
    if stable > ctx.current_instances * (1.0 - tolerance):
        # within the tolerance of the current count (HPA's 10 %): not worth a drain's moves
        stable = ctx.current_instances
    min_life = float(cfg.get("min_lifetime_s", 60.0))
    removable = sum(1 for age in ctx.instance_ages if age >= min_life) if ctx.instance_ages else ctx.current_instances
    floor = ctx.current_instances - removable
    n = clamp(min(max(stable, floor), ctx.current_instances), ctx)
    return Decision(n, new_state, reason + (" (down: held by the window)" if n > blended else ""), w)

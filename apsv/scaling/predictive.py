"""The predictive policy: provision ahead of the forecast only as far as the forecast has earned.

Each decision forms two recommendations and weighs them by the forecast's measured skill:

- `reactive_n`: the fallback rule's - what a user runs without prediction. `fallback` names one
  or several (default the HPA rule at target 0.6 with a 60 s stabilization window and Ray Serve's
  policy with Ray's defaults), each run from its own state on the live context and scored beside
  the forecast; the one that has served the load best so far (`skill.better_fallback`) is it.
  Where it asks for no more than the live instances, it keeps no more than its own path runs
  (`_own_path_hold`): a delay that holds its own decisions does not hold instances another rule
  started, though never below what the live load needs. With `hedge_below` set (off, 0, by
  default), while the forecast is trusted under it, it is the most that any of the fallback
  rules asks, each so held: the policy is then in effect a reactive rule, and which rule serves
  a load better shows only over its bursts - the one chosen on a quiet stretch is often the
  leaner, and misses the next burst that the other would have met. Hedged, the policy runs no
  fewer instances than the more cautious rule; it trades cost for violation seconds (measured
  in docs/scaling.md, "Held out");
- `proactive_n`: full proactive provisioning (`proactive` below) for the forecast over the lead
  time, at the utilization the SLO allows.

With `trust` (0..1, `apsv.scaling.skill`: the forecast's recent error against persistence and its
upper band's coverage, on windows already seen):

    desired = ceil(reactive_n + trust x (proactive_n - reactive_n))

Below the fallback's recommendation (the forecast sees less coming) the weight is trust x
`skill.guard`: provisioning on the forecast may save capacity only as far as it has not run short
of the SLO's capacity more often than the fallback. At trust 0 the decision is `reactive_n`
(as above), unchanged. Above it, churn is a cost:

- scale-out is immediate (a late instance costs violations; a start costs one stall);
- scale-in blends the fallback's recommendation with the highest proactive one of a window of
  `stabilization_s` (default 60 s, the HPA baseline's; the fallback's is stabilized by the
  fallback itself) whatever the trust, never shorter than the lead time: no scale-in that the
  need of the next start latency would undo; and only instances older than `min_lifetime_s` may
  go;
- the forecast alone never scales in: `proactive_n` is never below what the live load needs.

Tables that peers which reset will re-send (`table_backlog`) are announced, not forecast: what
they and the live load need is provisioned whatever the trust.

`Decision.forecast_trust` carries the trust to status and metrics ("forecast trusted at 0.8").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from apsv.scaling import settings, skill
from apsv.scaling.policy import (
    Decision,
    ScalingContext,
    clamp,
    get_policy,
    instances_for,
    slo_utilization,
    utilization_target,
)

# The fallbacks when none is configured: the HPA rule with the repository's baseline settings
# and Ray Serve's own policy with Ray's defaults, scored side by side (`skill.better_fallback`)
DEFAULT_FALLBACK = ("threshold", "ray_serve")
DEFAULT_FALLBACK_CONFIGS: dict[str, dict[str, Any]] = {
    "threshold": {"target_cpu": 0.6, "stabilization_s": 60.0},
    "ray_serve": {},
}
# what callers add to every policy's config that the fallbacks read too
_CONTEXT_KEYS = ("interval_s", "service_ms", "fixed_latency_ms")


def fallbacks(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The fallback rules a predictive config names, each with its settings: `fallback` is a
    policy name or a list of them; `fallback_config` the one's settings, or with several a
    mapping of each one's by name (a name left out gets its default: threshold at 0.6 with a
    60 s window, Ray Serve's policy with Ray's defaults). ValueError naming what is wrong."""
    raw = config.get("fallback")
    raw = DEFAULT_FALLBACK if raw is None else raw
    names = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list | tuple) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"fallback: expected a reactive policy's name or a list of them, got {raw!r}")
    for n in names:
        if n in ("predictive", "oracle"):
            raise ValueError(f"fallback: {n!r} cannot be the fallback (a reactive rule is: threshold, ray_serve, ...)")
        get_policy(n)  # an unknown name raises with the known ones
    given = config.get("fallback_config")
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ValueError("fallback_config: expected a mapping of the fallback policy's settings")
    if len(names) > 1 and any(k not in names or not isinstance(v, Mapping) for k, v in given.items()):
        raise ValueError(
            f"fallback_config: with several fallbacks, a mapping of each one's settings by name ({', '.join(names)})"
        )
    context = {k: config[k] for k in _CONTEXT_KEYS if k in config}
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        own = (
            given
            if len(names) == 1 and config.get("fallback_config") is not None
            else given.get(n, DEFAULT_FALLBACK_CONFIGS.get(n, {}))
        )
        out[n] = {**context, **dict(own)}
    return out


def check_config(config: Mapping[str, Any]) -> None:
    """ValueError naming what is wrong in a predictive policy config: its own settings
    (`apsv.scaling.settings.Predictive`), the fallbacks it names and each one's settings."""
    s = settings.parse(settings.Predictive, config, "predictive")
    if not (s.quantile[:1] == "p" and s.quantile[1:].isdigit()):
        raise ValueError(f"quantile: expected a quantile's name such as p90, got {s.quantile!r}")
    for name, own in fallbacks(config).items():
        try:
            if name == "ray_serve":
                from apsv.scaling.ray_serve import autoscaling_config

                autoscaling_config(own, 1, 1)
            else:
                settings.check(name, own)
        except ValueError as e:
            raise ValueError(f"fallback_config ({name}): {e}") from None


def _settings(ctx: ScalingContext) -> settings.Predictive:
    return settings.parse(settings.Predictive, ctx.config, "predictive")


def _skill_config(s: settings.Predictive, level: float) -> skill.SkillConfig:
    return skill.SkillConfig(
        halflife=s.skill_halflife,
        min_evidence=s.skill_min_evidence,
        full_at=s.skill_full_at,
        nominal=level,
        cov_zero=s.skill_coverage_floor,
    )


def _target(ctx: ScalingContext, s: settings.Predictive) -> float:
    return utilization_target(ctx, s.target_utilization, s.slo_fraction)


def proactive(
    ctx: ScalingContext, margin: float = 1.0, s: settings.Predictive | None = None
) -> tuple[int, str, float | None, float | None, float, int]:
    """Full proactive provisioning: (instances, reason, the median forecast's peak over the
    window and the upper quantile's as provisioned for, None without a forecast, the window's
    seconds, the instances the live load plus announced table transfers need - known, not
    forecast: 0 without a transfer). `s`: the context's settings where the caller holds them
    (None: read from `ctx.config`).

    - lead time = the measured instance start latency plus one decision interval: an instance
      asked for now serves from then on;
    - need = the peak of the chosen forecast quantile (`quantile`, default p90) from now to the
      end of the lead time plus `dwell_s` (5: a join moves only part of the sessions, the rest
      follow at later joins, so a burst wants its instances a few seconds early), at the target
      utilization of the per-instance capacity (learned from telemetry by the VPSM), its band
      bounded (`_forecast_peaks`);
    - utilization: `target_utilization`, but never above what the SLO allows from queueing alone
      (`slo_utilization`, within `slo_fraction` 0.8 of it: 0.85 busy for a 10 ms SLO);
    - live correction: never below what the live load and its backlog need (`_live_need`); a p99
      latency above the SLO while the instances are busier than the target adds one instance on
      top;
    - table transfers: peers that reset re-send their tables (`table_backlog`), known from the
      moment a session goes down, provisioned on top of the forecast, which models the organic
      load only (`_table_rate`).
    """
    s = _settings(ctx) if s is None else s
    q = s.quantile
    target = _target(ctx, s)
    lead = ctx.start_latency_s + s.interval_s
    dwell = s.dwell_s
    k = max(1, math.ceil((lead + dwell) / max(ctx.forecast_step_s, 1e-9)))
    median, predicted, forecast = _forecast_peaks(ctx, s, k, margin)
    table_rate = _table_rate(ctx, s)
    desired = max(instances_for(predicted + table_rate, ctx, target), _live_need(ctx, s, target))
    reason = f"{q} {predicted:.0f}/s within {lead + dwell:.1f}s, live {ctx.load:.0f}/s + backlog {ctx.inflight:.0f}"
    if table_rate > 0:
        reason += f", tables to re-send {ctx.table_backlog:.0f} ({table_rate:.0f}/s)"
    busy = ctx.cpu_utilization is None or ctx.cpu_utilization > target
    if _over_slo(ctx) and busy:
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


def _forecast_peaks(ctx: ScalingContext, s: settings.Predictive, k: int, margin: float) -> tuple[float, float, bool]:
    """(the median forecast's peak over the next `k` steps, quantile `q`'s as provisioned for,
    whether there is a `q` forecast). The band - `q`'s distance from the median - is scaled by
    `margin` (calibrated online, `apsv.scaling.skill`) and bounded by `max_forecast_ratio` (3)
    times the larger of the median forecast and the highest load of the last `recent_s` (60)
    steps (a storm a minute gone no longer licenses the band it left in the model's context)."""
    q = s.quantile
    forecast = (ctx.forecast or {}).get(q, ())
    ratio = s.max_forecast_ratio
    recent = ctx.load_history[-s.recent_s :]
    median = max((ctx.forecast or {}).get("p50", ())[:k], default=0.0)
    predicted = max(forecast[:k], default=0.0)
    if q != "p50" and predicted > median:
        predicted = median + margin * (predicted - median)
    if ratio > 0 and q != "p50":
        # An upper quantile far above both the median forecast and anything seen lately is the
        # model's band exploding after an outlier (a reset storm in its context), not a
        # prediction: bound it. A burst the median itself predicts is kept.
        predicted = min(predicted, ratio * max(median, max(recent, default=0.0), ctx.load))
    return median, predicted, bool(forecast)


def _live_need(ctx: ScalingContext, s: settings.Predictive, target: float) -> int:
    """The instances the live load plus draining the measured backlog (`inflight` past
    `backlog_tolerance_s` of service per instance) within `backlog_s` (2 s) need at the target -
    except that a live load between the target and `live_band` (half) of the way to full
    utilization is held through, not scaled for (noise; it would flap)."""
    backlog_s = s.backlog_s
    # the live load, plus the backlog drained within backlog_s (a backlog a few instances hold
    # drains only as fast as their sessions move away: size for the load that would clear it).
    # Up to `backlog_tolerance_s` of service per instance (50 ms, at most half the SLO) is the
    # queueing of random arrivals, not a backlog: it flickers, and sizing for it would flap.
    tolerance_s = s.backlog_tolerance_s
    if ctx.slo_ms is not None:
        tolerance_s = min(tolerance_s, ctx.slo_ms / 2000.0)
    normal = tolerance_s * ctx.capacity_per_instance * max(ctx.current_instances, 1)
    live = ctx.load + max(ctx.inflight - normal, 0.0) / max(backlog_s, 1e-9)
    # hysteresis on the live load: past the target but not past `live_band` of the way to full
    # utilization (half) is noise to hold through (scaling for it would flap); beyond, size for
    # it at the target. Scaling down never goes below what it needs at the target.
    live_need = instances_for(live, ctx, target)
    if instances_for(live, ctx, target + (1.0 - target) * s.live_band) <= ctx.current_instances:
        live_need = min(live_need, ctx.current_instances)
    return live_need


def _table_rate(ctx: ScalingContext, s: settings.Predictive) -> float:
    """The rate the announced table transfers (`table_backlog`) arrive at: a transfer arrives as
    fast as the receiver takes it, fastest at first, so it is sized as `table_backlog /
    table_transfer_s` (20 s: the backlog's time constant)."""
    return max(ctx.table_backlog, 0.0) / max(s.table_transfer_s, 1e-9)


def _over_slo(ctx: ScalingContext) -> bool:
    """Whether the measured p99 latency is over the SLO (False where either is unknown)."""
    return ctx.latency_p99_ms is not None and ctx.slo_ms is not None and ctx.latency_p99_ms > ctx.slo_ms


def _shadow_runs(
    ctx: ScalingContext, rules: Mapping[str, Mapping[str, Any]], shadows: Mapping[str, Any]
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each fallback rule one step further on its own path: (the instances it decides, its
    state). The context it sees is the live one with its own instances and what follows from
    them: the measured utilization spread over its own instances (the same work on more or
    fewer; without a measurement the rule takes the load over their capacity), no latency
    figure, no backlog."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for name, config in rules.items():
        n_own, st = shadows.get(name, (ctx.current_instances, {}))
        util = ctx.cpu_utilization
        if util is not None:
            util = min(1.0, util * max(ctx.current_instances, 1) / max(int(n_own), 1))
        own = replace(
            ctx,
            current_instances=int(n_own),
            cpu_utilization=util,
            latency_p99_ms=None,
            inflight=0.0,
            instance_ages=(),
            state=st,
            config=config,
        )
        d = get_policy(name)(own)
        out[name] = (d.instances, d.state)
    return out


def predictive(ctx: ScalingContext) -> Decision:
    """The fallback's recommendation moved toward full proactive provisioning as far as the
    forecast is trusted, with the scale-out and scale-in rules of the module docstring."""
    s = _settings(ctx)
    q = s.quantile
    level = int(q[1:]) / 100.0 if q[1:].isdigit() else 0.9
    sk_cfg = _skill_config(s, level)
    state: dict[str, Any] = dict(ctx.state)

    margin = float(state.get("skill", {}).get("margin", 1.0)) if s.margin is None else s.margin
    proactive_n, pro_reason, median_peak, band_peak, window_s, known_n = proactive(ctx, margin, s)
    # every fallback rule runs from its own state on the live context; the one that has served
    # the load best so far is the one the forecast is weighed against (their configs built once
    # per config, so that each rule's settings are parsed once too; the rules only read them)
    rules = settings.cached(("predictive.fallbacks",), ctx.config, lambda: fallbacks(ctx.config))
    fb_states = state.get("fallbacks", {})
    recs_fb = {n: get_policy(n)(replace(ctx, state=fb_states.get(n, {}), config=c)) for n, c in rules.items()}
    # Scored, each also runs on a path of its own (`shadows`: the instances it decided last, as
    # if they served at once, and its own state): on the live path a rule that waits out a delay
    # recommends the instances the forecast had already started, and would earn their credit.
    shadows = _shadow_runs(ctx, rules, state.get("shadows", {}))
    recommended = {n: n_own for n, (n_own, _) in shadows.items()}
    recommended[skill.PROACTIVE] = proactive_n
    sk = skill.observe(
        state.get("skill"),
        now=ctx.now,
        load=ctx.load,
        window_s=window_s,
        median_peak=median_peak,
        candidates=_candidates(ctx, s, recommended),
        band_peak=band_peak,
        tau=level,
        score_tau=s.skill_level,
        halflife=sk_cfg.halflife,
    )
    fallback_name = skill.better_fallback(sk, list(rules), state.get("fallback"))
    w = s.trust if s.trust is not None else skill.trust(sk, sk_cfg, fallback_name)
    fb, fb_name = _fallback_decision(ctx, s, w, fallback_name, recs_fb, recommended)
    trust_note = (
        f"forecast trusted at {w:.2f} (loss {skill.ratio(sk, fallback_name):.2f}x {fallback_name}'s, "
        f"covers {skill.coverage(sk):.0%}, median error {skill.forecast_ratio(sk):.2f}x persistence's)"
    )
    window = _scale_in_window(ctx, s)
    # the window holds the proactive recommendations: the fallback's is stabilized by the
    # fallback itself (held again, a rule that waits 600 s before each step down, and keeps
    # its count meanwhile, would never be seen to step down)
    recs = [(float(t), int(n)) for t, n in state.get("recs", []) if ctx.now - float(t) < window - 1e-9]
    recs.append((ctx.now, proactive_n))
    since = float(state.get("since", ctx.now))  # the first decision this state has seen
    new_state: dict[str, Any] = {
        "skill": sk,
        "fallbacks": {n: d.state for n, d in recs_fb.items()},
        "shadows": {n: [n_own, st] for n, (n_own, st) in shadows.items()},
        "fallback": fallback_name,
        "trust": w,
        "since": since,
        "recs": recs,
    }
    if w <= 0.0 and known_n <= fb.instances:
        # no skill shown (and no table transfer announced): exactly the fallback rule
        return Decision(fb.instances, new_state, f"{trust_note}: {fb_name}: {fb.reason}", w)

    blend = _Blend(fb.instances, w, skill.guard(sk, fallback_name), known_n)
    blended = blend(ctx, proactive_n)
    reason = f"{trust_note}: {pro_reason}; {fb_name} {fb.instances}"
    tolerance = s.scale_tolerance
    if blended > ctx.current_instances:
        if _hold_scale_out(ctx, _target(ctx, s), blended, proactive_n, fb.instances, w, tolerance):
            return Decision(ctx.current_instances, new_state, reason + " (up: within tolerance)", w)
        return Decision(blended, new_state, reason, w)
    if blended == ctx.current_instances:
        return Decision(blended, new_state, reason, w)
    # scale-in: the blend with the highest proactive recommendation of the window (a window not
    # yet seen in full holds everything: no scale-in on a fresh start)
    stable = blend(ctx, max(n for _, n in recs)) if ctx.now - since >= window - 1e-9 else ctx.current_instances
    n = _scale_in(ctx, stable, tolerance, s.min_lifetime_s)
    return Decision(n, new_state, reason + (" (down: held by the window)" if n > blended else ""), w)


def _fallback_decision(
    ctx: ScalingContext,
    s: settings.Predictive,
    trust: float,
    chosen: str,
    decisions: Mapping[str, Decision],
    own: Mapping[str, int],
) -> tuple[Decision, str]:
    """The fallback's recommendation the forecast is weighed against, and whose it is: the chosen
    rule's, each rule held to its own path (`_own_path_hold`); while the forecast is trusted
    under `hedge_below` (off by default), the most that any of the fallback rules asks (the
    module's docstring says why)."""
    if trust >= s.hedge_below:  # (the default: only the chosen rule is held, once per decision)
        return _own_path_hold(ctx, s, decisions[chosen], own[chosen]), chosen
    held = {n: _own_path_hold(ctx, s, d, own[n]) for n, d in decisions.items()}
    name = max(held, key=lambda n: (held[n].instances, n == chosen))
    if held[name].instances > held[chosen].instances:
        return held[name], f"{name} (the most of the fallbacks at a trust under {s.hedge_below:g})"
    return held[chosen], chosen


def _own_path_hold(ctx: ScalingContext, s: settings.Predictive, fb: Decision, own_n: int) -> Decision:
    """The fallback's live recommendation, held down to what its own path runs: where it asks for
    no more than the live instances, no more than its shadow (`own_n`) runs - instances another
    rule started (the other fallback, the forecast) are not its to keep through its own downscale
    delay, which protects its decisions from flapping, not theirs - but never below what the live
    load and its backlog need (`_live_need`), nor while the p99 is over the SLO."""
    n = fb.instances
    if n > ctx.current_instances or own_n >= n or _over_slo(ctx):
        return fb
    held = max(own_n, min(_live_need(ctx, s, _target(ctx, s)), n))
    return replace(fb, instances=held, reason=f"{fb.reason}; its own path runs {own_n}") if held < n else fb


def _candidates(
    ctx: ScalingContext, s: settings.Predictive, instances: Mapping[str, int]
) -> dict[str, tuple[float, float]]:
    """What each recommendation (by name: instances) provisions for, in load: (instances x what
    one serves at the target, instances x what one serves before queueing breaks the SLO)."""
    per = ctx.capacity_per_instance * _target(ctx, s) / max(ctx.load_imbalance, 1.0)
    # (a peak over capacity for one interval queues what the SLO's latency drains: within it)
    queue_allowance = (ctx.slo_ms or 0.0) / 1000.0 / max(s.interval_s, 1e-9)
    full = ctx.capacity_per_instance * (slo_utilization(ctx, 1.0) + queue_allowance) / max(ctx.load_imbalance, 1.0)
    return {name: (n * per, n * full) for name, n in instances.items()}


def _scale_in_window(ctx: ScalingContext, s: settings.Predictive) -> float:
    """The scale-in window over the proactive recommendations: `stabilization_s` (HPA's scale-down
    stabilization), whatever the trust - a forecast trusted at half still moves the count by
    half its peaks, and a shorter window undoes each of those scale-outs as soon as the peak has
    passed; never shorter than the lead time (no scale-in the next start would undo) nor than
    `hold_decisions` decisions."""
    interval = s.interval_s
    return max(s.stabilization_s, ctx.start_latency_s + interval, s.hold_decisions * interval)


@dataclass(frozen=True)
class _Blend:
    """The fallback's recommendation moved toward a proactive one by the trust: below the
    fallback only by trust x `guard` (as far as the forecast has not run short more often than
    it), and never below the instances the announced table transfers need (known, not forecast:
    provisioned whatever the trust)."""

    fallback_n: int
    trust: float
    guard: float
    known_n: int

    def __call__(self, ctx: ScalingContext, pro: int) -> int:
        weight = self.trust if pro >= self.fallback_n else self.trust * self.guard
        return clamp(max(math.ceil(self.fallback_n + weight * (pro - self.fallback_n) - 1e-9), self.known_n), ctx)


def _hold_scale_out(
    ctx: ScalingContext, target: float, blended: int, proactive_n: int, fallback_n: int, trust: float, tolerance: float
) -> bool:
    """Whether a scale-out to `blended` is noise to hold through: nothing live says the instances
    are short (p99 within the SLO, utilization within the target), and the ask is for one more or
    within the tolerance (HPA's 10 %), or only the fallback's headroom asks (the forecast does
    not, its weight moved) - not worth a start and the moves it brings."""
    busy = ctx.cpu_utilization is not None and ctx.cpu_utilization > target
    small = blended <= ctx.current_instances + max(1.0, tolerance * ctx.current_instances)
    # (a scale-out the fallback itself asks for is held only where the forecast is trusted
    # more than half: below that, the fallback's judgement of the live load prevails)
    fallback_up = fallback_n > ctx.current_instances and trust < 0.5
    return not (_over_slo(ctx) or busy or fallback_up) and (small or proactive_n <= ctx.current_instances)


def _scale_in(ctx: ScalingContext, stable: int, tolerance: float, min_life: float) -> int:
    """The instances a scale-in toward `stable` leaves: none go where `stable` is within the
    tolerance of the current count, and only instances past their minimum lifetime
    (`min_lifetime_s`) go."""
    if stable > ctx.current_instances * (1.0 - tolerance):
        # within the tolerance of the current count (HPA's 10 %): not worth a drain's moves
        stable = ctx.current_instances
    removable = sum(1 for age in ctx.instance_ages if age >= min_life) if ctx.instance_ages else ctx.current_instances
    floor = ctx.current_instances - removable
    return clamp(min(max(stable, floor), ctx.current_instances), ctx)

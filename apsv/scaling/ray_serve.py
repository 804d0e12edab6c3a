"""Ray Serve's own autoscaling policy as a baseline (`ray_serve`), run on APSV's context.

Ray's `replica_queue_length_autoscaling_policy` (the default of every Serve deployment) decides
from the ongoing requests of a deployment's replicas; this adapter builds Ray's
`AutoscalingContext` from a `ScalingContext` and calls the installed function, then Ray's own
scaling-factor and delay steps - the ones Serve's controller wraps every policy in - with the
caller's clock (Ray's wrapper reads `time.time()`, which a simulator does not run on).

The unit. A Serve replica has `max_ongoing_requests` slots (Ray's default 5) and the policy aims
at `target_ongoing_requests` of them busy (default 2). An instance is taken as such a replica
whose capacity (`capacity_per_instance` messages/s) fills its slots, so the ongoing requests of
the protocol are

    ongoing = max_ongoing_requests x (load + inflight / interval_s) / capacity_per_instance

averaged over Ray's `look_back_period_s` (default 30 s) as Serve's controller averages its
replicas' metrics: queued frames count as the rate that would drain them in one interval. With
Ray's defaults the policy then aims at 2/5 = 40 % of capacity, scales up after 30 s of wanting
to and down after 600 s. Configuration: any `AutoscalingConfig` field (`target_ongoing_requests`,
`upscale_delay_s`, `downscale_delay_s`, `look_back_period_s`, `upscaling_factor`, ...) plus
`max_ongoing_requests` and `interval_s` (the caller's step, default 1 s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from apsv.scaling import settings
from apsv.scaling.policy import Decision, ScalingContext, clamp

DEFAULT_MAX_ONGOING_REQUESTS = 5  # Ray Serve's default for a deployment
# this adapter's own fields, and what APSV's callers add to every policy's config
_CONTEXT_FIELDS = ("max_ongoing_requests", "interval_s", "service_ms", "fixed_latency_ms")


def autoscaling_config(config: Mapping[str, Any], min_instances: int, max_instances: int) -> Any:
    """Ray's `AutoscalingConfig` from a policy config (less this adapter's own fields); a field
    Ray does not take, or a value it refuses, is a ValueError naming it."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    slots = config.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
    if not isinstance(slots, int | float) or slots <= 0:
        raise ValueError(f"max_ongoing_requests: expected a positive number, got {slots!r}")
    fields = {k: v for k, v in config.items() if k not in _CONTEXT_FIELDS}
    unknown = sorted(set(fields) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"not a field of Ray Serve's AutoscalingConfig: {', '.join(unknown)}")
    try:
        return AutoscalingConfig(min_replicas=min_instances, max_replicas=max(max_instances, 1), **fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None


def ongoing_requests(ctx: ScalingContext, slots: float, interval_s: float, look_back_s: float) -> float:
    """The protocol's ongoing requests in Serve's unit, averaged over the look-back window."""
    steps = max(1, math.ceil(look_back_s / max(interval_s, 1e-9)))
    rates = [*ctx.load_history[-(steps - 1) :], ctx.load] if steps > 1 else [ctx.load]
    rate = sum(rates) / len(rates) + ctx.inflight / max(interval_s, 1e-9)
    return slots * rate / max(ctx.capacity_per_instance, 1e-9)


def ray_serve(ctx: ScalingContext) -> Decision:
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import (
        # Serve's controller runs every policy inside these two steps (autoscaling_state.py);
        # they take the clock as an argument where its wrapper does not
        _apply_delay_logic,
        _apply_scaling_factors,
        replica_queue_length_autoscaling_policy,
    )
    from ray.serve.config import AutoscalingContext

    # Ray's pydantic config, validated once per config object and bounds (the policy reads it)
    lo, hi = ctx.min_instances, ctx.max_instances
    config = settings.cached(
        ("ray_serve.autoscaling", lo, hi), ctx.config, lambda: autoscaling_config(ctx.config, lo, hi)
    )
    slots = float(ctx.config.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS))
    interval = float(ctx.config.get("interval_s", 1.0))
    ongoing = ongoing_requests(ctx, slots, interval, config.look_back_period_s)
    state: dict[str, Any] = dict(ctx.state)
    current = ctx.current_instances
    serve_ctx = AutoscalingContext(
        deployment_id=DeploymentID(name=ctx.protocol, app_name="apsv"),
        deployment_name=ctx.protocol,
        app_name="apsv",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=[],
        total_num_requests=ongoing,
        total_queued_requests=None,
        aggregated_metrics=None,
        raw_metrics=None,
        capacity_adjusted_min_replicas=ctx.min_instances,
        capacity_adjusted_max_replicas=ctx.max_instances,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=ctx.now,
        config=config,
    )
    desired, _ = replica_queue_length_autoscaling_policy(serve_ctx)
    if current == 0:  # Ray's cold start: no factors, no delay
        return Decision(clamp(math.ceil(desired), ctx), state, f"{ongoing:.1f} ongoing requests, cold start")
    scaled = _apply_scaling_factors(desired, current, config)
    decided, state = _apply_delay_logic(max(0, scaled), current, config, state, _now=ctx.now)
    n = clamp(int(decided), ctx)
    per = config.get_target_ongoing_requests()
    return Decision(n, state, f"{ongoing:.1f} ongoing requests against {per:g} per instance")

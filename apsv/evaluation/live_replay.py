"""One policy, live: a trace replayed through a fresh deployment scaled by that policy, and what
the system itself measured of it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from apsv.evaluation.live_calibration import Calibration
from apsv.evaluation.live_sender import Sender, connect_sender
from apsv.evaluation.live_testbed import FloatArray, LiveConfig, deployment_suffix, echo_plan, rate_scale, session_keys
from apsv.scaling.latency import merge, quantile
from apsv.scaling.simulator import Forecasts, SimConfig, initial_instances


@dataclass
class LiveResult:
    policy: str
    slo_violation_s: float
    instance_s: float
    scale_actions: int
    lost: int
    late: int
    messages: int
    p99_ms: float
    session_moves: int
    timeline: dict[str, FloatArray] = field(repr=False)
    latency_hist: npt.NDArray[np.int64] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "slo_violation_s": round(self.slo_violation_s, 3),
            "instance_s": round(self.instance_s, 1),
            "scale_actions": self.scale_actions,
            "lost": self.lost,
            "late": self.late,
            "messages": self.messages,
            "p99_ms": round(self.p99_ms, 3),
            "session_moves": self.session_moves,
            "mean_instances": round(float(self.timeline["instances"].mean()), 3) if self.timeline["t"].size else 0.0,
        }


@dataclass
class _Replayed:
    """What a replay read from the system (wall units), before it is turned into trace units."""

    rows: list[dict[str, Any]]  # the VPSM's timeline from the replay's origin
    end: float  # wall time the trace's last step ends
    steps: int
    instance_wall_s: float
    scale_actions: int
    session_moves: int
    sent: int
    outputs: int


def run_policy(
    test: FloatArray,
    policy: str,
    cfg: SimConfig,
    live: LiveConfig,
    cal: Calibration,
    *,
    policy_config: Mapping[str, Any] | None = None,
    forecasts: Forecasts | None = None,
    progress: Callable[[int, int], None] | None = None,
    table_backlog: FloatArray | None = None,
) -> LiveResult:
    """Replay `test` (trace messages/s per step) through the live system under one policy.
    `table_backlog`: the trace's tables to re-send per step (trace messages), told to the VPSM
    as the simulator is told them (the echo stacks have none of their own)."""
    import ray

    from apsv.runtime.cluster import deploy

    scale = rate_scale(test, live)  # live messages per trace message
    capacity_trace = cal.capacity / (scale * live.speed)
    pcfg = dict(policy_config or {})
    pcfg.setdefault("interval_s", cfg.interval_s)
    plan = echo_plan(policy, pcfg, cfg, live, capacity_trace)
    dep = deploy([plan], interval_s=cfg.interval_s / live.speed, run_loop=False, suffix=deployment_suffix())
    try:
        # warm start: the instances the policy wants for the trace's first step, as the simulator does
        sim_cfg = replace(cfg, capacity=capacity_trace, start_latency_s=cal.start_latency_s * live.speed)
        n0 = initial_instances(
            test,
            policy,
            sim_cfg,
            policy_config=pcfg,
            forecasts=forecasts,
            sessions=len(session_keys(live)),
            table_backlog=float(table_backlog[0]) if table_backlog is not None and table_backlog.size else 0.0,
        )
        ray.get(dep.vpsm.scale_to.remote("echo", n0))
        sender = connect_sender(dep.multiplexer, cfg, live, cal.delay_ms)
        replayed = _replay(dep, sender, test, live, scale, forecasts, table_backlog, progress)
    finally:
        dep.stop()
    return _live_result(policy, replayed, cfg, live)


def _replay(
    dep: Any,
    sender: Sender,
    test: FloatArray,
    live: LiveConfig,
    scale: float,
    forecasts: Forecasts | None,
    table_backlog: FloatArray | None,
    progress: Callable[[int, int], None] | None,
) -> _Replayed:
    """Start the VPSM's loop on the trace's clock, send every step's messages, stop the loop and
    read what the system counted over the replay."""
    import ray

    from apsv.scaling.clock import ReplayClock

    actions0 = ray.get(dep.vpsm.scale_actions.remote()).get("echo", 0)
    moves0 = int(ray.get(dep.multiplexer.stats.remote())["moves"])
    origin = time.time() + 0.2
    clock = ReplayClock(
        origin,
        live.speed,
        scale,
        forecasts=forecasts,
        future=tuple(float(x) for x in test.tolist()),
        tables=() if table_backlog is None else tuple(float(x) for x in table_backlog[: test.size].tolist()),
    )
    ray.get(dep.vpsm.set_clock.remote("echo", clock))
    ray.get(dep.vpsm.start.remote(True))
    steps = int(test.size)
    sender.run(
        (test * scale).tolist(),
        origin,
        live.speed,
        on_step=(lambda k: progress(k + 1, steps)) if progress is not None else None,
    )
    end = origin + steps / live.speed
    sender.finish()
    outputs = sender.outputs
    ray.get(dep.vpsm.stop_loop.remote())
    rows = ray.get(dep.vpsm.get_timeline.remote("echo", origin))
    inst_wall = ray.get(dep.vpsm.instance_seconds.remote("echo", origin, end))
    actions = ray.get(dep.vpsm.scale_actions.remote()).get("echo", 0) - actions0
    moves = int(ray.get(dep.multiplexer.stats.remote())["moves"]) - moves0
    sender.close()
    return _Replayed(rows, end, steps, inst_wall, actions, moves, sender.sent, outputs)


def _live_result(policy: str, replayed: _Replayed, cfg: SimConfig, live: LiveConfig) -> LiveResult:
    """SLO-violation seconds from the VPSM's per-step p99 over every instance's messages,
    instance-seconds from its instance lifetimes, lost messages as sent minus echoed back."""
    steps, end = replayed.steps, replayed.end
    rows = [r for r in replayed.rows if r["ts"] <= end + 1.0 / live.speed]
    t = np.array([r["t"] for r in rows], dtype=np.float64)
    dur = np.diff(np.append(t, steps if t.size == 0 else max(float(t[-1]) + cfg.interval_s, steps)))
    dur = np.clip(dur, 0.0, None)
    p99 = np.array([r["p99_ms"] if r["p99_ms"] is not None else 0.0 for r in rows], dtype=np.float64)
    inside = (t >= 0) & (t < steps)
    hist = merge(rows)
    return LiveResult(
        policy=policy,
        slo_violation_s=float(dur[inside & (p99 > cfg.slo_ms)].sum()),
        instance_s=float(replayed.instance_wall_s * live.speed),
        scale_actions=int(replayed.scale_actions),
        lost=int(replayed.sent - replayed.outputs),
        late=int(sum(int(r["late"]) for r in rows)),
        messages=int(replayed.sent),
        p99_ms=quantile(hist, 0.99),
        session_moves=replayed.session_moves,
        timeline={
            "t": t,
            # billed instances (starting and draining included), as the simulator's timeline counts
            "instances": np.array([r.get("billed", r["instances"]) for r in rows], dtype=np.float64),
            "load": np.array([r["load"] for r in rows], dtype=np.float64),
            "p99_ms": p99,
        },
        latency_hist=hist,
    )

"""Live evaluation: a load trace replayed through the real system, policy by policy.

What the simulator models, this runs: a local Ray cluster, the multiplexer, the VPSM running the
policy under test (the same function the simulator calls), and process-backend stack instances.
The stack is the echo stack with a per-message service time (`delay_ms`), so an instance serves
a known number of messages per second however few cores the machine has - on two cores a dozen
CPU-bound instances could not run side by side, and what is compared here is scaling, not a
protocol's decoding speed (benchmarks measure that).

Units. A trace is messages per trace second. It is replayed `speed` times faster than recorded,
and scaled so its peak is `peak_rate` live messages per wall second. The VPSM is given a
`ReplayClock` that converts back: its policy sees trace seconds, trace rates, start latencies and
p99 latencies in trace time - the numbers the simulator gives it - so one policy configuration
means the same in both.

Per policy:
1. deploy a multiplexer and a VPSM (loop stopped) and warm-start the instances the policy wants
   for the trace's first step (as the simulator does); open the sessions: `vrouters` virtual
   routers of `sessions_per_vrouter` sessions with Zipf-skewed shares of the load (the
   simulator's weights, same seed);
2. start the VPSM loop on the trace's clock and send each trace second's messages spread evenly
   over it, each stamped with its scheduled arrival time (a sender held back by backpressure
   makes its messages late, as it would a real agent's);
3. measure from the system itself: SLO-violation seconds from the VPSM's per-step p99 latency
   over every message of every instance, instance-seconds from the VPSM's instance lifetimes
   (billed from the moment it asked for one), scale actions from the VPSM, lost messages as
   sent minus echoed back.

Calibration first: one instance's real service rate and the unloaded latency floor and start
latency are measured, and the simulator is run with those, so `compare` puts the two side by side.

The parts: `live_testbed` (the configuration, sessions and plan), `live_sender` (the agents and
their load), `live_calibration` (step 0), `live_replay` (steps 1-3 for one policy). This module
runs them policy by policy beside the simulator and reports, plots and compares the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from apsv.evaluation.live_calibration import Calibration, calibrate
from apsv.evaluation.live_replay import LiveResult, run_policy
from apsv.evaluation.live_sender import Sender
from apsv.evaluation.live_testbed import FloatArray, LiveConfig, rate_scale
from apsv.evaluation.plots import file_stem, latency_cdf, pyplot, save
from apsv.scaling.latency import LATENCY_BINS_MS
from apsv.scaling.simulator import Forecasts, SimConfig, SimResult, simulate

# imported from here by the CLI and the benchmarks; each is defined in one of the modules above
__all__ = [
    "Calibration",
    "FloatArray",
    "LiveConfig",
    "LiveResult",
    "Sender",
    "agreement",
    "calibrate",
    "evaluate_live",
    "live_json",
    "plot_live",
    "run_policy",
]


def evaluate_live(
    test: FloatArray,
    cfg: SimConfig,
    policies: Sequence[str],
    live: LiveConfig,
    *,
    configs: Mapping[str, Mapping[str, Any]],
    forecasts: Forecasts | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    table_backlog: FloatArray | None = None,
) -> dict[str, Any]:
    """Calibrate, run each policy live, and run the simulator with the measured parameters on the
    same steps. Returns {'calibration', 'sim_config', 'live': {p: LiveResult}, 'sim': {p: SimResult}}.
    `table_backlog`: the trace's tables to re-send per step, aligned with `test` (reset storms)."""
    if live.max_steps is not None:
        test = test[: live.max_steps]
    tables = None if table_backlog is None else np.asarray(table_backlog, dtype=np.float64)[: test.size]
    cal = calibrate(cfg, live, test)
    scale = rate_scale(test, live)
    sim_cfg = _sim_config(cfg, live, cal)
    results: dict[str, LiveResult] = {}
    sims: dict[str, SimResult] = {}
    sim_fc = (
        Forecasts(forecasts.every, {q: v * scale for q, v in forecasts.values.items()})
        if forecasts is not None
        else None
    )
    used: dict[str, dict[str, Any]] = {}  # each policy's configuration as run (live units added)
    for p in policies:
        pc = _policy_config(p, configs, live, cal, sim_cfg)
        used[p] = dict(pc)
        sim_pc = {k: (v * scale if k == "peak_load" else v) for k, v in pc.items()}
        sims[p] = simulate(
            test * scale,
            p,
            sim_cfg,
            policy_config=sim_pc,
            forecasts=sim_fc,
            table_backlog=None if tables is None else tables * scale,
        )
        cb = (lambda k, n, _p=p: progress(_p, k, n)) if progress is not None else None
        results[p] = run_policy(
            test, p, cfg, live, cal, policy_config=pc, forecasts=forecasts, progress=cb, table_backlog=tables
        )
    return {
        "calibration": cal,
        "sim_config": sim_cfg,
        "live": results,
        "sim": sims,
        "test": test,
        "configs": used,
    }


def _sim_config(cfg: SimConfig, live: LiveConfig, cal: Calibration) -> SimConfig:
    """The simulator's configuration for the live system as calibrated.

    The simulator runs in live units - the trace times `rate_scale`, an instance's live rate -
    so a message's service time is the live one: the queueing of random arrivals grows with
    it, and a live message stands for 1/rate_scale of the trace's. (The policies read ratios:
    their decisions do not change with the unit.)"""
    return replace(
        cfg,
        capacity=cal.capacity / live.speed,
        start_latency_s=cal.start_latency_s * live.speed,
        base_latency_ms=cal.base_latency_ms * live.speed,
        batch_delay_ms=1000.0 * live.batch_delay_s,
        agent_window_ms=1000.0 * live.batch_delay_s * live.max_inflight,
        # the live system never drops: what an instance cannot take waits at the agents
        # (backpressure), so the simulated queues hold a minute rather than losing past 2 s
        max_queue_s=max(cfg.max_queue_s, 60.0),
        session_move_s=cal.move_s * live.speed,
        vrouters=live.vrouters,
        sessions_per_vrouter=live.sessions_per_vrouter,
        # one host: every instance starts beside the same message path
        nodes=1,
        instances_per_node=cfg.max_instances,
        node_cpus=cal.node_cpus,
        start_stall_s=min(cal.start_stall_s * live.speed, cfg.step_s),
    )


def _policy_config(
    policy: str, configs: Mapping[str, Mapping[str, Any]], live: LiveConfig, cal: Calibration, sim_cfg: SimConfig
) -> dict[str, Any]:
    """`policy`'s configuration with the live system's measured figures added (trace units)."""
    pc = dict(configs.get(policy, {}))
    # one live message's service time in trace ms: the queueing the policies allow for is
    # the live instances', whichever unit (trace or live messages) the capacity is counted in
    pc.setdefault("service_ms", 1000.0 * live.speed / cal.capacity)
    if "fixed_latency_ms" in pc or policy in ("predictive", "oracle"):
        # the latency every message has here whatever the load (trace ms): the measured floor
        # and the agents' batching wait - the SLO's budget for queueing is what they leave.
        # Measured, so it replaces the offline evaluation's figure for its modelled system.
        pc["fixed_latency_ms"] = sim_cfg.base_latency_ms + sim_cfg.batch_delay_ms
    return pc


def agreement(live: LiveResult, sim: SimResult) -> dict[str, float]:
    """Relative differences, |live - sim| / max(live, sim) (0 when both are 0)."""

    def rel(a: float, b: float) -> float:
        top = max(abs(a), abs(b))
        return round(abs(a - b) / top, 4) if top > 0 else 0.0

    return {
        "slo_violation_s": rel(live.slo_violation_s, sim.slo_violation_s),
        "instance_s": rel(live.instance_s, sim.instance_s),
    }


def live_json(trace: str, res: dict[str, Any]) -> dict[str, Any]:
    """The `apsv evaluate --mode live --json` object: `policies` (live, the simulator's keys), `sim`
    (the simulator on the same steps with the measured parameters), `agreement` per policy."""
    from apsv.evaluation.compare import claims

    live: dict[str, LiveResult] = res["live"]
    sims: dict[str, SimResult] = res["sim"]
    out: dict[str, Any] = {
        "trace": trace,
        "mode": "live",
        "steps": int(res["test"].size),
        "calibration": res["calibration"].to_json(),
        "sim_config": {k: v for k, v in res["sim_config"].__dict__.items()},
        "policies": {p: r.to_json() for p, r in live.items()},
        "sim": {p: r.to_json() for p, r in sims.items()},
        "agreement": {p: agreement(live[p], sims[p]) for p in live},
        "policy_configs": res.get("configs", {}),
    }
    out["claims"] = claims(out)
    out["sim_claims"] = claims({"policies": out["sim"]})
    return out


def plot_live(trace: str, res: dict[str, Any], directory: Any) -> list[Any]:
    """Instances over time per policy, live against simulated; the live latency CDF."""
    plt = pyplot()
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = file_stem(trace)
    test: FloatArray = res["test"]
    live: dict[str, LiveResult] = res["live"]
    sims: dict[str, SimResult] = res["sim"]
    paths = []
    fig, ax = plt.subplots(figsize=(11, 4))
    ax2 = ax.twinx()
    ax.plot(test, color="black", lw=0.6, label="load")
    for i, (p, r) in enumerate(live.items()):
        color = f"C{i}"
        ax2.step(r.timeline["t"], r.timeline["instances"], where="post", color=color, lw=1.2, label=f"{p} live")
        ax2.step(
            np.arange(test.size),
            sims[p].timeline["instances"],
            where="post",
            color=color,
            lw=0.8,
            ls="--",
            label=f"{p} sim",
        )
    ax.set_xlabel("trace step (s)")
    ax.set_ylabel("messages/s (trace)")
    ax2.set_ylabel("instances")
    ax2.legend(loc="upper left", fontsize=7, ncol=2)
    ax.set_title(f"{trace}: instances per policy, live (solid) and simulated (dashed)", fontsize=9)
    paths.append(save(fig, out_dir / f"{name}-live-instances.png"))

    mids = np.sqrt(LATENCY_BINS_MS[:-1] * LATENCY_BINS_MS[1:])
    paths.append(
        latency_cdf(
            {
                p: (mids, np.cumsum(r.latency_hist) / r.latency_hist.sum())
                for p, r in live.items()
                if r.latency_hist.sum()
            },
            float(res["sim_config"].slo_ms),
            "message latency, live (trace ms)",
            "fraction of messages",
            out_dir / f"{name}-live-latency-cdf.png",
        )
    )
    return paths

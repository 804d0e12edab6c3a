"""Scaling policies on hand-made contexts, the simulator, traces and `apsv evaluate`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apsv.scaling import skill
from apsv.scaling.placement import InstanceLoad, rebalance_moves
from apsv.scaling.policy import POLICIES, Decision, ScalingContext, clamp, get_policy, slo_utilization, threshold
from apsv.scaling.predictive import predictive as skill_weighted
from apsv.scaling.predictive import proactive
from apsv.scaling.simulator import Forecasts, SimConfig, simulate
from apsv.scaling.traces import bfd_population, bgp_churn

CAP = 1000.0


def ctx(**kw: Any) -> ScalingContext:
    base: dict[str, Any] = {
        "protocol": "bgp",
        "now": 100.0,
        "current_instances": 2,
        "load": 500.0,
        "inflight": 0.0,
        "sessions": 10,
        "capacity_per_instance": CAP,
        "max_instances": 50,
        "start_latency_s": 3.0,
        "instance_ages": (100.0, 100.0),
    }
    base.update(kw)
    return ScalingContext(**base)


def flat_forecast(
    value: float, n: int = 40, burst_at: int | None = None, burst: float = 0.0
) -> dict[str, tuple[float, ...]]:
    v = [value] * n
    if burst_at is not None:
        v[burst_at] = burst
    return {"p50": tuple(v), "p90": tuple(x * 1.1 for x in v)}


def predictive(c: ScalingContext) -> Decision:
    """The predictive policy with its trust pinned at 1: the proactive rule alone."""
    return skill_weighted(replace(c, config={"trust": 1.0, **c.config}))


def sized(c: ScalingContext) -> int:
    """What the proactive rule asks for, within bounds (before the churn guards)."""
    return clamp(proactive(c)[0], c)


def test_predictive_scales_up_ahead_of_a_burst_by_the_lead_time() -> None:
    cfg = {"quantile": "p90", "target_utilization": 0.8, "dwell_s": 0.0, "interval_s": 1.0}
    # lead = start latency 3 s + one interval: a burst 4 s ahead is provisioned now ...
    d = predictive(ctx(forecast=flat_forecast(500, burst_at=3, burst=8000), config=cfg))
    assert d.instances == math.ceil(8000 * 1.1 / (CAP * 0.8))
    # ... one 10 s ahead is not yet: instances asked for now would idle until then
    d = predictive(ctx(forecast=flat_forecast(500, burst_at=10, burst=8000), config=cfg))
    assert d.instances == 2


def test_predictive_never_below_the_live_load_and_corrects_late() -> None:
    d = predictive(ctx(load=9000.0, forecast=flat_forecast(100), config={"target_utilization": 0.8}))
    assert d.instances >= math.ceil(9000 / (CAP * 0.8))
    # over the SLO with busy instances: one more than now, even though the forecast is low
    d = predictive(ctx(current_instances=3, load=1000.0, latency_p99_ms=300.0, slo_ms=100.0, cpu_utilization=0.95))
    assert d.instances == 4
    # over the SLO while idle (a backlog draining): no new instance
    d = predictive(ctx(current_instances=3, load=100.0, latency_p99_ms=300.0, slo_ms=100.0, cpu_utilization=0.2))
    assert d.instances == 3


def test_predictive_downscale_waits_and_respects_min_lifetime() -> None:
    cfg = {"stabilization_s": 20.0, "min_lifetime_s": 30.0}
    c = ctx(current_instances=6, load=100.0, forecast=flat_forecast(100), config=cfg, instance_ages=(500.0,) * 6)
    d = predictive(replace(c, state={"recs": [[95.0, 6]], "since": 95.0}))
    assert d.instances == 6  # the window still holds a recommendation of 6
    d = predictive(replace(c, now=110.0, state=d.state))
    assert d.instances == 6  # still within the window
    d = predictive(replace(c, now=116.0, state=d.state))
    assert d.instances == 1
    young = replace(c, now=121.0, state=d.state, instance_ages=(500.0, 500.0, 5, 5, 5, 5))
    assert predictive(young).instances == 4  # the four young instances stay
    # a drop within the tolerance (10 % of the count) is not worth a drain
    near = ctx(
        current_instances=20,
        load=13_800.0,
        forecast=flat_forecast(13_800),
        config={"stabilization_s": 0.0},
        state={"since": 0.0},
    )
    assert predictive(near).instances == 20


def test_predictive_holds_a_forecast_peak_for_the_whole_window_at_any_trust() -> None:
    # Trusted at half, the forecast moves the count half way to its peak; the scale-in window is
    # the whole stabilization whatever the trust, so the scale-out is not undone as soon as the
    # peak has passed (a window of trust x 60 s released it after 30 s: a scale-out and a
    # scale-in per forecast peak)
    cfg = {"trust": 0.5, "stabilization_s": 60.0, "min_lifetime_s": 0.0, "fallback": "threshold"}
    c = ctx(current_instances=2, load=500.0, forecast=flat_forecast(500), config=cfg, instance_ages=(500.0,) * 2)
    d = skill_weighted(replace(c, forecast=flat_forecast(500, burst_at=1, burst=8000), state={"since": 0.0}))
    peak = d.instances
    assert peak > 2
    for now in (110.0, 130.0, 159.0):
        d = skill_weighted(replace(c, now=now, current_instances=peak, instance_ages=(500.0,) * peak, state=d.state))
        assert d.instances == peak, now
    d = skill_weighted(replace(c, now=161.0, current_instances=peak, instance_ages=(500.0,) * peak, state=d.state))
    assert d.instances < peak


def test_predictive_bounds_an_exploding_forecast() -> None:
    band = {"p50": (500.0,) * 40, "p90": (90_000.0,) * 40}
    c = ctx(
        current_instances=1, load=500.0, load_history=(500.0,) * 100, forecast=band, config={"target_utilization": 1.0}
    )
    assert sized(c) == 2  # 3 x 500/s, not 90,000/s
    burst = {"p50": (500.0,) * 3 + (5000.0,) * 37, "p90": (500.0,) * 3 + (5500.0,) * 37}
    c = ctx(
        current_instances=1, load=500.0, load_history=(500.0,) * 100, forecast=burst, config={"target_utilization": 1.0}
    )
    assert predictive(c).instances == 6  # a burst the median predicts is provisioned


def test_predictive_sizes_for_the_live_load_plus_draining_the_backlog() -> None:
    cfg = {"target_utilization": 0.8, "backlog_s": 2.0}
    # 1,000/s live and 4,000 queued: sized for 1,000 + 4,000 / 2 s = 3,000/s, not +1 per step
    d = predictive(ctx(current_instances=2, load=1000.0, inflight=4000.0, forecast=flat_forecast(1000), config=cfg))
    assert d.instances == math.ceil(3000 / (CAP * 0.8)) and "backlog 4000" in d.reason
    # a shorter drain horizon asks for more
    d = predictive(ctx(current_instances=2, load=1000.0, inflight=4000.0, config={**cfg, "backlog_s": 1.0}))
    assert d.instances == math.ceil(5000 / (CAP * 0.8))
    # a few frames in flight (random arrivals at a busy instance) change nothing
    d = predictive(ctx(current_instances=2, load=1000.0, inflight=20.0, forecast=flat_forecast(1000), config=cfg))
    assert d.instances == 2
    # never below the live load's need, and bounds and budget hold with a huge backlog
    d = predictive(ctx(current_instances=2, load=1e6, inflight=0.0, config=cfg, max_instances=20))
    assert d.instances == 20
    d = predictive(ctx(current_instances=2, load=0.0, inflight=1e9, config=cfg, max_instances=20, budget_instances=7))
    assert d.instances == 7


def test_predictive_caps_utilization_at_what_the_slo_allows() -> None:
    # one instance at 2,000 msgs/s: 0.5 ms per message; random arrivals queue, so a 10 ms SLO (BFD)
    # allows ~85 % busy, a 100 ms one ~99 %; no SLO, no cap
    assert 0.8 < slo_utilization(ctx(capacity_per_instance=2000.0, slo_ms=10.0)) < 0.87
    assert slo_utilization(ctx(capacity_per_instance=2000.0, slo_ms=100.0)) > 0.97
    assert slo_utilization(ctx(capacity_per_instance=2000.0, slo_ms=None)) == 1.0
    assert 0.05 <= slo_utilization(ctx(capacity_per_instance=10.0, slo_ms=1.0)) < 0.1  # SLO below one service time
    cfg = {"target_utilization": 0.95}
    tight = predictive(ctx(capacity_per_instance=2000.0, load=17_000.0, slo_ms=10.0, config=cfg))
    loose = predictive(ctx(capacity_per_instance=2000.0, load=17_000.0, slo_ms=100.0, config=cfg))
    assert loose.instances == math.ceil(17_000 / (2000 * 0.95)) == 9
    bfd_util = slo_utilization(ctx(capacity_per_instance=2000.0, slo_ms=10.0))
    assert tight.instances == math.ceil(17_000 / (2000 * bfd_util))
    assert tight.instances == 10


def test_predictive_provisions_for_tables_peers_will_resend() -> None:
    """A full-table peer went down: its table will come back as soon as it reconnects, whatever
    the forecast says. Sized as the backlog over its time constant, on top of the forecast; gone
    once re-sent."""
    cfg = {"target_utilization": 0.8, "table_transfer_s": 20.0}
    quiet = ctx(current_instances=1, load=500.0, forecast=flat_forecast(500), config=cfg)
    assert predictive(quiet).instances == 1
    down = replace(quiet, table_backlog=400_000.0)
    d = predictive(down)
    assert d.instances == math.ceil((500 + 400_000 / 20) / (CAP * 0.8)) and "tables to re-send 400000" in d.reason
    assert predictive(replace(down, table_backlog=40_000.0)).instances == math.ceil(2500 / (CAP * 0.8))
    assert predictive(replace(down, max_instances=10)).instances == 10  # bounds hold


def test_slo_utilization_leaves_room_for_the_fixed_latency() -> None:
    # 40 ms of batching and transport floor on a 100 ms SLO at 5 ms per message: queueing gets
    # 80 - 40 ms, so the instances must run cooler than with the whole budget
    base = {"capacity_per_instance": 200.0, "slo_ms": 100.0}
    whole = slo_utilization(ctx(**base))
    less = slo_utilization(ctx(**base, config={"fixed_latency_ms": 40.0}))
    assert 0.5 < less < whole < 0.95
    # at `less`, the M/D/1 p99 plus the fixed part is within 80 % of the SLO
    s = 5.0
    assert s + s / (2 * (1 - less)) * math.log(100 * less) + 40.0 <= 80.0 + 1e-6
    assert slo_utilization(ctx(**base, config={"fixed_latency_ms": 99.0})) == 0.05  # nothing left


def test_predictive_forgets_a_storm_after_recent_s() -> None:
    # the forecaster's band after a storm: p90 far above a quiet median
    band = {"p50": (500.0,) * 40, "p90": (30_000.0,) * 40}
    storm = (500.0,) * 50 + (24_000.0,) * 10 + (500.0,) * 100  # ended 100 s ago
    cfg = {"target_utilization": 1.0, "recent_s": 60}
    c = ctx(current_instances=1, load=500.0, load_history=storm, forecast=band, config=cfg)
    assert sized(c) == 2  # bounded by 3 x 500/s: the storm is out of the window
    # within the window the storm still licenses the band (3 x 24,000/s > 30,000/s)
    c = ctx(current_instances=1, load=500.0, load_history=storm[:-50], forecast=band, config=cfg)
    assert predictive(c).instances == 30


def test_predictive_holds_steady_on_a_noisy_backlog() -> None:
    """Flickering frames in flight and a noisy load around a steady level: no flapping."""
    rng = np.random.default_rng(5)
    st: dict[str, Any] = {}
    cur = 7
    changes = 0
    for t in range(600):
        load = 5000.0 + rng.normal(0, 300)
        c = ctx(
            now=float(t),
            current_instances=cur,
            load=load,
            inflight=float(rng.uniform(0, 200)),
            forecast=flat_forecast(5000),
            load_history=(5000.0,) * 60,
            instance_ages=(500.0,) * cur,
            config={"target_utilization": 0.8},
            state=st,
        )
        d = predictive(c)
        st = d.state
        changes += d.instances != cur
        cur = d.instances
    assert changes == 0 and cur == math.ceil(5000 * 1.1 / (CAP * 0.8))
    # a real rise of the live load is followed at once, sized at the target
    rise = ctx(current_instances=7, load=6500.0, forecast=flat_forecast(5000), config={"target_utilization": 0.8})
    d = predictive(rise)
    assert d.instances == math.ceil(6500 / (CAP * 0.8))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_respects_bounds_and_budget(name: str) -> None:
    fn = get_policy(name)
    huge = {"forecast": flat_forecast(1e9), "future_load": (1e9,) * 40, "load_history": (1e9,), "cpu_utilization": 50.0}
    st: dict[str, Any] = {}
    for t in range(0, 400, 1):
        d = fn(ctx(now=float(t), load=1e9, max_instances=20, budget_instances=12, state=st, **huge))
        st = d.state
        assert 1 <= d.instances <= 12
    zero = {"forecast": flat_forecast(0.0), "future_load": (0.0,) * 40, "load_history": (0.0,), "cpu_utilization": 0.0}
    st = {}
    for t in range(0, 400, 1):
        d = fn(ctx(now=float(t), load=0.0, min_instances=2, current_instances=5, state=st, **zero))
        st = d.state
        assert d.instances >= 2


def test_ray_serve_agrees_step_by_step_with_reactive_configured_alike() -> None:
    """Ray Serve's installed default policy through the adapter, on a real trace's shape, against
    `reactive` set to what Ray's defaults mean in APSV's unit: 2 of 5 slots = 40 % of capacity,
    up after 30 s, down after 600 s, factors 1 - and given the load Serve averages over its 30 s
    look-back. They must decide the same count at every step."""
    rng = np.random.default_rng(7)
    t = np.arange(3000)
    trace = 4000 + 3000 * np.sin(t / 300.0) + rng.normal(0, 400, t.size).clip(-1500, 1500)
    serve, react = get_policy("ray_serve"), get_policy("reactive")
    react_cfg = {"target_utilization": 0.4, "upscale_smoothing": 1.0, "downscale_smoothing": 1.0}
    react_cfg |= {"upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
    cur, changes = 3, 0
    s_state: dict[str, Any] = {}
    r_state: dict[str, Any] = {}
    for i, load in enumerate(trace):
        common = {"now": float(i), "current_instances": cur, "max_instances": 64}
        history = tuple(float(x) for x in trace[max(0, i - 29) : i])
        a = serve(ctx(**common, load=float(load), load_history=history, state=s_state))
        mean = (sum(history) + float(load)) / (len(history) + 1)
        b = react(ctx(**common, load=mean, state=r_state, config=react_cfg))
        assert a.instances == b.instances, (i, load, cur, a, b)
        changes += a.instances != cur
        cur, s_state, r_state = a.instances, a.state, b.state
    assert changes >= 4  # it did scale, both ways


def test_ray_serve_counts_ongoing_requests_in_its_own_unit() -> None:
    """Ray's defaults: 5 slots per instance, 2 of them the target, averaged over 30 s."""
    from apsv.scaling.ray_serve import ongoing_requests

    c = ctx(load=400.0, inflight=100.0, load_history=(0.0,) * 100 + (200.0,) * 29)
    # (29 x 200 + 400) / 30 = 206.7 msgs/s, + 100 queued frames drained in one second
    assert ongoing_requests(c, 5.0, 1.0, 30.0) == pytest.approx(5 * (6200 / 30 + 100) / CAP)
    # 30 s of wanting more before Ray scales up, then straight to what 40 % of capacity needs
    st: dict[str, Any] = {}
    for now in range(0, 31):
        d = get_policy("ray_serve")(ctx(now=float(now), current_instances=2, load=2000.0, state=st))
        st = d.state
        assert d.instances == (2 if now < 30 else 5), now


def test_threshold_holds_the_highest_recommendation_of_the_window() -> None:
    cfg = {"target_cpu": 0.5, "stabilization_s": 60.0}
    d = threshold(ctx(current_instances=4, cpu_utilization=0.5, now=0.0, config=cfg))
    assert d.instances == 4
    d = threshold(ctx(current_instances=4, cpu_utilization=0.1, now=10.0, config=cfg, state=d.state))
    assert d.instances == 4  # 0.8 wanted, but 4 was recommended 10 s ago
    d = threshold(ctx(current_instances=4, cpu_utilization=0.1, now=61.0, config=cfg, state=d.state))
    assert d.instances == 1
    d = threshold(ctx(current_instances=2, cpu_utilization=2.0, now=70.0, config=cfg, state=d.state))
    assert d.instances == 6  # up at once, at most +4 or x2 per step


def test_weighted_rebalance_evens_out_load() -> None:
    insts = [InstanceLoad(str(i), 0, 100, 0, 1, 0.0) for i in range(3)]
    sessions = {"0": list(range(12)), "1": [], "2": []}
    weight = {s: float(12 - s) for s in range(12)}  # 78 in all
    moves = rebalance_moves(insts, sessions, weight_of=weight)
    load = {"0": 78.0, "1": 0.0, "2": 0.0}
    for s, dst in moves:
        load["0"] -= weight[s]
        load[dst] += weight[s]
    assert max(load.values()) <= 78 / 3 + 12 and len(moves) < 12
    assert rebalance_moves(insts, sessions) and len(rebalance_moves(insts, sessions)) == 8  # counts: 4 each


def test_weighted_rebalance_moves_each_session_once() -> None:
    """The greedy pass can pick a session again from the instance it just moved it to (the
    multiplexer would then detach it twice): the moves name each session once, where it ends,
    never its own instance - and leave the same loads as replaying every pick would."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n_inst = int(rng.integers(2, 8))
        insts = [InstanceLoad(str(i), 0, 100, 0, 1, 0.0) for i in range(n_inst)]
        sessions: dict[str, list[Any]] = {str(i): [] for i in range(n_inst)}
        home: dict[Any, str] = {}
        for s in range(int(rng.integers(2, 60))):
            i = str(int(rng.integers(0, max(1, n_inst // 2))))  # crowded on the first half
            sessions[i].append(s)
            home[s] = i
        weight = {s: float(rng.pareto(1.2) + 0.1) for s in home}
        moves = rebalance_moves(insts, sessions, weight_of=weight, max_moves=int(rng.integers(1, 40)))
        keys = [s for s, _ in moves]
        assert len(keys) == len(set(keys)) and all(home[s] != dst for s, dst in moves)
        before = {i: sum(weight[s] for s in ss) for i, ss in sessions.items()}
        after = dict(before)
        for s, dst in moves:
            after[home[s]] -= weight[s]
            after[dst] += weight[s]
        assert max(after.values()) <= max(before.values()) + 1e-9  # never worse


def test_simulator_conserves_messages_and_loses_when_underprovisioned() -> None:
    load = np.full(300, 5000.0)
    cfg = SimConfig(capacity=CAP, start_latency_s=2.0, max_instances=20, vrouters=200)
    ok = simulate(load, "fixed", cfg, policy_config={"instances": 10})
    assert ok.messages == pytest.approx(5000 * 300) and ok.lost == 0 and ok.slo_violation_s == 0
    assert ok.instance_s == 10 * 300 and ok.scale_actions == 0
    short = simulate(load, "fixed", cfg, policy_config={"instances": 3})
    assert short.lost > 0 and short.slo_violation_s > 250
    with pytest.raises(ValueError, match="non-negative"):
        simulate(np.array([1.0, -1.0]), "fixed", cfg)
    with pytest.raises(ValueError, match="exceeds nodes"):
        SimConfig(max_instances=1000, nodes=10, instances_per_node=4)


def test_simulator_stalls_a_node_where_instances_start_at_once() -> None:
    """A node with 2 cores: one instance starting beside the message path leaves it a core, two
    starting at once stop it for `start_stall_s` - the messages of that step wait up to that."""
    load = np.full(30, 3000.0)
    load[10:] = 6000.0  # reactive wants +2 or +3 at once here
    cfg = SimConfig(capacity=CAP, start_latency_s=0.5, max_instances=16, vrouters=100, nodes=1, instances_per_node=16)
    pc = {"target_utilization": 0.9, "upscale_delay_s": 0.0}
    plain = simulate(load, "reactive", cfg, policy_config=pc, initial_instances=4)
    stalled = simulate(
        load, "reactive", replace(cfg, node_cpus=2, start_stall_s=0.3), policy_config=pc, initial_instances=4
    )
    assert plain.scale_actions == stalled.scale_actions >= 2
    jump = int(np.argmax(np.diff(plain.timeline["instances"]))) + 1  # the step after the burst start
    assert stalled.timeline["p99_ms"][jump] >= plain.timeline["p99_ms"][jump] + 250.0
    assert stalled.slo_violation_s > plain.slo_violation_s
    # each start beyond the free cores adds a stall: +3 on 3 cores stalls less than on 2
    three = simulate(
        load, "reactive", replace(cfg, node_cpus=3, start_stall_s=0.3), policy_config=pc, initial_instances=4
    )
    assert plain.timeline["p99_ms"][jump] < three.timeline["p99_ms"][jump] < stalled.timeline["p99_ms"][jump] - 200
    # many cores: no stall; one start at a time: no stall
    roomy = simulate(
        load, "reactive", replace(cfg, node_cpus=8, start_stall_s=0.3), policy_config=pc, initial_instances=4
    )
    assert roomy.slo_violation_s == plain.slo_violation_s
    step = np.full(30, 3000.0)
    step[10:] = 4000.0  # +1
    one = simulate(
        step, "reactive", replace(cfg, node_cpus=2, start_stall_s=0.3), policy_config=pc, initial_instances=4
    )
    assert one.scale_actions == 1 and one.slo_violation_s == 0
    with pytest.raises(ValueError, match="start_stall_s"):
        SimConfig(start_stall_s=2.0)


def test_mixture_quantile_matches_a_fine_bisection() -> None:
    """The simulator's fast p99 (constants hoisted, bisection to 1e-4) against a 60-step
    bisection on the reference CDF, on random mixtures of uniform + M/D/1-tail components."""
    from apsv.scaling.latency_mixture import mixture_cdf, mixture_quantile

    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        lo = rng.uniform(1, 50, n)
        hi = lo + rng.uniform(0, 200, n) * (rng.random(n) > 0.3)  # some point masses
        wt = rng.uniform(0, 10, n)
        rho = rng.uniform(0, 0.95, n) * (rng.random(n) > 0.3)
        m = rng.uniform(0, 30, n) * (rng.random(n) > 0.2)
        if rng.random() < 0.3:  # a tiny share paused for a minute: the bracket's top is far out
            lo, hi, wt = np.append(lo, 10.0), np.append(hi, 60_000.0), np.append(wt, 1e-4)
            rho, m = np.append(rho, 0.0), np.append(m, 0.0)
        a, b = float(lo.min()), float((hi + 12 * m).max())
        for _ in range(60):
            x = (a + b) / 2
            a, b = (x, b) if mixture_cdf(x, lo, hi, wt, rho, m).sum() / wt.sum() < 0.99 else (a, x)
        assert mixture_quantile(lo, hi, wt, 0.99, rho, m) == pytest.approx((a + b) / 2, rel=5e-4, abs=2e-3)


def test_simulator_agents_batching_and_head_of_line() -> None:
    """The agents' batching delay adds up to the delay to loaded messages' latency; a backlog past
    the agents' in-flight window holds up every message, not only the backlogged instance's; a
    move that waits out a seconds-long backlog pauses its session for as many steps."""
    load = np.full(60, 5000.0)
    cfg = SimConfig(capacity=CAP, start_latency_s=2.0, max_instances=20, vrouters=200, poisson_arrivals=False)
    plain = simulate(load, "fixed", cfg, policy_config={"instances": 4})
    batched = simulate(load, "fixed", replace(cfg, batch_delay_ms=40.0), policy_config={"instances": 4})
    assert plain.p99_ms < batched.p99_ms <= plain.p99_ms + 40.0 + 1e-6
    # a skewed population (one router carries half the load) bursts for 10 s: the instance with
    # the heavy router backs up seconds deep while the others keep up
    skewed = replace(cfg, vrouters=12, sessions_per_vrouter=1, zipf=1.5, max_queue_s=60.0)
    burst = np.full(60, 1500.0)
    burst[10:20] = 2500.0
    free = simulate(burst, "fixed", skewed, policy_config={"instances": 4})
    coupled = simulate(burst, "fixed", replace(skewed, agent_window_ms=500.0), policy_config={"instances": 4})
    assert free.p99_ms > 1000 and coupled.slo_violation_s >= free.slo_violation_s
    assert coupled.late > 1.5 * free.late  # the other instances' messages wait behind the backlog too


def test_predictive_beats_reactive_ahead_of_a_known_burst() -> None:
    """A daily burst the forecast knows about: predictive has started instances when it lands,
    reactive is still waiting for them."""
    t = np.arange(1200)
    load = 2000 + 1500 * np.sin(2 * np.pi * t / 300)
    load[600:640] += 8000
    cfg = SimConfig(capacity=CAP, start_latency_s=5.0, max_instances=40, vrouters=300)
    horizon = 40
    origins = range(0, load.size, 5)
    ahead = np.stack(
        [np.pad(load[o : o + horizon], (0, max(0, o + horizon - load.size)), mode="edge") for o in origins]
    )
    fc = Forecasts(5, {"p50": ahead, "p90": ahead * 1.05})
    pred = simulate(load, "predictive", cfg, forecasts=fc, policy_config={"target_utilization": 0.8})
    reac = simulate(load, "reactive", cfg, policy_config={"target_utilization": 0.6, "upscale_delay_s": 0.0})
    orac = simulate(load, "oracle", cfg)
    assert pred.slo_violation_s < reac.slo_violation_s and pred.slo_violation_s <= 2
    assert orac.slo_violation_s == 0 and orac.instance_s <= pred.instance_s


def test_predictive_is_ready_for_a_reset_storm_it_was_told_of() -> None:
    """A storm no forecast saw: told of the tables to come when the peers go down, predictive
    has instances up when they arrive; without it, it meets the storm late like reactive."""
    load = np.full(300, 800.0)
    shape = np.exp(-np.linspace(0.0, 3.0, 60))
    storm = 150_000 * shape / shape.sum()
    load[150:210] += storm
    backlog = np.zeros(300)
    backlog[140:150] = storm.sum()
    backlog[150:210] = storm.sum() - np.cumsum(storm)
    cfg = SimConfig(capacity=CAP, start_latency_s=3.0, max_instances=40, vrouters=300)
    fc = Forecasts(5, {"p50": np.full((60, 32), 800.0), "p90": np.full((60, 32), 900.0)})
    told = simulate(load, "predictive", cfg, forecasts=fc, table_backlog=backlog)
    blind = simulate(load, "predictive", cfg, forecasts=fc)
    assert told.slo_violation_s == 0 < blind.slo_violation_s
    assert told.timeline["instances"][150] > 5 * blind.timeline["instances"][149]
    with pytest.raises(ValueError, match="table_backlog"):
        simulate(load, "predictive", cfg, table_backlog=backlog[:10])


def test_no_flapping_on_noise() -> None:
    rng = np.random.default_rng(3)
    load = np.maximum(5000 + rng.normal(0, 400, 1500), 0)
    cfg = SimConfig(capacity=CAP, start_latency_s=3.0, max_instances=40, vrouters=300)
    noisy = np.stack([np.maximum(5000 + rng.normal(0, 400, 40), 0) for _ in range(0, 1500, 5)])
    fc = Forecasts(5, {"p50": np.full_like(noisy, 5000.0), "p90": np.full_like(noisy, 5600.0)})
    r = simulate(load, "predictive", cfg, forecasts=fc)
    # the warm start is the fallback's (no skill shown yet): trusted, the forecast takes two
    # instances off; beyond that, noise moves nothing back and forth
    assert r.scale_actions <= 6 and r.reversals == 0 and r.slo_violation_s == 0


def test_traces(data_dir: Path) -> None:
    tr = bgp_churn(data_dir / "mrt/bgpdump-testdata/updates.20070211.0141.gz", length_s=1200, storm_at_s=600)
    assert tr.rates.size == 1200 and tr.meta["storm_messages"] > 100_000
    # the table is known from the peers going down (reconnect_s before), shrinks as it is re-sent
    assert tr.table_backlog is not None and tr.organic is not None
    storm = tr.rates - tr.organic
    assert storm[:600].sum() == 0 and storm.sum() == pytest.approx(tr.meta["storm_messages"], abs=1)
    assert tr.table_backlog[589] == 0 and tr.table_backlog[590] == tr.table_backlog[599] == pytest.approx(storm.sum())
    # after each step of the transfer, what is still to come: the first step's share is gone
    assert tr.table_backlog[600] == pytest.approx(storm.sum() - storm[600])
    assert np.all(np.diff(tr.table_backlog[600:659]) < 0) and tr.table_backlog[659:].sum() < 1e-6
    # MANIFEST: 23394 UPDATEs in the 900 s dump; the loop repeats them, the storm adds its own
    base = bgp_churn(data_dir / "mrt/bgpdump-testdata/updates.20070211.0141.gz", length_s=900, storm_at_s=None)
    assert base.rates.sum() == 23394
    bfd = bfd_population(1000, length_s=600, day_s=300, tx_interval_ms=100)
    assert bfd.protocol == "bfd" and 0.25 * 10_000 < bfd.rates.min() < bfd.rates.max() <= 1.05 * 10_000


def test_evaluate_cli_json(data_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from apsv.cli import app

    f = data_dir / "timeseries/cortez-internet-traffic/A1H.txt"
    args = ["evaluate", str(f), "--season", "24", "--forecaster-steps", "30", "--json", "--plots", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert set(doc["policies"]) == {"static", "reactive", "ray_serve", "threshold", "predictive", "oracle"}
    for v in doc["policies"].values():
        assert {"slo_violation_s", "instance_s", "scale_actions", "lost"} <= set(v)
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert isinstance(doc["claims"]["never_worse"], bool) and doc["forecast"]["relative_mase"] > 0
    # a series without timestamps has no sampling step of its own to play at
    res = CliRunner().invoke(app, [*args[:4], "--sample-step", "--json"])
    assert res.exit_code == 2 and "no sampling step" in res.output
    bad = CliRunner().invoke(app, ["evaluate", str(f), "--policies", "magic"])
    assert bad.exit_code == 2 and "unknown policy" in bad.output


def test_claims_compare_with_reactive_at_equal_cost_too() -> None:
    from apsv.evaluation.compare import claims

    pol = {
        "predictive": {"slo_violation_s": 2.0, "instance_s": 100.0},
        "reactive": {"slo_violation_s": 4.0, "instance_s": 300.0},
        "oracle": {"slo_violation_s": 0.0, "instance_s": 80.0},
        "static": {"slo_violation_s": 0.0, "instance_s": 400.0},
    }
    grid = [
        {"target_utilization": 0.4, "slo_violation_s": 4.0, "instance_s": 300.0},
        {"target_utilization": 0.7, "slo_violation_s": 20.0, "instance_s": 95.0},
        {"target_utilization": 0.6, "slo_violation_s": 10.0, "instance_s": 100.0},
    ]
    c = claims({"policies": pol, "reactive_grid": grid})
    assert c["violation_reduction_vs_reactive"] == 0.5 and c["cost_vs_oracle"] == 1.25 and c["cost_vs_static"] == 0.25
    assert c["reactive_at_equal_cost_violation_s"] == 10.0
    assert c["violation_reduction_vs_reactive_at_equal_cost"] == 0.8
    assert "reactive_at_equal_cost_violation_s" not in claims({"policies": pol})


def _cands(pro: float, rea: float, full: float = 1.0) -> dict[str, tuple[float, float]]:
    """Candidates as the policy passes them: each level provisioned for, and its capacity
    within the SLO (`full` x the level: what the instances serve before queueing breaks it)."""
    return {skill.PROACTIVE: (pro, full * pro), "threshold": (rea, full * rea)}


def test_skill_trusts_a_forecast_that_provisions_better_than_reacting() -> None:
    cfg = skill.SkillConfig(min_evidence=10)
    good: dict[str, Any] = {}
    bad: dict[str, Any] = {}
    for t in range(200):
        load = 1000.0 + 500.0 * math.sin(t / 10)
        peak = max(1000.0 + 500.0 * math.sin(u / 10) for u in range(t + 1, t + 6))
        # provisioned for: a forecast that knows the peak (5 % over) vs reacting with 1/0.6 headroom
        good = skill.observe(
            good, now=t, load=load, window_s=5, median_peak=peak, candidates=_cands(1.05 * peak, load / 0.6)
        )
        # a forecast that lags: it provisions for the load of 20 s ago
        lag = 1000.0 + 500.0 * math.sin((t - 20) / 10)
        bad = skill.observe(bad, now=t, load=load, window_s=5, median_peak=lag, candidates=_cands(lag, load / 0.6))
    assert skill.trust(good, cfg, "threshold") == 1.0 and skill.coverage(good) == 1.0
    assert skill.ratio(good, "threshold") < 0.5 and skill.guard(good, "threshold") == 1.0
    assert skill.trust(bad, cfg, "threshold") == 0.0 and skill.coverage(bad) < 0.5
    # the lagging forecast ran short of capacity in windows the headroom covered: no saving on it
    assert skill.short_windows(bad, skill.PROACTIVE) > skill.short_windows(bad, "threshold")
    assert skill.guard(bad, "threshold") < 0.2
    # no evidence, no trust; and the pending windows stay bounded
    assert skill.trust({}, cfg, "threshold") == 0.0
    assert len(good["pending"]) <= 6 and good["evidence"] < 200


def test_skill_picks_the_fallback_that_runs_short_least_and_holds_it_through_noise() -> None:
    st: dict[str, Any] = {}
    for t in range(100):
        load = 1000.0 + (3000.0 if t % 20 == 10 else 0.0)  # a burst every 20 s
        # "tight" provisions 10 % over the load now, "roomy" 3x over: only roomy holds the bursts
        cands = {skill.PROACTIVE: (load, load), "tight": (1.1 * load, 1.1 * load), "roomy": (3e3, 4.5e3)}
        st = skill.observe(st, now=t, load=load, window_s=3, median_peak=load, candidates=cands)
    assert skill.short_windows(st, "tight") > skill.short_windows(st, "roomy") + 1
    assert skill.better_fallback(st, ["tight", "roomy"], "tight") == "roomy"
    # a difference of less than a window and a tenth of the loss is noise: the current one stays
    st2 = {"short": {"a": 1.0, "b": 0.5}, "loss": {"a": 100.0, "b": 95.0}}
    assert skill.better_fallback(st2, ["a", "b"], "a") == "a"
    assert skill.better_fallback(st2, ["a", "b"], None) == "a"  # no choice yet: the first listed


def test_predictive_fallback_config_is_read_and_checked() -> None:
    from apsv.scaling.predictive import check_config, fallbacks

    both = fallbacks({"interval_s": 300.0})
    assert both == {
        "threshold": {"interval_s": 300.0, "target_cpu": 0.6, "stabilization_s": 60.0},
        "ray_serve": {"interval_s": 300.0},
    }
    one = fallbacks({"fallback": "threshold", "fallback_config": {"target_cpu": 0.5}})
    assert one == {"threshold": {"target_cpu": 0.5}}
    by_name = fallbacks({"fallback_config": {"ray_serve": {"downscale_delay_s": 60.0}}})
    assert by_name["ray_serve"] == {"downscale_delay_s": 60.0} and by_name["threshold"]["target_cpu"] == 0.6
    for bad, says in (
        ({"fallback": "oracle"}, "cannot be the fallback"),
        ({"fallback": ["threshold", 3]}, "expected a reactive policy's name"),
        ({"fallback": "nosuch"}, "nosuch"),
        ({"fallback_config": {"target_cpu": 0.5}}, "each one's settings by name"),
    ):
        with pytest.raises(ValueError, match=says):
            check_config(bad)


def test_settings_are_parsed_once_per_config_and_again_when_it_changes() -> None:
    from apsv.scaling import settings

    cfg: dict[str, Any] = {"target_cpu": 0.6, "fallback": None}
    with pytest.raises(ValueError, match="fallback: not a setting"):
        settings.parse(settings.Threshold, cfg, "threshold")
    del cfg["fallback"]
    first = settings.parse(settings.Threshold, cfg, "threshold")
    assert settings.parse(settings.Threshold, cfg, "threshold") is first
    assert settings.parse(settings.Threshold, dict(cfg), "threshold") == first  # another object
    cfg["target_cpu"] = 0.5  # a changed config is parsed again
    assert settings.parse(settings.Threshold, cfg, "threshold").target_cpu == 0.5
    cfg["tolerance"] = True  # equal to 1, but not a number: refused every time
    for _ in range(2):
        with pytest.raises(ValueError, match="tolerance: expected a number"):
            settings.parse(settings.Threshold, cfg, "threshold")
    cfg["tolerance"] = 1
    assert settings.parse(settings.Threshold, cfg, "threshold").tolerance == 1.0
    cfg["tolerance"] = True
    with pytest.raises(ValueError, match="tolerance: expected a number"):
        settings.parse(settings.Threshold, cfg, "threshold")
    # nested: a predictive config's fallbacks, and the common settings out of the same object
    pcfg: dict[str, Any] = {"fallback": ["threshold"], "fallback_config": {"target_cpu": 0.6}, "interval_s": 5}
    assert settings.parse(settings.Predictive, pcfg, "predictive").fallback_config == {"target_cpu": 0.6}
    assert settings.common(pcfg).interval_s == 5.0
    pcfg["fallback_config"]["target_cpu"] = 0.4
    pcfg["interval_s"] = 2
    assert settings.parse(settings.Predictive, pcfg, "predictive").fallback_config == {"target_cpu": 0.4}
    assert settings.common(pcfg).interval_s == 2.0
    # common() reads a subset: the full config is no Common, and parse says so
    with pytest.raises(ValueError, match="fallback: not a setting of the common policy"):
        settings.parse(settings.Common, pcfg, "common")
    # bounded: the least recently used entries go
    keep = {"target_cpu": 0.6}
    kept = settings.parse(settings.Threshold, keep)
    for i in range(2 * settings._CACHE_SIZE):
        settings.parse(settings.Threshold, {"target_cpu": 0.6})
        if i % 16 == 0:
            assert settings.parse(settings.Threshold, keep) is kept
    assert len(settings._CACHE) <= settings._CACHE_SIZE


def test_predictive_at_no_trust_is_exactly_its_fallback() -> None:
    t = np.arange(1500)
    rng = np.random.default_rng(5)
    load = 3000 + 2000 * np.sin(2 * np.pi * t / 400) + rng.normal(0, 300, t.size)
    cfg = SimConfig(capacity=CAP, start_latency_s=3.0, max_instances=40, vrouters=300)
    # a forecast with no skill at all: noise around the mean
    noise = np.abs(3000 + rng.normal(0, 2000, (300, 32)))
    fc = Forecasts(5, {"p50": noise, "p90": noise * 1.3})
    base = {"target_cpu": 0.6, "stabilization_s": 60.0}
    one = {"fallback": "threshold", "fallback_config": base}
    pinned = simulate(load, "predictive", cfg, forecasts=fc, policy_config={"trust": 0.0, **one})
    thr = simulate(load, "threshold", cfg, policy_config=base)
    assert pinned.to_json() == {**thr.to_json(), "forecast_trust": 0.0}
    # measured, such a forecast earns (next to) no trust, and the policy does as its fallback
    measured = simulate(load, "predictive", cfg, forecasts=fc, policy_config=one)
    assert measured.forecast_trust is not None and measured.forecast_trust < 0.05
    assert measured.slo_violation_s <= thr.slo_violation_s
    # with both baselines scored side by side, it is no worse than the better of the two
    rs = simulate(load, "ray_serve", cfg, policy_config={})
    both = simulate(load, "predictive", cfg, forecasts=fc, policy_config={})
    assert both.slo_violation_s <= min(thr.slo_violation_s, rs.slo_violation_s)


def test_predictive_steps_down_with_a_fallback_that_waits_out_a_delay() -> None:
    # Ray Serve's policy steps down only after 600 s of wanting to, and starts counting again
    # after each step: a scale-in window held on top of its recommendation would see its last
    # "keep" in every window and never step down
    load = np.concatenate([np.full(300, 500.0), np.full(60, 30_000.0), np.full(1800, 500.0)])
    cfg = SimConfig(capacity=CAP, start_latency_s=3.0, max_instances=40, vrouters=300)
    rng = np.random.default_rng(3)
    noise = np.abs(3000 + rng.normal(0, 2000, (load.size // 5 + 1, 32)))
    fc = Forecasts(5, {"p50": noise, "p90": noise * 1.3})
    alone = simulate(load, "ray_serve", cfg, policy_config={})
    pred = simulate(load, "predictive", cfg, forecasts=fc, policy_config={"fallback": "ray_serve"})
    assert alone.timeline["instances"].max() > 5 and pred.timeline["instances"].max() > 5
    assert pred.timeline["instances"][-1] <= alone.timeline["instances"][-1]


def test_a_chosen_fallback_does_not_hold_instances_its_own_path_never_started() -> None:
    # Three instances a burst started (the other fallback scaled out for it); Ray Serve's policy,
    # now the chosen fallback, never scaled out on its own path (one instance). On the live path
    # its 600 s downscale delay would keep all three: it steps down to its own path's count.
    live = ctx(current_instances=3, load=300.0, instance_ages=(900.0, 900.0, 900.0), slo_ms=100.0)
    state = {"fallback": "ray_serve", "shadows": {"ray_serve": [1, {}], "threshold": [3, {}]}}
    config = {"fallback": ["ray_serve", "threshold"], "trust": 0.0}
    alone = get_policy("ray_serve")(replace(live, config={}))
    assert alone.instances == 3, "on the live path Ray's delay holds what it has"
    d = skill_weighted(replace(live, state=state, config=config))
    assert d.instances == 1 and "its own path runs 1" in d.reason
    # never below what the live load needs (2,500 msgs/s on 1,000 per instance) ...
    busy = replace(live, load=2500.0, state=state, config=config)
    assert skill_weighted(busy).instances == 3
    # ... nor while the p99 is over the SLO
    assert skill_weighted(replace(live, latency_p99_ms=150.0, state=state, config=config)).instances == 3
    # a scale-out the fallback asks for on the live path stands, whatever its own path runs
    # (threshold at 0.6: 3 instances 83 % busy ask for 5; its own path, from 1, runs 2)
    hpa = {"fallback": "threshold", "trust": 0.0}
    hot = replace(live, load=2500.0, cpu_utilization=0.83, state={"shadows": {"threshold": [1, {}]}}, config=hpa)
    out = skill_weighted(hot)
    assert out.instances == 5 and "its own path" not in out.reason


def test_hedged_an_untrusted_forecast_provisions_the_most_any_fallback_asks() -> None:
    # Ray Serve's policy is the chosen fallback and its own path runs 1 instance; threshold's
    # runs 3 and, with the load at 2,400 msgs/s on 3 instances of 2,000, asks to keep them
    live = ctx(current_instances=3, load=2400.0, instance_ages=(900.0,) * 3, slo_ms=100.0)
    state = {"fallback": "ray_serve", "shadows": {"ray_serve": [1, {}], "threshold": [3, {}]}}
    both = {"fallback": ["ray_serve", "threshold"]}
    thr = get_policy("threshold")(replace(live, config={"target_cpu": 0.6, "stabilization_s": 60.0}))
    chosen = skill_weighted(replace(live, state=state, config={**both, "trust": 0.0}))
    assert chosen.instances < thr.instances, "by default the chosen fallback alone, which asks for fewer"
    hedged = {**both, "hedge_below": 0.25}
    for trust in (0.0, 0.2):
        d = skill_weighted(replace(live, state=state, config={**hedged, "trust": trust}))
        assert d.instances >= thr.instances and d.instances >= chosen.instances
        assert "the most of the fallbacks at a trust under 0.25" in d.reason
    # trusted at the bound or more, the forecast is weighed against the chosen fallback alone
    d = skill_weighted(replace(live, state=state, config={**hedged, "trust": 0.25}))
    assert "the most of the fallbacks" not in d.reason
    from apsv.scaling.predictive import check_config

    with pytest.raises(ValueError, match="hedge_below"):
        check_config({"hedge_below": 1.5})


def test_a_fallback_on_its_own_path_sees_the_measured_utilization_on_its_own_instances() -> None:
    from apsv.scaling.predictive import _shadow_runs

    # the configured capacity says the load needs 3 instances; the measured CPU says 1 runs at 30 %
    live = ctx(current_instances=2, load=5000.0, capacity_per_instance=2000.0, cpu_utilization=0.15)
    rules = {"threshold": {"target_cpu": 0.6, "stabilization_s": 60.0}}
    # on a path of its own at 1 instance: the same work is 30 % of one, within the target
    assert _shadow_runs(live, rules, {"threshold": [1, {}]})["threshold"][0] == 1
    # at 4 instances the same work is 7.5 % each: it steps down to what that work needs
    assert _shadow_runs(live, rules, {"threshold": [4, {}]})["threshold"][0] < 4
    # without a measurement the rule takes the load over the configured capacity
    blind = replace(live, cpu_utilization=None)
    assert _shadow_runs(blind, rules, {"threshold": [1, {}]})["threshold"][0] == 5  # ceil(2.5 / 0.6)


def test_claims_never_worse_against_the_better_baseline() -> None:
    from apsv.evaluation.compare import claims

    def pol(v: float, i: float, a: int = 10, m: int = 100) -> dict[str, float]:
        return {"slo_violation_s": v, "instance_s": i, "scale_actions": a, "session_moves": m}

    doc: dict[str, Any] = {
        "policies": {
            "threshold": pol(4, 1000),
            "ray_serve": pol(9, 800),
            "predictive": pol(3, 1040, 14, 150),
            "oracle": pol(0, 700),
            "reactive": pol(5, 900),
        },
        "reactive_grid": [{"slo_violation_s": 5, "instance_s": 900.0}],
        "forecast": {"relative_mase": 0.7},
    }
    c = claims(doc)
    assert c["never_worse"] is True and c["never_worse_detail"]["baseline"] == "threshold"
    assert c["skilled"]["ok"] is False  # 25 % fewer violations, not 80 %; and 1.49x the oracle
    doc["policies"]["predictive"] = pol(3, 1060)  # more than 1.05x threshold's instance-seconds
    assert claims(doc)["never_worse"] is False
    doc["policies"]["predictive"] = pol(3, 1000, 16)  # more than 1.5x its scale actions
    assert claims(doc)["never_worse_detail"]["checks"]["scale_actions"] is False

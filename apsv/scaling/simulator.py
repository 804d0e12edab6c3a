"""A discrete-time simulator of one protocol's stack instances under a load trace.

It runs the same scaling policies as the live VPSM (`apsv.scaling.policy`) and places sessions
with the multiplexer's own placement code (`apsv.scaling.placement`), so what it says about a
policy is about the code that runs. Per step (default 1 s) it models:

* virtual routers with skewed (Zipf) shares of the load, split over their sessions, each session
  mapped to one instance (affinity);
* per instance a bounded FIFO served at `capacity` messages/s (measured by benchmarks): the queue
  grows when arrivals exceed it, messages beyond `max_queue` are lost;
* message latency: a floor, plus the wait behind the queue (fluid: waits spread evenly from the
  queue at the start of the step to the queue at its end), plus a pause for sessions being moved;
* instance start latency (no traffic until ready), rebalancing onto new instances, drains that
  move every session of the least-used instance away before it stops, billed until done.

Outputs per run: SLO-violation seconds (steps whose p99 latency exceeds the SLO), instance-seconds,
scale actions, lost and late messages, and the timeline for plots.

The parts: `sim_config` (what a run is given), `sim_cluster` (the instances, their queues and the
sessions' placement), `latency_mixture` (the step's latency distribution), `sim_result` (what a run
reports); this module runs the steps and the control loop over them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from apsv.scaling.context import Limits, build_context, with_interval
from apsv.scaling.latency_mixture import Components, mixture_cdf, mixture_quantile
from apsv.scaling.policy import get_policy
from apsv.scaling.sim_cluster import GONE, READY, STARTING, Cluster, session_weights
from apsv.scaling.sim_config import FloatArray, Forecasts, SimConfig
from apsv.scaling.sim_result import SimResult, whole_run_p99

# the simulator's interface, wherever its parts live
__all__ = ["Forecasts", "SimConfig", "SimResult", "initial_instances", "session_weights", "simulate"]


def _limits(cfg: SimConfig) -> Limits:
    return Limits(cfg.protocol, cfg.capacity, cfg.min_instances, cfg.max_instances, cfg.slo_ms, cfg.budget_instances)


def _initial(
    load: FloatArray,
    fn: Any,
    cfg: SimConfig,
    pcfg: Mapping[str, Any],
    forecasts: Forecasts | None,
    sessions: int,
    table_backlog: float = 0.0,
) -> int:
    first = build_context(
        _limits(cfg),
        now=0.0,
        current_instances=cfg.min_instances,
        load=float(load[0]),
        load_history=(),
        inflight=0.0,
        sessions=sessions,
        start_latency_s=cfg.start_latency_s,
        forecast=forecasts.at(0) if forecasts is not None else None,
        forecast_step_s=cfg.step_s,
        table_backlog=table_backlog,
        trace=load,
        step=0,
        config=pcfg,
    )
    # what the policy settles on at t=0 (a rule that steps, such as HPA's at most doubling, is
    # asked again from its own answer until it stands)
    n = cfg.min_instances
    for _ in range(16):
        want = max(int(fn(replace(first, current_instances=n)).instances), cfg.min_instances)
        if want == n:
            break
        n = want
    return n


def initial_instances(
    trace: Sequence[float] | FloatArray,
    policy: str,
    cfg: SimConfig,
    *,
    policy_config: Mapping[str, Any] | None = None,
    forecasts: Forecasts | None = None,
    sessions: int | None = None,
    table_backlog: float = 0.0,
) -> int:
    """The instances a policy wants at the trace's first step (the warm start of a run)."""
    pcfg = dict(with_interval(policy_config or {}, cfg.interval_s))
    n = sessions if sessions is not None else cfg.vrouters * cfg.sessions_per_vrouter
    return _initial(np.asarray(trace, dtype=np.float64), get_policy(policy), cfg, pcfg, forecasts, n, table_backlog)


def simulate(
    trace: Sequence[float] | FloatArray,
    policy: str,
    cfg: SimConfig,
    *,
    policy_config: Mapping[str, Any] | None = None,
    forecasts: Forecasts | None = None,
    initial_instances: int | None = None,
    table_backlog: Sequence[float] | FloatArray | None = None,
) -> SimResult:
    """Run one policy over a trace of arrival rates (messages/s, one value per step).
    `table_backlog`: per step, the messages peers that reset are expected to re-send (what the
    BGP stacks report to the VPSM; `ScalingContext.table_backlog`)."""
    load = np.asarray(trace, dtype=np.float64)
    if load.ndim != 1 or load.size == 0 or not np.all(np.isfinite(load)) or (load < 0).any():
        raise ValueError("the trace must be a non-empty series of finite, non-negative rates")
    tables = np.zeros(load.size) if table_backlog is None else np.asarray(table_backlog, dtype=np.float64)
    if tables.shape != load.shape:
        raise ValueError(f"table_backlog has {tables.size} steps, the trace {load.size}")
    pcfg = dict(with_interval(policy_config or {}, cfg.interval_s))
    return _Run(load, tables, policy, cfg, pcfg, forecasts, initial_instances).run()


class _Run:
    """One simulated run: the cluster, what is counted, and a method per phase of a step -
    instances joining and leaving, serving, the latencies of the step's messages, the control
    loop's decision."""

    def __init__(
        self,
        load: FloatArray,
        tables: FloatArray,
        policy: str,
        cfg: SimConfig,
        pcfg: dict[str, Any],
        forecasts: Forecasts | None,
        initial_instances: int | None,
    ) -> None:
        self.load, self.tables, self.policy, self.cfg, self.pcfg = load, tables, policy, cfg, pcfg
        self.forecasts = forecasts
        self.fn = get_policy(policy)
        self.dt = cfg.step_s
        self.cluster = cluster = Cluster(cfg)
        if initial_instances is None:
            # warm start: what the policy asks for at t=0 is already running
            initial_instances = _initial(load, self.fn, cfg, pcfg, forecasts, int(cluster.n_sessions), float(tables[0]))
        cluster.warm_start(max(initial_instances, cfg.min_instances))
        steps = load.size
        self.tl_instances = np.zeros(steps)
        self.tl_p99 = np.zeros(steps)
        self.violations = 0.0
        self.instance_s = 0.0
        self.actions = 0
        self.lost = self.late = self.msgs = 0.0
        self.pstate: dict[str, Any] = {}
        self.history: list[float] = []
        self.limits = _limits(cfg)
        self.lat: list[Components] = []  # steps' latency components kept for the whole run's p99
        self.last_decision = -math.inf
        self.last_in = -math.inf  # when the last scale-in was decided
        self.reversals = 0
        self.trusts: list[float] = []
        self.imbalance = 1.0  # busiest instance's arrivals over the mean, smoothed (what telemetry shows)
        self.service_ms = 1000.0 / cfg.capacity

    def run(self) -> SimResult:
        for k in range(self.load.size):
            self.step(k)
        return self.result()

    def step(self, k: int) -> None:
        cfg, dt, cluster = self.cfg, self.dt, self.cluster
        t = k * dt
        cluster.join_and_leave(t)
        rate = float(self.load[k])
        q0, arrivals, over, stall = cluster.serve(rate)
        self.lost += float(over.sum())
        self.msgs += rate * dt
        p99 = self.account(k, rate, q0, arrivals, over, stall)
        alive = cluster.state != GONE
        n_alive = int(alive.sum())
        self.instance_s += n_alive * dt
        self.tl_instances[k] = n_alive
        self.history.append(rate)
        if t - self.last_decision >= cfg.interval_s - 1e-9:  # the control loop
            self.last_decision = t
            self.decide(k, t, rate, q0, arrivals, p99)

    def account(
        self, k: int, rate: float, q0: FloatArray, arrivals: FloatArray, over: FloatArray, stall: FloatArray | None
    ) -> float:
        """The step's messages' latencies (a mixture of uniform components, each with its M/D/1
        wait): its p99, its late messages, and an SLO violation if the p99 is over."""
        cfg, dt, cluster = self.cfg, self.dt, self.cluster
        service_ms, q1 = self.service_ms, cluster.queue
        busy = np.flatnonzero(arrivals > 0)
        if busy.size > 1 and rate > 0:
            now_imb = float(arrivals.max() / max(arrivals[cluster.state == READY].mean(), 1e-12))
            self.imbalance = 0.9 * self.imbalance + 0.1 * now_imb
        lo = cfg.base_latency_ms + service_ms + 1000.0 * q0[busy] / cfg.capacity
        hi = cfg.base_latency_ms + service_ms + 1000.0 * q1[busy] / cfg.capacity
        wt: FloatArray = np.asarray(arrivals[busy] - over[busy], dtype=np.float64)
        if cfg.poisson_arrivals:
            # M/D/1: a message waits with probability rho, on average S / (2 (1 - rho)) when it does
            rho = np.minimum(arrivals[busy] / cluster.cap_step, 0.95)
            mw = service_ms / (2.0 * (1.0 - rho))
        else:
            rho = np.zeros(busy.size)
            mw = np.zeros(busy.size)
        if cluster.moved:
            lo, hi, wt, rho, mw = self._moving(busy, rate, lo, hi, wt, rho, mw)
        if stall is not None and wt.size:
            # messages arriving while a node's path stops wait for it to resume: a uniform share
            # (stall / step) of each instance's messages there, with up to the stall added
            n_own = busy.size  # the instances' own components (moved sessions' come after them)
            frac = stall[busy] / dt
            hit = np.flatnonzero(frac > 0)
            lo = np.append(lo, lo[hit])
            hi = np.append(hi, hi[hit] + 1000.0 * stall[busy][hit])
            held = wt[hit] * frac[hit]
            wt[:n_own] *= 1.0 - frac
            wt = np.asarray(np.append(wt, held), dtype=np.float64)
            rho = np.append(rho, rho[hit])
            mw = np.append(mw, mw[hit])
        if cfg.agent_window_ms > 0 and wt.size:
            # head-of-line: a backlog past the agents' window holds up every agent's messages
            floor = cfg.base_latency_ms + service_ms
            stall_lo = 1000.0 * float(q0.max()) / cfg.capacity - cfg.agent_window_ms
            stall_hi = 1000.0 * float(q1.max()) / cfg.capacity - cfg.agent_window_ms
            if stall_lo > 0 or stall_hi > 0:
                # (a shrinking backlog stalls less at the end of the step than at its start)
                lo = np.maximum(lo, floor + max(min(stall_lo, stall_hi), 0.0))
                hi = np.maximum(hi, floor + max(stall_lo, stall_hi, 0.0))
        if cfg.batch_delay_ms > 0 and wt.size:
            # the agents' batching wait: up to min(delay, the round trip of the batch before,
            # which the most backlogged instance sets), uniform over it
            rtt = float((hi + mw).max())
            hi = hi + min(cfg.batch_delay_ms, rtt)
        p99 = mixture_quantile(lo, hi, wt, 0.99, rho, mw) if wt.size else cfg.base_latency_ms
        if wt.size and float((hi + 12.0 * mw).max()) > cfg.slo_ms:
            self.late += float(wt.sum() - mixture_cdf(cfg.slo_ms, lo, hi, wt, rho, mw).sum())
        self.tl_p99[k] = p99
        if p99 > cfg.slo_ms:
            self.violations += dt
        if k % max(1, self.load.size // 2000) == 0 or p99 > cfg.slo_ms:
            self.lat.append((lo, hi, wt, rho, mw))
        return p99

    def _moving(
        self,
        busy: npt.NDArray[np.int64],
        rate: float,
        lo: FloatArray,
        hi: FloatArray,
        wt: FloatArray,
        rho: FloatArray,
        mw: FloatArray,
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
        """A moving session's messages wait until its move ends (its frames are held): those of
        this step between what is left of the pause after the step and what is left before it.
        A pause longer than a step (a source seconds behind) goes on into the next."""
        cfg, dt, moved = self.cfg, self.dt, self.cluster.moved
        floor = cfg.base_latency_ms + self.service_ms
        step_ms = 1000.0 * dt
        share = np.array([m[0] for m in moved])
        pause = np.array([m[1] for m in moved])
        # those messages are counted here, not also at the instance they went to
        at = np.full(self.cluster.slots, -1, dtype=np.int64)
        at[busy] = np.arange(busy.size)
        idx = at[np.array([m[2] for m in moved], dtype=np.int64)]
        taken = np.zeros(wt.size)
        np.add.at(taken, idx[idx >= 0], share[idx >= 0] * rate * dt)
        wt = np.maximum(wt - taken, 0.0)
        lo = np.append(lo, floor + np.maximum(pause - step_ms, 0.0))
        hi = np.append(hi, floor + pause)
        wt = np.asarray(np.append(wt, share * rate * dt), dtype=np.float64)
        rho = np.append(rho, np.zeros(share.size))
        mw = np.append(mw, np.zeros(share.size))
        moved[:] = [(w_, left - step_ms, dst) for w_, left, dst in moved if left > step_ms]
        return lo, hi, wt, rho, mw

    def decide(self, k: int, t: float, rate: float, q0: FloatArray, arrivals: FloatArray, p99: float) -> None:
        """The control loop: the policy's decision on a context from the shared builder, then
        instances started (stalling their node's path past its free cores) or drained."""
        cfg, cluster = self.cfg, self.cluster
        state = cluster.state
        ready = state == READY
        n_ready = int(ready.sum())
        n_active = int(((state == READY) | (state == STARTING)).sum())
        served = np.minimum(q0 + arrivals, cluster.cap_step)
        util = float(served[ready].sum() / max(cluster.cap_step * n_ready, 1e-9))
        ctx = build_context(
            self.limits,
            now=t,
            current_instances=n_active,
            load=rate,
            load_history=self.history,
            inflight=float(cluster.queue.sum()),
            sessions=cluster.n_sessions,
            start_latency_s=cfg.start_latency_s,
            forecast=self.forecasts.at(k) if self.forecasts is not None else None,
            forecast_step_s=self.dt,
            instance_ages=(t - cluster.started[ready]).tolist(),
            latency_p99_ms=p99,
            cpu_utilization=util,
            load_imbalance=self.imbalance,
            table_backlog=float(self.tables[k]),
            trace=self.load,
            step=k,
            state=self.pstate,
            config=self.pcfg,
        )
        d = self.fn(ctx)
        self.pstate = d.state
        want = d.instances
        if d.forecast_trust is not None:
            self.trusts.append(d.forecast_trust)
        if want > n_active and t - self.last_in < cfg.start_latency_s + cfg.interval_s:
            self.reversals += 1
        if want < n_active:
            self.last_in = t
        if n_active < want:
            self.actions += cluster.scale_out(t, want - n_active)
        elif n_active > want and n_ready > 1:
            self.actions += cluster.drain(t, n_active - want, n_ready)

    def result(self) -> SimResult:
        return SimResult(
            policy=self.policy,
            slo_violation_s=self.violations,
            instance_s=self.instance_s,
            scale_actions=self.actions,
            lost=self.lost,
            late=self.late,
            messages=self.msgs,
            p99_ms=whole_run_p99(self.lat),
            session_moves=self.cluster.moves,
            timeline={"load": self.load, "instances": self.tl_instances, "p99_ms": self.tl_p99},
            reversals=self.reversals,
            forecast_trust=float(np.mean(self.trusts)) if self.trusts else None,
        )

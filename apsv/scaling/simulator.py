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
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from apsv.scaling.context import Limits, build_context
from apsv.scaling.placement import InstanceLoad, choose_instance, least_used, rebalance_moves
from apsv.scaling.policy import get_policy

FloatArray = npt.NDArray[np.float64]

STARTING, READY, DRAINING, GONE = 0, 1, 2, 3


@dataclass(frozen=True)
class SimConfig:
    protocol: str = "bgp"
    capacity: float = 2000.0  # messages/s one instance serves
    start_latency_s: float = 2.0
    drain_s: float = 1.0  # a draining instance stays (and is billed) this long
    session_move_s: float = 0.005  # the pause a moved session's messages see (measured: 4.9 ms)
    base_latency_ms: float = 1.0  # transport and framing floor
    slo_ms: float = 100.0
    step_s: float = 1.0
    interval_s: float = 1.0  # policy decisions
    min_instances: int = 1
    max_instances: int = 64
    budget_instances: int | None = None
    vrouters: int = 1000
    sessions_per_vrouter: int = 4  # the unit of placement is a session, not a whole router
    nodes: int = 100
    instances_per_node: int = 4
    max_queue_s: float = 2.0  # queue bound, in seconds of service
    zipf: float = 0.8  # skew of the routers' shares of the load
    # Random (Poisson) arrivals queue even below capacity: an M/D/1 wait per busy instance on
    # top of the fluid backlog. False: fluid only (no wait below capacity).
    poisson_arrivals: bool = True
    # The agents' batching delay (ms): an agent sends a batch at once when none is in flight,
    # else when its first message has waited this long. A batch comes back when its slowest
    # instance has applied its part, so a message waits up to min(delay, that round trip) at
    # its agent - and one backlogged instance makes every session of the agent wait the delay.
    batch_delay_ms: float = 0.0
    # The agents' in-flight window (ms of batches: batches in flight x batch delay; 0: no
    # coupling). An agent's batch touches every instance, and its buffer is free again only when
    # the slowest has read it: an instance whose backlog exceeds the window holds every agent up,
    # so every message waits at least the excess.
    agent_window_ms: float = 0.0
    # The host's CPU at instance starts: starting a Ray worker is CPU-bound (the interpreter, its
    # imports, registration) and takes a core for the start latency. A node has `node_cpus`
    # cores and its message path needs one, so when `node_cpus` or more instances start at once
    # on a node, the path there stops for `start_stall_s` (measured live with `node_cpus` at
    # once) per start beyond `node_cpus - 1`: what it should have served then waits, and so do
    # the messages that arrive meanwhile. 0: not modelled.
    node_cpus: int = 0
    start_stall_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.step_s <= 0 or self.interval_s < self.step_s:
            raise ValueError("capacity and step_s must be positive and interval_s >= step_s")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(f"need 1 <= min_instances ({self.min_instances}) <= max_instances ({self.max_instances})")
        if self.node_cpus < 0 or not 0 <= self.start_stall_s <= self.step_s:
            raise ValueError(f"need node_cpus >= 0 and 0 <= start_stall_s <= step_s ({self.step_s})")
        if self.max_instances > self.nodes * self.instances_per_node:
            raise ValueError(
                f"max_instances {self.max_instances} exceeds nodes x instances_per_node "
                f"({self.nodes} x {self.instances_per_node})"
            )


@dataclass
class Forecasts:
    """Quantile forecasts made every `every` steps: name ("p50", "p90", ...) -> (origins, horizon)."""

    every: int
    values: dict[str, FloatArray]

    def at(self, t: int) -> dict[str, tuple[float, ...]]:
        k = min(t // self.every, next(iter(self.values.values())).shape[0] - 1)
        offset = t - k * self.every
        return {q: tuple(float(x) for x in v[k, offset:]) for q, v in self.values.items()}


@dataclass
class SimResult:
    policy: str
    slo_violation_s: float
    instance_s: float
    scale_actions: int
    lost: float
    late: float
    messages: float
    p99_ms: float  # over the whole run (message-weighted)
    session_moves: int
    timeline: dict[str, FloatArray] = field(repr=False)
    # scale-outs within a start latency (plus one decision) of a scale-in: churn that undid itself
    reversals: int = 0
    forecast_trust: float | None = None  # mean over decisions, where the policy reports one

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slo_violation_s": round(self.slo_violation_s, 3),
            "instance_s": round(self.instance_s, 1),
            "scale_actions": self.scale_actions,
            "lost": round(self.lost, 1),
            "late": round(self.late, 1),
            "messages": round(self.messages, 1),
            "p99_ms": round(self.p99_ms, 3),
            "session_moves": self.session_moves,
            "mean_instances": round(float(self.timeline["instances"].mean()), 3),
            "reversals": self.reversals,
        }
        if self.forecast_trust is not None:
            out["forecast_trust"] = round(self.forecast_trust, 3)
        return out


def _weights(routers: int, per_router: int, s: float, rng: np.random.Generator) -> FloatArray:
    """Each session's share of the protocol's load: Zipf over routers, even within a router."""
    w = 1.0 / np.arange(1, routers + 1) ** s
    rng.shuffle(w)
    return np.asarray(np.repeat(w / w.sum() / per_router, per_router), dtype=np.float64)


def _mixture_cdf(
    x: float, lo: FloatArray, hi: FloatArray, wt: FloatArray, rho: FloatArray, m: FloatArray
) -> FloatArray:
    """Per component, P(latency <= x), weighted: latency = U[lo, hi] (the fluid wait behind the
    queue) plus, with probability rho, an exponential wait of mean m (the queueing of random
    arrivals at a busy server: M/D/1's waits, as an exponential tail). Point masses when lo == hi."""
    width = hi - lo
    top = np.minimum(x, hi)
    u = np.where(width > 1e-12, np.clip((x - lo) / np.maximum(width, 1e-12), 0.0, 1.0), (x >= lo).astype(np.float64))
    safe_m = np.maximum(m, 1e-12)
    # P(U + E <= x) for U uniform on [lo, hi], E ~ Exp(mean m)
    tail_lo = np.exp(-np.maximum(x - lo, 0.0) / safe_m)
    conv_range = np.where(
        width > 1e-12,
        ((top - lo) - safe_m * (np.exp(-(x - top) / safe_m) - tail_lo)) / np.maximum(width, 1e-12),
        1.0 - tail_lo,
    )
    conv = np.where(x > lo, np.clip(conv_range, 0.0, 1.0), 0.0)
    conv = np.where(m > 1e-12, conv, u)
    return np.asarray(wt * ((1.0 - rho) * u + rho * conv), dtype=np.float64)


def _mixture_quantile(
    lo: FloatArray,
    hi: FloatArray,
    wt: FloatArray,
    q: float,
    rho: FloatArray | None = None,
    m: FloatArray | None = None,
) -> float:
    """The q-quantile of the latency mixture (see `_mixture_cdf`), by bisection on its CDF."""
    total = float(wt.sum())
    if total <= 0:
        return float(lo.min()) if lo.size else 0.0
    rho = np.zeros_like(lo) if rho is None else rho
    m = np.zeros_like(lo) if m is None else m
    a = float(lo.min())
    b = float((hi + 12.0 * m).max())
    if b - a < 1e-12:
        return a
    # `_mixture_cdf` with what does not depend on x computed once (this runs every step over
    # every instance: it is most of a large simulation's time)
    width = hi - lo
    has_w = width > 1e-12
    inv_w = 1.0 / np.maximum(width, 1e-12)
    safe_m = np.maximum(m, 1e-12)
    inv_m = 1.0 / safe_m
    queued = m > 1e-12
    w_plain = wt * np.where(queued, 1.0 - rho, 1.0)
    w_conv = wt * np.where(queued, rho, 0.0)
    goal = q * total

    def below(x: float) -> float:
        d = x - lo
        u = np.clip(d * inv_w, 0.0, 1.0)
        u = np.where(has_w, u, d >= 0.0)
        dl = np.maximum(d, 0.0)
        tail_lo = np.exp(-dl * inv_m)
        span = np.minimum(dl, width)
        conv = np.where(has_w, (span - safe_m * (np.exp((span - dl) * inv_m) - tail_lo)) * inv_w, 1.0 - tail_lo)
        conv = np.clip(conv, 0.0, 1.0)
        return float(w_plain @ u + w_conv @ conv)

    # to a thousandth of a millisecond or 0.01 % of the value (its lower bracket), whichever is
    # coarser: finer is noise next to the model, and each halving costs a pass over every instance
    while b - a > max(1e-3, 1e-4 * a):
        x = 0.5 * (a + b)
        if below(x) < goal:
            a = x
        else:
            b = x
    return 0.5 * (a + b)


def session_weights(vrouters: int, per_router: int, zipf: float, seed: int) -> FloatArray:
    """Each session's share of the load, as `simulate` draws them for a config and seed (the
    live evaluation sends with the same shares)."""
    return _weights(vrouters, per_router, zipf, np.random.default_rng(seed))


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
    pcfg = dict(policy_config or {})
    pcfg.setdefault("interval_s", cfg.interval_s)
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
    pcfg = dict(policy_config or {})
    pcfg.setdefault("interval_s", cfg.interval_s)
    return _Run(load, tables, policy, cfg, pcfg, forecasts, initial_instances).run()


class _Run:
    """One simulated run: the instance slots (state, queue, start and end times), where each
    session is, what is counted; a method per phase of a step - instances joining and leaving,
    serving, the latencies of the step's messages, the control loop's decision."""

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
        self.rng = np.random.default_rng(cfg.seed)
        self.prng = random.Random(cfg.seed)
        self.dt = cfg.step_s
        self.cap_step = cfg.capacity * self.dt
        self.max_q = cfg.capacity * cfg.max_queue_s
        self.slots = slots = cfg.nodes * cfg.instances_per_node
        self.state = np.full(slots, GONE, dtype=np.int8)
        self.ready_at = np.zeros(slots)
        self.started = np.zeros(slots)
        self.gone_at = np.zeros(slots)
        self.queue = np.zeros(slots)
        self.w = _weights(cfg.vrouters, cfg.sessions_per_vrouter, cfg.zipf, self.rng)
        self.n_sessions = self.w.size
        self.assign = np.full(self.n_sessions, -1, dtype=np.int64)
        self.free = list(range(slots))
        self.prng.shuffle(self.free)  # instances land on nodes at random
        if initial_instances is None:
            # warm start: what the policy asks for at t=0 is already running
            initial_instances = _initial(load, self.fn, cfg, pcfg, forecasts, int(self.w.size), float(tables[0]))
        for _ in range(max(initial_instances, cfg.min_instances)):
            self.start(0.0, ready=True)
        ready_ids = np.flatnonzero(self.state == READY)
        self.assign[:] = ready_ids[np.arange(self.n_sessions) % ready_ids.size]
        self.rebalance()  # the sessions were placed on live load as they came up
        steps = load.size
        self.tl_instances = np.zeros(steps)
        self.tl_p99 = np.zeros(steps)
        self.violations = 0.0
        self.instance_s = 0.0
        self.actions = 0
        self.lost = self.late = self.msgs = 0.0
        self.moves_total = 0
        self.pstate: dict[str, Any] = {}
        self.history: list[float] = []
        self.limits = _limits(cfg)
        self.lat: list[tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]] = []  # kept components
        self.last_decision = -math.inf
        self.last_in = -math.inf  # when the last scale-in was decided
        self.reversals = 0
        self.trusts: list[float] = []
        # (load share, pause ms left) of sessions being moved. A move takes a session from its
        # source between two batches, ahead of the source's queue: its messages queued there go
        # with it (to the back of the new instance's queue), and its new ones wait out the move.
        self.moved: list[tuple[float, float, int]] = []  # (share, pause ms left, the instance it went to)
        self.imbalance = 1.0  # busiest instance's arrivals over the mean, smoothed (what telemetry shows)
        self.service_ms = 1000.0 / cfg.capacity
        self.node_of = np.arange(slots) // cfg.instances_per_node
        self.stalled = np.zeros(cfg.nodes)  # seconds of this step each node's message path stops

    # -- instances and sessions ----------------------------------------------------------------

    def start(self, t: float, ready: bool = False) -> int:
        s = self.free.pop()
        self.state[s] = READY if ready else STARTING
        self.started[s] = t
        self.ready_at[s] = t if ready else t + self.cfg.start_latency_s
        self.queue[s] = 0.0
        return s

    def views(self) -> list[InstanceLoad]:
        ids = np.flatnonzero(self.state == READY)
        counts = np.bincount(self.assign[self.assign >= 0], minlength=self.slots)
        q, max_q = self.queue, self.max_q
        return [InstanceLoad(str(i), int(counts[i]), 1 << 30, int(q[i]), int(max_q), float(q[i] / max_q)) for i in ids]

    def rebalance(self) -> int:
        vs = self.views()
        members: dict[str, list[int]] = {v.instance_id: [] for v in vs}
        for vr in np.flatnonzero(self.assign >= 0):
            members.setdefault(str(self.assign[vr]), []).append(int(vr))
        # the multiplexer's rebalancing, with each session's message rate as its weight
        w = self.w
        moves = rebalance_moves(vs, members, weight_of=dict(enumerate(w.tolist())), max_moves=max(8, w.size // 4))
        for vr, dst in moves:
            self.assign[vr] = int(dst)
        return len(moves)

    def carry(self, before: npt.NDArray[np.int64], changed: npt.NDArray[np.int64]) -> None:
        """Moved sessions take their share (by rate) of their source's queue along."""
        w, queue = self.w, self.queue
        wsum = np.bincount(before, weights=w, minlength=self.slots)
        q = queue.copy()
        for vr in changed.tolist():
            src, dst = int(before[vr]), int(self.assign[vr])
            part = float(q[src]) * float(w[vr]) / max(float(wsum[src]), 1e-12)
            queue[src] -= part
            queue[dst] += part
            self.moved.append((float(w[vr]), 1000.0 * self.cfg.session_move_s, dst))
        np.maximum(queue, 0.0, out=queue)

    def rebalance_and_carry(self) -> None:
        before = self.assign.copy()
        self.moves_total += self.rebalance()
        self.carry(before, np.flatnonzero(before != self.assign))

    # -- a step ----------------------------------------------------------------------------------

    def run(self) -> SimResult:
        for k in range(self.load.size):
            self.step(k)
        return self.result()

    def step(self, k: int) -> None:
        cfg, dt = self.cfg, self.dt
        t = k * dt
        self.join_and_leave(t)
        rate = float(self.load[k])
        q0, arrivals, over, stall = self.serve(rate)
        p99 = self.account(k, rate, q0, arrivals, over, stall)
        alive = self.state != GONE
        n_alive = int(alive.sum())
        self.instance_s += n_alive * dt
        self.tl_instances[k] = n_alive
        self.history.append(rate)
        if t - self.last_decision >= cfg.interval_s - 1e-9:  # the control loop
            self.last_decision = t
            self.decide(k, t, rate, q0, arrivals, p99)

    def join_and_leave(self, t: float) -> None:
        """Instances that finished starting join, and take a share of the live sessions; drained
        ones are gone."""
        state = self.state
        joining = np.flatnonzero((state == STARTING) & (self.ready_at <= t))
        if joining.size:
            state[joining] = READY
            self.rebalance_and_carry()
        finished = np.flatnonzero((state == DRAINING) & (self.gone_at <= t))
        if finished.size:
            state[finished] = GONE
            self.free.extend(int(s) for s in finished)

    def serve(self, rate: float) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray | None]:
        """Arrivals, service and the queues: (queues before, arrivals, overflow, each instance's
        stall this step or None)."""
        dt, cap_step = self.dt, self.cap_step
        arrivals = np.bincount(self.assign, weights=self.w, minlength=self.slots) * rate * dt
        q0 = self.queue.copy()
        stall = self.stalled[self.node_of] if self.stalled.any() else None  # per instance: what it does not serve
        self.stalled[:] = 0.0
        q1 = q0 + arrivals - (cap_step if stall is None else cap_step * (1.0 - stall / dt))
        np.maximum(q1, 0.0, out=q1)
        over = np.maximum(q1 - self.max_q, 0.0)
        self.lost += float(over.sum())
        q1 -= over
        self.queue[:] = q1
        self.msgs += rate * dt
        return q0, np.asarray(arrivals, dtype=np.float64), np.asarray(over, dtype=np.float64), stall

    def account(
        self, k: int, rate: float, q0: FloatArray, arrivals: FloatArray, over: FloatArray, stall: FloatArray | None
    ) -> float:
        """The step's messages' latencies (a mixture of uniform components, each with its M/D/1
        wait): its p99, its late messages, and an SLO violation if the p99 is over."""
        cfg, dt = self.cfg, self.dt
        service_ms, q1 = self.service_ms, self.queue
        busy = np.flatnonzero(arrivals > 0)
        if busy.size > 1 and rate > 0:
            now_imb = float(arrivals.max() / max(arrivals[self.state == READY].mean(), 1e-12))
            self.imbalance = 0.9 * self.imbalance + 0.1 * now_imb
        lo = cfg.base_latency_ms + service_ms + 1000.0 * q0[busy] / cfg.capacity
        hi = cfg.base_latency_ms + service_ms + 1000.0 * q1[busy] / cfg.capacity
        wt: FloatArray = np.asarray(arrivals[busy] - over[busy], dtype=np.float64)
        if cfg.poisson_arrivals:
            # M/D/1: a message waits with probability rho, on average S / (2 (1 - rho)) when it does
            rho = np.minimum(arrivals[busy] / self.cap_step, 0.95)
            mw = service_ms / (2.0 * (1.0 - rho))
        else:
            rho = np.zeros(busy.size)
            mw = np.zeros(busy.size)
        if self.moved:
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
        p99 = _mixture_quantile(lo, hi, wt, 0.99, rho, mw) if wt.size else cfg.base_latency_ms
        if wt.size and float((hi + 12.0 * mw).max()) > cfg.slo_ms:
            self.late += float(wt.sum() - _mixture_cdf(cfg.slo_ms, lo, hi, wt, rho, mw).sum())
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
        cfg, dt, moved = self.cfg, self.dt, self.moved
        floor = cfg.base_latency_ms + self.service_ms
        step_ms = 1000.0 * dt
        share = np.array([m[0] for m in moved])
        pause = np.array([m[1] for m in moved])
        # those messages are counted here, not also at the instance they went to
        at = np.full(self.slots, -1, dtype=np.int64)
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
        cfg, state = self.cfg, self.state
        ready = state == READY
        n_ready = int(ready.sum())
        n_active = int(((state == READY) | (state == STARTING)).sum())
        served = np.minimum(q0 + arrivals, self.cap_step)
        util = float(served[ready].sum() / max(self.cap_step * n_ready, 1e-9))
        ctx = build_context(
            self.limits,
            now=t,
            current_instances=n_active,
            load=rate,
            load_history=self.history,
            inflight=float(self.queue.sum()),
            sessions=self.n_sessions,
            start_latency_s=cfg.start_latency_s,
            forecast=self.forecasts.at(k) if self.forecasts is not None else None,
            forecast_step_s=self.dt,
            instance_ages=(t - self.started[ready]).tolist(),
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
        starting_now: list[int] = []
        while n_active < want and self.free:
            starting_now.append(self.start(t))
            n_active += 1
            self.actions += 1
        if cfg.node_cpus > 0 and len(starting_now) >= cfg.node_cpus:
            # each start beyond the cores the path leaves free adds a stall (measured live:
            # 2, 3, 4 at once on 2 cores stall ~130, ~250, ~380 ms)
            at_once = np.bincount(self.node_of[starting_now], minlength=cfg.nodes)
            over = np.maximum(at_once - cfg.node_cpus + 1, 0)
            self.stalled[:] = np.minimum(over * cfg.start_stall_s, self.dt)
        if n_active > want and n_ready > 1:
            self.drain(t, n_active - want, n_ready)

    def drain(self, t: float, n: int, n_ready: int) -> None:
        """Drain up to `n` instances (always leaving one ready): their sessions, and their queued
        messages, move to the instances that stay; then the rest is evened out, as the VPSM does
        after a drain."""
        drained = False
        while n > 0 and n_ready > 1:
            victim = least_used(self.views())
            if victim is None:
                break
            v = int(victim)
            self.state[v] = DRAINING
            self.gone_at[v] = t + self.cfg.drain_s
            members = np.flatnonzero(self.assign == v)
            targets = self.views()
            before = self.assign.copy()
            for vr in members:
                dst = choose_instance(targets, self.prng)
                if dst is None:
                    break
                self.assign[vr] = int(dst)
                self.moves_total += 1
            self.carry(before, members[self.assign[members] != v])
            n -= 1
            n_ready -= 1
            self.actions += 1
            drained = True
        if drained:
            self.rebalance_and_carry()

    def result(self) -> SimResult:
        parts = list(zip(*self.lat, strict=True)) if self.lat else None
        if parts:
            all_lo, all_hi, all_w, all_rho, all_m = (np.concatenate(p) for p in parts)
        else:
            all_lo, all_hi, all_w, all_rho, all_m = np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1)
        return SimResult(
            policy=self.policy,
            slo_violation_s=self.violations,
            instance_s=self.instance_s,
            scale_actions=self.actions,
            lost=self.lost,
            late=self.late,
            messages=self.msgs,
            p99_ms=_mixture_quantile(all_lo, all_hi, all_w, 0.99, all_rho, all_m),
            session_moves=self.moves_total,
            timeline={"load": self.load, "instances": self.tl_instances, "p99_ms": self.tl_p99},
            reversals=self.reversals,
            forecast_trust=float(np.mean(self.trusts)) if self.trusts else None,
        )

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
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from apsv.frame import HEADER_LEN, ProtocolId
from apsv.runtime.host import Key
from apsv.scaling.latency import LATENCY_BINS_MS, merge, quantile
from apsv.scaling.simulator import Forecasts, SimConfig, SimResult, initial_instances, session_weights, simulate

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LiveConfig:
    speed: float = 0.5  # trace seconds per wall second (slow motion: half the Ray calls per trace second)
    peak_rate: float = 1000.0  # live messages per wall second at the trace's peak (2,000 at speed 1 saturates 2 cores)
    sessions_per_vrouter: int = 4
    vrouters: int = 50
    payload_bytes: int = 64
    batch_delay_s: float = 0.04  # each agent's batching delay, in trace seconds (wall: / speed)
    agents: int = 5  # agents (clients) the virtual routers are spread over
    # Batches an agent's client may have in flight, and its buffers. A buffer is free again when
    # the slowest instance its batch touches has answered its part: the window must outlast the
    # longest backlog an instance builds before scaling relieves it (seconds), or one backlogged
    # instance stalls the agent's traffic to every instance (head-of-line blocking).
    max_inflight: int = 240
    buffer_slots: int = 256
    buffer_bytes: int = 8 << 10
    cpu_per_instance: float = 0.05  # Ray logical CPUs an instance reserves
    max_steps: int | None = None  # replay only the first N steps of the evaluated part
    calibrate_s: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.speed <= 0 or self.peak_rate <= 0 or self.batch_delay_s <= 0:
            raise ValueError("speed, peak_rate and batch_delay_s must be positive")
        if self.vrouters < 1 or self.sessions_per_vrouter < 1:
            raise ValueError("need at least one virtual router with one session")
        if self.agents < 1:
            raise ValueError("need at least one agent")
        # A client never has more batches out than buffers: a larger window would be simulated
        # (`agent_window_ms`) but not run.
        if not 1 <= self.max_inflight <= self.buffer_slots:
            raise ValueError(f"max_inflight {self.max_inflight} must be 1 to buffer_slots ({self.buffer_slots})")
        if HEADER_LEN + self.payload_bytes > self.buffer_bytes:
            raise ValueError(f"a {self.payload_bytes}-octet message does not fit a {self.buffer_bytes}-octet buffer")


@dataclass
class Calibration:
    """What one live instance does, measured (wall units)."""

    delay_ms: float  # the echo stack's per-message service time
    capacity: float  # messages/s one instance serves
    base_latency_ms: float  # p50 latency at light load
    start_latency_s: float  # decision -> ready
    # a session's hand-over, mean: detached at its source -> adopted by the target, while its
    # frames wait (then re-sent to the target); measured as a second instance joins at light load
    move_s: float = 0.005
    moves: int = 0  # the moves that measured it (0: none happened, move_s is the default)
    node_cpus: int = 0  # this host's cores
    # the p99 latency added when `node_cpus` instances start at once (over one starting alone)
    start_stall_s: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {k: v if isinstance(v, int) else round(float(v), 4) for k, v in self.__dict__.items()}


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


# ------------------------------------------------------------------------------------------------
# the sender


class Sender:
    """Sends a trace's messages on schedule to weighted sessions through several agents' clients
    (each virtual router belongs to one agent, as in a deployment).

    An agent never blocks: a message its client cannot take yet (every buffer in flight) waits
    in that agent's backlog, stamped with its arrival time, and is offered to the multiplexer's
    load count at once - as a real agent's socket buffers hold what the cluster cannot take yet.
    So one overloaded instance holds back the agents whose batches wait on it, not the sender.
    """

    def __init__(self, clients: list[Any], keys: list[Key], weights: FloatArray, payload: bytes, seed: int) -> None:
        self.clients = clients
        self.keys = keys
        self.agent = [(k[1] - 1) % len(clients) for k in keys]  # by virtual router
        self.cum = np.cumsum(weights / weights.sum())
        self.payload = payload
        self.rng = np.random.default_rng(seed)
        self.carry = 0.0
        self.sent = 0
        self.backlog: list[deque[tuple[int, int]]] = [deque() for _ in clients]
        self.max_backlog = 0

    def _pump(self) -> None:
        size = len(self.payload)
        for c, q in zip(self.clients, self.backlog, strict=True):
            while q and c.can_send(size):
                rx, i = q.popleft()
                c.send(self.keys[i], self.payload, rx_ns=rx, offered=True)
            c.service()

    def run(
        self,
        live_per_step: Sequence[float],
        origin: float,
        speed: float,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """Step k's messages arrive spread over [origin + k/speed, origin + (k+1)/speed)."""
        keys = self.keys
        for k, n_f in enumerate(live_per_step):
            self.carry += float(n_f)
            n = int(self.carry)
            self.carry -= n
            t0 = origin + k / speed
            due = t0 + (np.arange(n) + self.rng.random(n)) / (n * speed) if n else np.zeros(0)
            who = np.minimum(np.searchsorted(self.cum, self.rng.random(n) * self.cum[-1]), len(keys) - 1)
            j = 0
            end = t0 + 1.0 / speed
            while True:
                now = time.time()
                while j < n and due[j] <= now:
                    i = int(who[j])
                    a = self.agent[i]
                    self.clients[a].offer(keys[i])
                    self.backlog[a].append((int(due[j] * 1e9), i))
                    j += 1
                self._pump()
                self.max_backlog = max(self.max_backlog, *(len(q) for q in self.backlog))
                if j >= n and now >= end:
                    break
                time.sleep(0.001)
            self.sent += n
            if on_step is not None:
                on_step(k)

    def finish(self) -> None:
        """Send every backlogged message and wait for every batch in flight."""
        while any(self.backlog):
            self._pump()
            time.sleep(0.001)
        for c in self.clients:
            c.drain()
        # output produced outside the batches' replies (sessions moved in or restored) comes by poll
        deadline = time.time() + 10.0
        while self.outputs < self.sent and time.time() < deadline:
            time.sleep(0.05)
            for c in self.clients:
                c.poll()

    @property
    def outputs(self) -> int:
        return sum(c.stats.outputs for c in self.clients)

    def close(self) -> None:
        for c in self.clients:
            c.close()


def _clients(im: Any, live: LiveConfig) -> list[Any]:
    from apsv.runtime.buffer_pool import BufferPool
    from apsv.runtime.client import OffloadClient

    return [
        OffloadClient(
            im,
            BufferPool(slots=live.buffer_slots, slot_bytes=live.buffer_bytes, shared=True),
            max_inflight=live.max_inflight,
            max_batch_delay_s=live.batch_delay_s / live.speed,
            metrics_label=f"live-agent-{a}",
        )
        for a in range(live.agents)
    ]


def _open(clients: list[Any], keys: list[Key], config: dict[str, Any]) -> None:
    for a, c in enumerate(clients):
        mine = [k for k in keys if (k[1] - 1) % len(clients) == a]
        placed = c.open_sessions([(k, "echo", config, 0) for k in mine])
        refused = [v for v in placed.values() if v.startswith("error")]
        if refused:
            raise RuntimeError(f"{len(refused)} sessions refused: {refused[0]}")


# ------------------------------------------------------------------------------------------------
# one policy, live


def _plan(
    policy: str, policy_config: Mapping[str, Any], cfg: SimConfig, live: LiveConfig, capacity_trace: float
) -> Any:
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import ProtocolPlan

    return ProtocolPlan(
        "echo",
        backend="process",
        min_instances=cfg.min_instances,
        max_instances=cfg.max_instances,
        allocation=Allocation(cpu=live.cpu_per_instance, memory_bytes=256 << 20, buffer_quota_bytes=4 << 20),
        policy=policy,
        policy_config=dict(policy_config),
        capacity_per_instance=capacity_trace,
        slo_ms=cfg.slo_ms,
    )


def _keys(live: LiveConfig) -> list[Key]:
    return [
        (1, vr, int(ProtocolId.ECHO), sid)
        for vr in range(1, live.vrouters + 1)
        for sid in range(1, live.sessions_per_vrouter + 1)
    ]


_RUNS = iter(range(1, 1_000_000))


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
    from apsv.scaling.clock import ReplayClock

    peak = float(test.max()) or 1.0
    rate_scale = live.peak_rate / (peak * live.speed)  # live messages per trace message
    capacity_trace = cal.capacity / (rate_scale * live.speed)
    pcfg = dict(policy_config or {})
    pcfg.setdefault("interval_s", cfg.interval_s)
    plan = _plan(policy, pcfg, cfg, live, capacity_trace)
    dep = deploy([plan], interval_s=cfg.interval_s / live.speed, run_loop=False, suffix=f"-live-{next(_RUNS)}")
    try:
        sim_cfg = replace(cfg, capacity=capacity_trace, start_latency_s=cal.start_latency_s * live.speed)
        n0 = initial_instances(
            test,
            policy,
            sim_cfg,
            policy_config=pcfg,
            forecasts=forecasts,
            sessions=len(_keys(live)),
            table_backlog=float(table_backlog[0]) if table_backlog is not None and table_backlog.size else 0.0,
        )
        ray.get(dep.vpsm.scale_to.remote("echo", n0))
        keys = _keys(live)
        clients = _clients(dep.multiplexer, live)
        _open(clients, keys, {"delay_ms": cal.delay_ms})
        weights = session_weights(live.vrouters, live.sessions_per_vrouter, cfg.zipf, cfg.seed)
        sender = Sender(clients, keys, weights, bytes(live.payload_bytes), live.seed)
        actions0 = ray.get(dep.vpsm.scale_actions.remote()).get("echo", 0)
        moves0 = int(ray.get(dep.multiplexer.stats.remote())["moves"])
        origin = time.time() + 0.2
        clock = ReplayClock(
            origin,
            live.speed,
            rate_scale,
            forecasts=forecasts,
            future=tuple(float(x) for x in test.tolist()),
            tables=() if table_backlog is None else tuple(float(x) for x in table_backlog[: test.size].tolist()),
        )
        ray.get(dep.vpsm.set_clock.remote("echo", clock))
        ray.get(dep.vpsm.start.remote(True))
        steps = int(test.size)
        sender.run(
            (test * rate_scale).tolist(),
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
    finally:
        dep.stop()
    rows = [r for r in rows if r["ts"] <= end + 1.0 / live.speed]
    t = np.array([r["t"] for r in rows], dtype=np.float64)
    dur = np.diff(np.append(t, steps if t.size == 0 else max(float(t[-1]) + cfg.interval_s, steps)))
    dur = np.clip(dur, 0.0, None)
    p99 = np.array([r["p99_ms"] if r["p99_ms"] is not None else 0.0 for r in rows], dtype=np.float64)
    inside = (t >= 0) & (t < steps)
    hist = merge(rows)
    return LiveResult(
        policy=policy,
        slo_violation_s=float(dur[inside & (p99 > cfg.slo_ms)].sum()),
        instance_s=float(inst_wall * live.speed),
        scale_actions=int(actions),
        lost=int(sender.sent - outputs),
        late=int(sum(int(r["late"]) for r in rows)),
        messages=int(sender.sent),
        p99_ms=quantile(hist, 0.99),
        session_moves=moves,
        timeline={
            "t": t,
            # billed instances (starting and draining included), as the simulator's timeline counts
            "instances": np.array([r.get("billed", r["instances"]) for r in rows], dtype=np.float64),
            "load": np.array([r["load"] for r in rows], dtype=np.float64),
            "p99_ms": p99,
        },
        latency_hist=hist,
    )


# ------------------------------------------------------------------------------------------------
# calibration


def calibrate(cfg: SimConfig, live: LiveConfig, test: FloatArray) -> Calibration:
    """Measure one instance's service rate at the per-message delay the trace asks for, the
    latency floor at light load, and the start latency."""
    import ray

    from apsv.runtime.cluster import deploy

    peak = float(test.max()) or 1.0
    # the per-instance rate the configured capacity becomes live
    target = cfg.capacity * live.peak_rate / peak
    delay_ms = 1000.0 / target
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # the stall is measured only where the simulator could see one: `cpus` starts at once
    measure_stall = 2 + cpus <= cfg.max_instances
    plan = _plan(
        "fixed",
        {"instances": 1},
        replace(cfg, min_instances=1, max_instances=max(cfg.max_instances, 3)),
        live,
        cfg.capacity,
    )
    dep = deploy([plan], interval_s=1.0, run_loop=False, suffix=f"-live-{next(_RUNS)}")
    try:
        starts = []
        for _ in range(2):  # a second instance started and stopped: its start latency, warm
            t0 = time.perf_counter()
            ray.get(dep.vpsm.scale_to.remote("echo", 2))
            starts.append(time.perf_counter() - t0)
            ray.get(dep.vpsm.scale_to.remote("echo", 1))
        handles = ray.get(dep.vpsm.instance_handles.remote())
        (inst,) = handles.values()
        keys = _keys(live)
        clients = _clients(dep.multiplexer, live)
        _open(clients, keys, {"delay_ms": delay_ms})
        w = session_weights(live.vrouters, live.sessions_per_vrouter, cfg.zipf, cfg.seed)
        sender = Sender(clients, keys, w, bytes(live.payload_bytes), live.seed)
        # light load (20 %): the latency floor; meanwhile a second instance joins and takes a
        # share of the live sessions: how long a move holds a session's frames
        ray.get(inst.load.remote())
        m0 = ray.get(dep.multiplexer.stats.remote())
        joining = dep.vpsm.scale_to.remote("echo", 2)
        secs = max(1, int(live.calibrate_s / 2))
        sender.run([0.2 * target] * secs, time.time() + 0.05, 1.0)
        ray.get(joining)
        sender.finish()
        light = ray.get(inst.load.remote())
        base = float(np.percentile(light["latency_ms"], 50)) if len(light["latency_ms"]) else 1.0
        m1 = ray.get(dep.multiplexer.stats.remote())
        moves = int(m1["moves"]) - int(m0["moves"])
        move_s = (float(m1["move_seconds"]) - float(m0["move_seconds"])) / moves if moves else 0.005
        stall_s = 0.0
        if measure_stall:
            # As many instances starting at once as the host has cores: Ray starts a worker
            # process for each, CPU-bound for the start latency, and the message path (agents and
            # instances) loses its core meanwhile. The p99 while they start, over the p99 while one
            # starts (same load, same window, its moves included in both), is the stall the
            # simulator models (`start_stall_s`).
            def p99_while_scaling_to(n: int) -> float:
                for h in ray.get(dep.vpsm.instance_handles.remote()).values():
                    ray.get(h.load.remote())  # drop what they measured so far
                scaling = dep.vpsm.scale_to.remote("echo", n)
                sender.run([target] * 2, time.time() + 0.05, 1.0)  # 2 s, half of what 2 instances serve
                ray.get(scaling)
                sender.finish()
                lat = [
                    np.asarray(ray.get(h.load.remote())["latency_ms"])
                    for h in ray.get(dep.vpsm.instance_handles.remote()).values()
                ]
                both = np.concatenate(lat) if lat else np.zeros(0)
                return float(np.percentile(both, 99)) if both.size else 0.0

            one = p99_while_scaling_to(3)  # 2 -> 3: one start
            ray.get(dep.vpsm.scale_to.remote("echo", 2))
            many = p99_while_scaling_to(2 + cpus)  # 2 -> 2 + cpus: as many as there are cores
            stall_s = max(0.0, many - one) / 1000.0
        ray.get(dep.vpsm.scale_to.remote("echo", 1))
        (inst,) = ray.get(dep.vpsm.instance_handles.remote()).values()
        # overload (150 %): the service rate, from what the instance's sessions applied over the
        # period (it holds them all, none moves; `frames_in` also counts frames it refused or
        # dropped as repeats, which cost no service time)
        f0, t0 = int(ray.get(inst.load.remote())["session_frames"]), time.time()
        sender.run([1.5 * target] * int(live.calibrate_s), time.time() + 0.05, 1.0)
        heavy = ray.get(inst.load.remote())
        capacity = (int(heavy["session_frames"]) - f0) / max(time.time() - t0, 1e-6)
        sender.finish()
        sender.close()
    finally:
        dep.stop()
    return Calibration(delay_ms, capacity, base, float(np.median(starts)), move_s, moves, cpus, stall_s)


# ------------------------------------------------------------------------------------------------
# sim and live, side by side


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
    peak = float(test.max()) or 1.0
    rate_scale = live.peak_rate / (peak * live.speed)
    # The simulator runs in live units - the trace times rate_scale, an instance's live rate -
    # so a message's service time is the live one: the queueing of random arrivals grows with
    # it, and a live message stands for 1/rate_scale of the trace's. (The policies read ratios:
    # their decisions do not change with the unit.)
    sim_cfg = replace(
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
    results: dict[str, LiveResult] = {}
    sims: dict[str, SimResult] = {}
    sim_fc = (
        Forecasts(forecasts.every, {q: v * rate_scale for q, v in forecasts.values.items()})
        if forecasts is not None
        else None
    )
    used: dict[str, dict[str, Any]] = {}  # each policy's configuration as run (live units added)
    for p in policies:
        pc = dict(configs.get(p, {}))
        # one live message's service time in trace ms: the queueing the policies allow for is
        # the live instances', whichever unit (trace or live messages) the capacity is counted in
        pc.setdefault("service_ms", 1000.0 * live.speed / cal.capacity)
        if "fixed_latency_ms" in pc or p in ("predictive", "oracle"):
            # the latency every message has here whatever the load (trace ms): the measured floor
            # and the agents' batching wait - the SLO's budget for queueing is what they leave.
            # Measured, so it replaces the offline evaluation's figure for its modelled system.
            pc["fixed_latency_ms"] = sim_cfg.base_latency_ms + sim_cfg.batch_delay_ms
        used[p] = dict(pc)
        sim_pc = {k: (v * rate_scale if k == "peak_load" else v) for k, v in pc.items()}
        sims[p] = simulate(
            test * rate_scale,
            p,
            sim_cfg,
            policy_config=sim_pc,
            forecasts=sim_fc,
            table_backlog=None if tables is None else tables * rate_scale,
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
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = trace.replace(":", "_").replace("/", "_")
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
    fig.tight_layout()
    paths.append(out_dir / f"{name}-live-instances.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    mids = np.sqrt(LATENCY_BINS_MS[:-1] * LATENCY_BINS_MS[1:])
    for p, r in live.items():
        if r.latency_hist.sum():
            ax.plot(mids, np.cumsum(r.latency_hist) / r.latency_hist.sum(), label=p)
    slo = float(res["sim_config"].slo_ms)
    ax.axvline(slo, color="red", ls="--", lw=0.8, label="SLO")
    ax.set_xscale("log")
    ax.set_xlabel("message latency, live (trace ms)")
    ax.set_ylabel("fraction of messages")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"{name}-live-latency-cdf.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths

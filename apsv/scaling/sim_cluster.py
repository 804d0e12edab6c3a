"""The simulated cluster: instance slots on nodes (state, queue, start and end times), which
instance each session is on, and what changes them - starts, joins, rebalancing, drains - placed
with the multiplexer's own code (`apsv.scaling.placement`).

Each instance serves a bounded FIFO at `capacity` messages/s; a moved session takes its share of
its source's queue along; starting `node_cpus` or more instances at once on a node stalls that
node's message path (`SimConfig.start_stall_s`)."""

from __future__ import annotations

import random

import numpy as np
import numpy.typing as npt

from apsv.scaling.placement import InstanceLoad, choose_instance, least_used, rebalance_moves
from apsv.scaling.sim_config import FloatArray, SimConfig

STARTING, READY, DRAINING, GONE = 0, 1, 2, 3


def session_weights(vrouters: int, per_router: int, zipf: float, seed: int) -> FloatArray:
    """Each session's share of the load: Zipf over routers, even within a router, as `simulate`
    draws them for a config and seed (the live evaluation sends with the same shares)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, vrouters + 1) ** zipf
    rng.shuffle(w)
    return np.asarray(np.repeat(w / w.sum() / per_router, per_router), dtype=np.float64)


class Cluster:
    """The instance slots (`nodes` x `instances_per_node`), their states and queues, each
    session's instance (`assign`, -1: none), and the sessions being moved."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
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
        self.w = session_weights(cfg.vrouters, cfg.sessions_per_vrouter, cfg.zipf, cfg.seed)
        self.n_sessions = self.w.size
        self.assign = np.full(self.n_sessions, -1, dtype=np.int64)
        self.free = list(range(slots))
        self.prng.shuffle(self.free)  # instances land on nodes at random
        self.moves = 0  # sessions moved so far
        # (load share, pause ms left) of sessions being moved. A move takes a session from its
        # source between two batches, ahead of the source's queue: its messages queued there go
        # with it (to the back of the new instance's queue), and its new ones wait out the move.
        self.moved: list[tuple[float, float, int]] = []  # (share, pause ms left, the instance it went to)
        self.node_of = np.arange(slots) // cfg.instances_per_node
        self.stalled = np.zeros(cfg.nodes)  # seconds of this step each node's message path stops

    def warm_start(self, n: int) -> None:
        """`n` instances ready at t=0 with the sessions spread over them, rebalanced (the sessions
        were placed on live load as they came up; not counted as moves)."""
        for _ in range(n):
            self.start(0.0, ready=True)
        ready_ids = np.flatnonzero(self.state == READY)
        self.assign[:] = ready_ids[np.arange(self.n_sessions) % ready_ids.size]
        self.rebalance()

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
        self.moves += self.rebalance()
        self.carry(before, np.flatnonzero(before != self.assign))

    # -- a step ----------------------------------------------------------------------------------

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
        """Arrivals, service and the queues: (queues before, arrivals, overflow - lost -, each
        instance's stall this step or None)."""
        dt, cap_step = self.dt, self.cap_step
        arrivals = np.bincount(self.assign, weights=self.w, minlength=self.slots) * rate * dt
        q0 = self.queue.copy()
        stall = self.stalled[self.node_of] if self.stalled.any() else None  # per instance: what it does not serve
        self.stalled[:] = 0.0
        q1 = q0 + arrivals - (cap_step if stall is None else cap_step * (1.0 - stall / dt))
        np.maximum(q1, 0.0, out=q1)
        over = np.maximum(q1 - self.max_q, 0.0)
        q1 -= over
        self.queue[:] = q1
        return q0, np.asarray(arrivals, dtype=np.float64), np.asarray(over, dtype=np.float64), stall

    # -- scaling ---------------------------------------------------------------------------------

    def scale_out(self, t: float, n: int) -> int:
        """Start up to `n` instances (as many as there are free slots); the number started.
        Starts beyond the cores a node's message path leaves free stall that path next step."""
        cfg = self.cfg
        starting_now = [self.start(t) for _ in range(min(n, len(self.free)))]
        if cfg.node_cpus > 0 and len(starting_now) >= cfg.node_cpus:
            # each start beyond the cores the path leaves free adds a stall (measured live:
            # 2, 3, 4 at once on 2 cores stall ~130, ~250, ~380 ms)
            at_once = np.bincount(self.node_of[starting_now], minlength=cfg.nodes)
            over = np.maximum(at_once - cfg.node_cpus + 1, 0)
            self.stalled[:] = np.minimum(over * cfg.start_stall_s, self.dt)
        return len(starting_now)

    def drain(self, t: float, n: int, n_ready: int) -> int:
        """Drain up to `n` instances (always leaving one ready): their sessions, and their queued
        messages, move to the instances that stay; then the rest is evened out, as the VPSM does
        after a drain. The number drained."""
        drained = 0
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
                self.moves += 1
            self.carry(before, members[self.assign[members] != v])
            n -= 1
            n_ready -= 1
            drained += 1
        if drained:
            self.rebalance_and_carry()
        return drained

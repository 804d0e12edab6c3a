"""The agents of a live replay: their offload clients, the sessions they open, and the sender
that delivers a trace's messages through them on schedule."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from apsv.evaluation.live_testbed import FloatArray, LiveConfig, session_keys
from apsv.runtime.host import Key
from apsv.scaling.simulator import SimConfig, session_weights


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


def agent_clients(multiplexer: Any, live: LiveConfig) -> list[Any]:
    """One offload client per agent, each with a shared buffer pool of its own."""
    from apsv.runtime.buffer_pool import BufferPool
    from apsv.runtime.client import OffloadClient

    return [
        OffloadClient(
            multiplexer,
            BufferPool(slots=live.buffer_slots, slot_bytes=live.buffer_bytes, shared=True),
            max_inflight=live.max_inflight,
            max_batch_delay_s=live.batch_delay_s / live.speed,
            metrics_label=f"live-agent-{a}",
        )
        for a in range(live.agents)
    ]


def open_sessions(clients: list[Any], keys: list[Key], config: dict[str, Any]) -> None:
    """Each agent opens the echo sessions of its virtual routers; any refusal is an error."""
    for a, c in enumerate(clients):
        mine = [k for k in keys if (k[1] - 1) % len(clients) == a]
        placed = c.open_sessions([(k, "echo", config, 0) for k in mine])
        refused = [v for v in placed.values() if v.startswith("error")]
        if refused:
            raise RuntimeError(f"{len(refused)} sessions refused: {refused[0]}")


def connect_sender(multiplexer: Any, cfg: SimConfig, live: LiveConfig, delay_ms: float) -> Sender:
    """The agents' clients with every session open (echo stacks serving `delay_ms` a message),
    and a sender over them weighting the sessions as the simulator does (same Zipf, same seed)."""
    keys = session_keys(live)
    clients = agent_clients(multiplexer, live)
    open_sessions(clients, keys, {"delay_ms": delay_ms})
    weights = session_weights(live.vrouters, live.sessions_per_vrouter, cfg.zipf, cfg.seed)
    return Sender(clients, keys, weights, bytes(live.payload_bytes), live.seed)

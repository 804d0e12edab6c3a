"""Instances: starting, registering, draining and destroying them, and the mover that runs each
protocol's session moves one job at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime.instance import create_instance
from apsv.runtime.pending import PendingStart
from apsv.runtime.vpsm.base import Parts
from apsv.runtime.vpsm.plan import Managed, ProtocolPlan

log = logging.getLogger("apsv.vpsm")
# Instance start latencies kept per protocol (their median is the one the policy plans with)
START_LATENCY_SAMPLES = 100


class Instances(Parts):
    """Part of the `VPSM` actor (actor.py): its instances."""

    async def scale_to(self, protocol: str, n: int) -> int:
        """Force a protocol to n instances now (drains on the way down). Returns the new count."""
        async with self._lock:
            await self._settle(protocol)
            self.desired[protocol] = self._bounded(self.plans[protocol], n)
            await self._scale(self.plans[protocol], n, "forced")
            return self._count(protocol)

    async def drain(self, instance_id: str, replace: bool = True) -> int:
        """Move every session off an instance and destroy it (an operator's drain, e.g. for host
        maintenance); with `replace`, start a new instance first so capacity stays. Returns the
        sessions moved."""
        async with self._lock:
            m = self.managed[instance_id]
            plan = self.plans[m.protocol]
            await self._settle(m.protocol)
            if instance_id not in self.managed:
                return 0  # the control loop had already drained it
            if replace or self._count(m.protocol) <= plan.min_instances:
                await self._instantiate(plan, f"replacing {instance_id}")
            await self.im.set_accepting.remote(instance_id, False)
            before = len(self.events)
            await self._destroy(m, drain=True)
            return int(self.events[-1]["moved"]) if len(self.events) > before else 0

    async def reap(self) -> list[str]:
        """Forget instances whose actor died (having the multiplexer recover their sessions now,
        if it has not already) and bring each protocol back to its minimum. The control loop does
        this every step; returns the dead instances' ids."""
        async with self._lock:
            return await self._reap()

    async def _reap(self, known_dead: list[str] | None = None) -> list[str]:
        dead = list(known_dead or [])
        if known_dead is None:
            for iid, m in list(self.managed.items()):
                try:
                    await m.handle.ready.remote()
                except (RayActorError, RayTaskError):
                    dead.append(iid)
        for iid in dead:
            gone = self.managed.pop(iid, None)
            if gone is None:
                continue
            self.lifetimes.append((gone.protocol, gone.requested, time.time()))
            await self.im.report_dead.remote(iid)
            await self.im.remove_instance.remote(iid)
            self.events.append({"ts": time.time(), "event": "reaped", "instance": iid})
        for plan in self.plans.values():
            missing = plan.min_instances - self._count(plan.protocol)
            if missing > 0:
                # all at once: with every instance of a protocol dead, its sessions wait for the
                # first replacement (the multiplexer places them on it as it registers). A start
                # that fails (Ray placing it on the node that just died) is retried by the next
                # step's policy, which sees the protocol below its minimum.
                created = await asyncio.gather(*(self._create(plan) for _ in range(missing)), return_exceptions=True)
                for c in created:
                    if isinstance(c, BaseException):
                        log.error("replacing a dead %s instance failed: %r", plan.protocol, c)
                        self.events.append(
                            {"ts": time.time(), "event": "start-failed", "protocol": plan.protocol, "error": repr(c)}
                        )
                        continue
                    await self._register(plan, c, "replacing a dead instance")
                if dead:
                    self._enqueue(plan.protocol, "rebalance")
        return dead

    async def _scale(self, plan: ProtocolPlan, desired: int, reason: str, background: bool = False) -> None:
        """Make it `desired` instances (within the plan's bounds). Called with the lock held.

        With `background` (the control loop), new instances start in a task of their own and
        drains and rebalancing go to the protocol's mover: the loop keeps observing and deciding
        meanwhile, counting starting instances as there and draining ones as gone, as they will
        be by the time it could ask again. Without it (operators' calls), all is done on return."""
        p = plan.protocol
        desired = max(plan.min_instances, min(plan.max_instances, desired))
        missing = desired - self._active(p)
        if missing > 0:
            self.actions[p] = self.actions.get(p, 0) + missing
            self._metrics.action(p, "up", missing)
            if background:
                self._starting[p] = self._starting.get(p, 0) + missing
                task = asyncio.get_running_loop().create_task(self._grow(plan, missing, reason))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                # all at once: n instances start in about one start latency, not n of them
                created = await asyncio.gather(*(self._create(plan) for _ in range(missing)))
                for c in created:
                    await self._register(plan, c, reason)
                await self._rebalance(p)
        # Choose every instance to remove first and stop placing sessions on them, so each
        # session moves once, straight to an instance that stays. Instances still starting are
        # left to start; at least one ready instance stays.
        victims: list[str] = []
        while self._active(p) - len(victims) > desired and self._count(p) - len(victims) > 1:
            victim = await self.im.least_used.remote(p)
            if victim is None or victim not in self.managed or victim in victims:
                break
            await self.im.set_accepting.remote(victim, False)
            victims.append(victim)
        for victim in victims:
            self.actions[p] = self.actions.get(p, 0) + 1
            self._metrics.action(p, "down", 1)
            if background:
                self.managed[victim].draining = True
                self._enqueue(p, "drain", victim)
            else:
                await self._destroy(self.managed[victim], drain=True)
        if victims:
            # drained sessions were placed one by one: even out what they upset
            if background:
                self._enqueue(p, "rebalance")
            else:
                await self._rebalance(p)

    async def _grow(self, plan: ProtocolPlan, n: int, reason: str) -> None:
        """Start `n` instances together; each is registered (and takes sessions) as soon as it
        is ready, not when the slowest is: one that Ray cannot place must not hold the others."""
        await asyncio.gather(*(self._start_one(plan, reason) for _ in range(n)))

    async def _start_one(self, plan: ProtocolPlan, reason: str) -> None:
        p = plan.protocol
        try:
            created = await self._create(plan)
        except asyncio.CancelledError:
            self._starting[p] -= 1
            raise
        except Exception as e:
            self._starting[p] -= 1
            log.error("starting a %s instance failed: %r", p, e)
            self.events.append({"ts": time.time(), "event": "start-failed", "protocol": p, "error": repr(e)})
            return
        try:
            async with self._lock:
                self._starting[p] -= 1
                await self._register(plan, created, reason)
                # New capacity takes a share of the live sessions now, not only of future ones.
                self._enqueue(p, "rebalance")
        except asyncio.CancelledError:  # shut down between ready and registered: not left running
            ray.kill(created[1])
            raise

    def _enqueue(self, protocol: str, kind: str, instance_id: str | None = None) -> None:
        """Queue a session-moving job for the protocol's mover (starting it if idle). A
        rebalance already waiting covers a new one: it will see the instances as they are then."""
        q = self._jobs[protocol]
        if kind == "rebalance" and q and q[-1] == ("rebalance", None):
            return  # (one queued before a drain would not see the drained sessions)
        q.append((kind, instance_id))
        task = self._movers.get(protocol)
        if task is None or task.done():
            # (get_event_loop: also called from __init__, on the actor's loop, when resuming a drain)
            self._movers[protocol] = asyncio.get_event_loop().create_task(self._move(protocol))

    async def _move(self, protocol: str) -> None:
        """The protocol's mover: its jobs one at a time, in order. A failed job is logged and
        counted; a drain that failed gives the instance back to the pool (it still serves)."""
        q = self._jobs[protocol]
        while q:
            kind, iid = q.popleft()
            try:
                if kind == "drain":
                    m = self.managed.get(iid or "")
                    if m is not None:
                        await self._destroy(m, drain=True)
                else:
                    await self._rebalance(protocol)
            except Exception as e:  # the mover must go on with the next job
                self.move_errors += 1
                log.exception("%s job on %s failed", kind, iid or protocol)
                self.events.append({"ts": time.time(), "event": f"{kind}-failed", "instance": iid, "error": repr(e)})
                m = self.managed.get(iid or "")
                if kind == "drain" and m is not None:
                    m.draining = False
                    with contextlib.suppress(Exception):
                        await self.im.set_accepting.remote(m.instance_id, True)

    async def _settle(self, protocol: str) -> None:
        """Wait until the protocol's mover has no job left."""
        task = self._movers.get(protocol)
        while task is not None and not task.done():
            await asyncio.shield(task)
            task = self._movers.get(protocol)

    async def _rebalance(self, protocol: str) -> None:
        moved = await self.im.rebalance.remote(protocol, self.plans[protocol].rebalance_by != "sessions")
        self.events.append({"ts": time.time(), "event": "rebalance", "protocol": protocol, "moved": moved})

    async def _instantiate(self, plan: ProtocolPlan, reason: str) -> str:
        return await self._register(plan, await self._create(plan), reason)

    async def _create(self, plan: ProtocolPlan) -> tuple[str, Any, dict[str, Any], float, float]:
        """Start one instance and wait until it answers: (id, handle, info, start latency, requested)."""
        iid = f"{plan.protocol}-{self._next_id}"
        self._next_id += 1
        self._save()  # the id is spent even if this VPSM dies before the instance is registered
        requested = time.time()
        t0 = time.perf_counter()
        handle = create_instance(
            iid,
            plan.protocol,
            plan.backend,
            plan.allocation,
            deployment=self.multiplexer_name,
            namespace=self.namespace,
            image=self._images.get(plan.protocol),
            resources=self.instance_resources,
        )
        demand = {"CPU": plan.allocation.cpu, "memory": float(plan.allocation.memory_bytes)}
        self.pending.add(PendingStart(iid, plan.protocol, handle, requested, demand))
        try:
            info = await handle.ready.remote()
        except BaseException:
            ray.kill(handle)
            self.lifetimes.append((plan.protocol, requested, time.time()))
            raise
        finally:
            self.pending.done(iid)
        return iid, handle, info, time.perf_counter() - t0, requested

    async def _register(
        self, plan: ProtocolPlan, created: tuple[str, Any, dict[str, Any], float, float], reason: str
    ) -> str:
        iid, handle, info, latency, requested = created
        await self.im.register_instance.remote(
            iid,
            handle,
            plan.protocol,
            plan.allocation.buffer_quota_bytes,
            plan.allocation.max_sessions,
            info["node_id"],
            info["endpoint"],
        )
        self.managed[iid] = Managed(iid, handle, plan.protocol, time.time(), latency, requested=requested)
        self.start_latencies.setdefault(plan.protocol, deque(maxlen=START_LATENCY_SAMPLES)).append(latency)
        self.events.append(
            {"ts": time.time(), "event": "instantiate", "instance": iid, "start_s": latency, "reason": reason}
        )
        return iid

    async def _destroy(self, m: Managed, drain: bool) -> None:
        moved = 0
        if drain:
            moved = await self.im.drain_instance.remote(m.instance_id)
        try:
            await self.im.remove_instance.remote(m.instance_id)
        except Exception:
            log.exception("deregistering %s", m.instance_id)
        with contextlib.suppress(Exception):  # already dead: nothing to stop
            await m.handle.shutdown.remote()
        ray.kill(m.handle)
        if self.managed.pop(m.instance_id, None) is not None:
            self.lifetimes.append((m.protocol, m.requested, time.time()))
        self.events.append({"ts": time.time(), "event": "destroy", "instance": m.instance_id, "moved": moved})

    async def _alive(self, instance_id: str) -> bool:
        try:
            m = self.managed.get(instance_id)
            if m is None:
                return False
            await m.handle.ready.remote()
            return True
        except (RayActorError, RayTaskError):
            return False

    def _imbalance(self, protocol: str, shares: list[float]) -> float:
        """The busiest instance's share of the traffic over the mean share, smoothed (as the
        simulator does). A share is the sum of the instance's sessions' frame counts - the
        weights the multiplexer rebalances by - not the interval's throughput: the busiest of a
        dozen instances' noisy per-second rates is above the mean even when the sessions are
        spread perfectly, and that bias would buy instances the load does not need."""
        prev = self._imbalances.get(protocol, 1.0)
        if len(shares) > 1 and sum(shares) > 0:
            prev = 0.9 * prev + 0.1 * (max(shares) / (sum(shares) / len(shares)))
            self._imbalances[protocol] = prev
        return prev

    def _active(self, protocol: str) -> int:
        """Ready instances plus those starting."""
        return self._count(protocol) + self._starting.get(protocol, 0)

    def _billed(self, protocol: str) -> int:
        """Instances that cost: ready, starting and being drained."""
        return sum(1 for m in self.managed.values() if m.protocol == protocol) + self._starting.get(protocol, 0)

    def _count(self, protocol: str) -> int:
        """Ready instances, not counting those being drained away."""
        return sum(1 for m in self.managed.values() if m.protocol == protocol and not m.draining)

    def _start_latencies(self) -> dict[str, float]:
        return {p: self._start_latency(p) for p in self.plans}

    @staticmethod
    def _bounded(plan: ProtocolPlan, n: int) -> int:
        return max(plan.min_instances, min(plan.max_instances, n))

    def _counts(self, protocol: str) -> dict[str, int]:
        """Instances by state: running (ready, taking sessions), pending (asked of Ray, not
        started yet), draining (their sessions moving away)."""
        return {
            "running": self._count(protocol),
            "pending": self.pending.count(protocol),
            "draining": sum(1 for m in self.managed.values() if m.protocol == protocol and m.draining),
        }

    def _start_latency(self, protocol: str) -> float:
        xs = self.start_latencies.get(protocol)
        return sorted(xs)[len(xs) // 2] if xs else 1.0

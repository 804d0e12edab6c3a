"""The VPSM (virtual protocol stack manager): the control loop over the stack instances.

Each interval it reads every instance's load and resource use, writes a telemetry row per
instance, asks the protocol's scaling policy (a pure function, `apsv.scaling.policy`) how many
instances it wants, and makes it so:

* up: instantiate instances with a resource allocation (CPU, memory, buffer quota), wait until
  they are ready (the start latency is measured), register them with the multiplexer;
* down: pick the least-used instance, drain it - every live session moved elsewhere by
  snapshot, restore and reroute - then destroy it (deregister, stop the actor or container).

It is a named, detached actor: it outlives the job that started it, and anyone can find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime.instance import Allocation, create_instance
from apsv.runtime.telemetry import TelemetryWriter, now_utc
from apsv.scaling.policy import ScalingContext, get_policy

log = logging.getLogger("apsv.vpsm")
VPSM_NAME = "apsv-vpsm"


@dataclass
class ProtocolPlan:
    """How one protocol's instances are run."""

    protocol: str
    backend: str = "process"
    min_instances: int = 1
    max_instances: int = 8
    allocation: Allocation = field(default_factory=Allocation)
    policy: str = "reactive"
    policy_config: dict[str, Any] = field(default_factory=dict)
    capacity_per_instance: float = 20_000.0  # messages/s, refined from telemetry as it runs
    slo_ms: float = 100.0  # p99 message latency objective (BFD: 10 ms)
    season: int = 60  # forecaster season in control intervals


@dataclass
class Managed:
    instance_id: str
    handle: Any
    protocol: str
    started: float
    start_latency_s: float
    last_frames: int = 0
    last_cpu: float = 0.0
    last_ts: float = 0.0


class VPSM:
    """Ray actor class (async). Create with `create_vpsm`."""

    def __init__(
        self,
        plans: list[ProtocolPlan],
        multiplexer_name: str,
        namespace: str | None,
        telemetry_root: str | None,
        interval_s: float = 1.0,
        forecaster_app: str | None = None,
    ) -> None:
        self.plans = {p.protocol: p for p in plans}
        # The TPE's Serve application; the predictive policy reads its quantiles each step.
        self.forecaster_app = forecaster_app
        self.forecasts: dict[str, dict[str, tuple[float, ...]]] = {}
        self.forecast_errors = 0
        self.im: Any = ray.get_actor(multiplexer_name, namespace=namespace)
        self.interval_s = interval_s
        self.telemetry = TelemetryWriter(telemetry_root) if telemetry_root else None
        self.managed: dict[str, Managed] = {}
        self.policy_state: dict[str, dict[str, Any]] = {p: {} for p in self.plans}
        self.history: dict[str, deque[float]] = {p: deque(maxlen=600) for p in self.plans}
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.start_latencies: dict[str, list[float]] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.steps = 0
        self._images: dict[str, str] = {}  # protocol -> stack image tag (docker plans)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, run_loop: bool = True) -> dict[str, int]:
        """Bring every protocol to its minimum; then (optionally) run the control loop."""
        for plan in self.plans.values():
            if plan.backend == "docker" and plan.protocol not in self._images:
                # Once, here: an instance start then only checks the engine has it.
                from apsv.runtime.docker_backend import ensure_image

                self._images[plan.protocol] = await asyncio.to_thread(ensure_image)
        for plan in self.plans.values():
            while self._count(plan.protocol) < plan.min_instances:
                await self._instantiate(plan, "minimum")
        if run_loop and self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())
        return {p: self._count(p) for p in self.plans}

    async def stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None

    async def shutdown(self) -> None:
        """Stop the loop and destroy every instance (their sessions are closed, not moved)."""
        await self.stop_loop()
        for m in list(self.managed.values()):
            await self._destroy(m, drain=False)
        if self.telemetry is not None:
            self.telemetry.flush()

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.step()
            except Exception:  # the loop must survive a bad step; the error is logged and counted
                log.exception("VPSM step failed")
                self.events.append({"ts": time.time(), "event": "step-error"})
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))

    # -- one control step ----------------------------------------------------------------------

    async def step(self) -> dict[str, Any]:
        async with self._lock:
            self.steps += 1
            now = time.time()
            loads = await self._collect(now)
            dead = [i for i in self.managed if i not in loads]
            if dead:
                await self._reap([i for i in dead if not await self._alive(i)])
            decisions: dict[str, Any] = {}
            for protocol in self.plans:
                mine = [loads[i] for i, m in self.managed.items() if m.protocol == protocol and i in loads]
                self.history[protocol].append(sum(x["msgs_per_s"] for x in mine))
            if self.forecaster_app is not None:
                await self._forecast()
            for protocol, plan in self.plans.items():
                mine = [loads[i] for i, m in self.managed.items() if m.protocol == protocol and i in loads]
                rate = self.history[protocol][-1]
                rates = [float(x["msgs_per_s"]) for x in mine]
                p99s = [float(x["latency_p99_ms"]) for x in mine if x.get("latency_p99_ms") is not None]
                alloc = sum(float(x["allocation"]["cpu"]) for x in mine)
                ctx = ScalingContext(
                    protocol=protocol,
                    now=now,
                    current_instances=self._count(protocol),
                    load=rate,
                    inflight=float(sum(x["queue_depth"] for x in mine)),
                    sessions=sum(int(x["sessions"]) for x in mine),
                    capacity_per_instance=plan.capacity_per_instance,
                    min_instances=plan.min_instances,
                    max_instances=plan.max_instances,
                    instance_ages=tuple(now - m.started for m in self.managed.values() if m.protocol == protocol),
                    start_latency_s=self._start_latency(protocol),
                    load_history=tuple(self.history[protocol]),
                    forecast=self.forecasts.get(protocol),
                    forecast_step_s=self.interval_s,
                    latency_p99_ms=max(p99s) if p99s else None,
                    slo_ms=plan.slo_ms,
                    cpu_utilization=(sum(float(x["cpu_percent"]) for x in mine) / 100.0 / alloc) if alloc > 0 else None,
                    load_imbalance=(max(rates) / (sum(rates) / len(rates))) if rates and sum(rates) > 0 else 1.0,
                    state=self.policy_state[protocol],
                    config=plan.policy_config,
                )
                d = get_policy(plan.policy)(ctx)
                self.policy_state[protocol] = d.state
                decisions[protocol] = {"current": ctx.current_instances, "desired": d.instances, "reason": d.reason}
                await self._scale(plan, d.instances, d.reason)
            return decisions

    async def _forecast(self) -> None:
        """Ask the TPE for every protocol's quantiles ahead (one batched Serve call). A failure
        keeps the last forecast and is counted: the predictive policy's live correction still
        holds the load, and the step goes on."""
        from ray import serve

        payload = {
            "series": {p: list(h) for p, h in self.history.items() if len(h) >= 2},
            "season": {p: plan.season for p, plan in self.plans.items()},
        }
        if not payload["series"]:
            return
        try:
            handle = serve.get_app_handle(str(self.forecaster_app))
            r = await handle.forecast.remote(payload)
        except Exception:  # Serve down or the app not deployed: keep stepping without new forecasts
            self.forecast_errors += 1
            log.warning("forecast from %s failed", self.forecaster_app, exc_info=True)
            return
        if "error" in r:
            self.forecast_errors += 1
            return
        names = [f"p{round(q * 100)}" for q in r["quantiles"]]
        for j, p in enumerate(r["ids"]):
            self.forecasts[p] = {n: tuple(float(x) for x in r["forecasts"][j, :, k]) for k, n in enumerate(names)}

    async def _collect(self, now: float) -> dict[str, dict[str, Any]]:
        """Each instance's load (instance call) plus what the multiplexer sees in flight to it."""
        im_view = await self.im.instance_loads.remote()
        ids = list(self.managed)
        results = await asyncio.gather(*(self.managed[i].handle.load.remote() for i in ids), return_exceptions=True)
        rows = []
        out: dict[str, dict[str, Any]] = {}
        for iid, res in zip(ids, results, strict=True):
            m = self.managed[iid]
            if isinstance(res, BaseException):
                continue  # a dead instance: the multiplexer recovers its sessions on the next batch
            dt = max(now - m.last_ts, 1e-6) if m.last_ts else None
            frames = int(res["frames_in"])
            cpu = float(res["cpu_seconds"])
            rate = (frames - m.last_frames) / dt if dt else 0.0
            cpu_pct = 100.0 * (cpu - m.last_cpu) / dt if dt else 0.0
            m.last_frames, m.last_cpu, m.last_ts = frames, cpu, now
            queue = int(im_view.get(iid, {}).get("inflight_frames", 0))
            res.update(msgs_per_s=rate, cpu_percent=cpu_pct, queue_depth=queue)
            out[iid] = res
            alloc = res["allocation"]
            rows.append(
                {
                    "ts": now_utc(),
                    "instance_id": iid,
                    "protocol": res["protocol"],
                    "backend": res["backend"],
                    "sessions": int(res["sessions"]),
                    "cpu_seconds": cpu,
                    "cpu_percent": cpu_pct,
                    "rss_bytes": int(res["rss_bytes"]),
                    "frames_in": frames,
                    "frames_out": int(res["frames_out"]),
                    "msgs_per_s": rate,
                    "queue_depth": queue,
                    "latency_p50_ms": res.get("latency_p50_ms"),
                    "latency_p99_ms": res.get("latency_p99_ms"),
                    "latency_max_ms": res.get("latency_max_ms"),
                    "duplicates": int(res["duplicates"]),
                    "errors": int(res["errors"]),
                    "alloc_cpu": float(alloc["cpu"]),
                    "alloc_memory_bytes": int(alloc["memory_bytes"]),
                }
            )
        if self.telemetry is not None and rows:
            self.telemetry.append(rows)
            if self.steps % 10 == 0:
                self.telemetry.flush()
        return out

    # -- scaling -------------------------------------------------------------------------------

    async def scale_to(self, protocol: str, n: int) -> int:
        """Force a protocol to n instances now (drains on the way down). Returns the new count."""
        async with self._lock:
            await self._scale(self.plans[protocol], n, "forced")
            return self._count(protocol)

    async def drain(self, instance_id: str, replace: bool = True) -> int:
        """Move every session off an instance and destroy it (an operator's drain, e.g. for host
        maintenance); with `replace`, start a new instance first so capacity stays. Returns the
        sessions moved."""
        async with self._lock:
            m = self.managed[instance_id]
            plan = self.plans[m.protocol]
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
            if self.managed.pop(iid, None) is None:
                continue
            await self.im.report_dead.remote(iid)
            await self.im.remove_instance.remote(iid)
            self.events.append({"ts": time.time(), "event": "reaped", "instance": iid})
        for plan in self.plans.values():
            while self._count(plan.protocol) < plan.min_instances:
                await self._instantiate(plan, "replacing a dead instance")
        return dead

    async def _scale(self, plan: ProtocolPlan, desired: int, reason: str) -> None:
        desired = max(plan.min_instances, min(plan.max_instances, desired))
        grew = False
        while self._count(plan.protocol) < desired:
            await self._instantiate(plan, reason)
            grew = True
        if grew:
            # New capacity takes a share of the live sessions now, not only of future ones.
            moved = await self.im.rebalance.remote(plan.protocol)
            self.events.append({"ts": time.time(), "event": "rebalance", "protocol": plan.protocol, "moved": moved})
        # Choose every instance to remove first and stop placing sessions on them, so each
        # session moves once, straight to an instance that stays.
        victims: list[str] = []
        while self._count(plan.protocol) - len(victims) > desired:
            victim = await self.im.least_used.remote(plan.protocol)
            if victim is None or victim not in self.managed:
                break
            await self.im.set_accepting.remote(victim, False)
            victims.append(victim)
        for victim in victims:
            await self._destroy(self.managed[victim], drain=True)
        if victims:
            # drained sessions were placed one by one: even out what they upset
            moved = await self.im.rebalance.remote(plan.protocol)
            self.events.append({"ts": time.time(), "event": "rebalance", "protocol": plan.protocol, "moved": moved})

    async def _instantiate(self, plan: ProtocolPlan, reason: str) -> str:
        iid = f"{plan.protocol}-{next(self._ids)}"
        t0 = time.perf_counter()
        handle = create_instance(
            iid, plan.protocol, plan.backend, plan.allocation, image=self._images.get(plan.protocol)
        )
        info = await handle.ready.remote()
        latency = time.perf_counter() - t0
        await self.im.register_instance.remote(
            iid,
            handle,
            plan.protocol,
            plan.allocation.buffer_quota_bytes,
            plan.allocation.max_sessions,
            info["node_id"],
        )
        self.managed[iid] = Managed(iid, handle, plan.protocol, time.time(), latency)
        self.start_latencies.setdefault(plan.protocol, []).append(latency)
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
        self.managed.pop(m.instance_id, None)
        self.events.append({"ts": time.time(), "event": "destroy", "instance": m.instance_id, "moved": moved})

    async def _alive(self, instance_id: str) -> bool:
        try:
            await self.managed[instance_id].handle.ready.remote()
            return True
        except (RayActorError, RayTaskError):
            return False

    def _count(self, protocol: str) -> int:
        return sum(1 for m in self.managed.values() if m.protocol == protocol)

    def _start_latency(self, protocol: str) -> float:
        xs = self.start_latencies.get(protocol)
        return sorted(xs)[len(xs) // 2] if xs else 1.0

    # -- inspection ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return {
            "protocols": {
                p: {
                    "instances": self._count(p),
                    "backend": plan.backend,
                    "policy": plan.policy,
                    "min": plan.min_instances,
                    "max": plan.max_instances,
                    "start_latency_s": self._start_latency(p),
                }
                for p, plan in self.plans.items()
            },
            "instances": {
                i: {"protocol": m.protocol, "start_latency_s": m.start_latency_s} for i, m in self.managed.items()
            },
            "steps": self.steps,
            "events": list(self.events)[-50:],
            "forecasts": {p: {q: list(v[:5]) for q, v in f.items()} for p, f in self.forecasts.items()},
            "forecast_errors": self.forecast_errors,
        }

    async def instance_handles(self) -> dict[str, Any]:
        return {i: m.handle for i, m in self.managed.items()}

    async def flush_telemetry(self) -> list[str]:
        return [str(p) for p in self.telemetry.flush()] if self.telemetry is not None else []


def create_vpsm(
    plans: list[ProtocolPlan],
    *,
    multiplexer_name: str,
    namespace: str | None = None,
    telemetry_root: str | Path | None = None,
    interval_s: float = 1.0,
    name: str = VPSM_NAME,
    detached: bool = True,
    forecaster_app: str | None = None,
) -> Any:
    cls = ray.remote(VPSM)
    opts: dict[str, Any] = {"name": name, "num_cpus": 0, "max_concurrency": 64}
    if namespace:
        opts["namespace"] = namespace
    if detached:
        opts["lifetime"] = "detached"
    return cls.options(**opts).remote(
        plans, multiplexer_name, namespace, str(telemetry_root) if telemetry_root else None, interval_s, forecaster_app
    )

"""The VPSM actor: its state, what it keeps across a restart, its lifecycle and the control
step. Its instances, observations and inspection calls are in the modules beside it, as parts
of this one class (the package's docstring has the whole picture)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from apsv.runtime import persist
from apsv.runtime.instance import instance_actor_name
from apsv.runtime.offered import OfferedLoad
from apsv.runtime.pending import PendingStarts
from apsv.runtime.telemetry import TelemetryWriter
from apsv.runtime.vpsm.inspection import Inspection, cluster_figures
from apsv.runtime.vpsm.instances import START_LATENCY_SAMPLES, Instances
from apsv.runtime.vpsm.metrics import VpsmMetrics
from apsv.runtime.vpsm.observe import Observe
from apsv.runtime.vpsm.plan import Managed, ProtocolPlan
from apsv.scaling.clock import IDENTITY, ReplayClock
from apsv.scaling.context import HISTORY_STEPS, Limits, build_context, with_interval
from apsv.scaling.latency import histogram
from apsv.scaling.policy import Decision, ScalingContext, get_policy

log = logging.getLogger("apsv.vpsm")
VPSM_NAME = "apsv-vpsm"
# How often an unchanged status is republished for `apsv status` (well inside its 15 s
# staleness bound): each publication asks the GCS for the cluster's nodes and resources.
STATUS_REFRESH_S = 5.0


class VPSM(Instances, Observe, Inspection):
    """Ray actor class (async). Create with `create_vpsm`."""

    def __init__(
        self,
        plans: list[ProtocolPlan],
        multiplexer_name: str,
        namespace: str | None,
        telemetry_root: str | None,
        interval_s: float = 1.0,
        forecaster_app: str | None = None,
        name: str = "apsv-vpsm",
        instance_resources: dict[str, float] | None = None,
        telemetry_retention_hours: int | None = None,
    ) -> None:
        self.plans = {p.protocol: p for p in plans}
        self.instance_resources = dict(instance_resources or {})  # the stack-host role's (roles.Roles)
        self.name = name
        self.namespace = namespace
        self.multiplexer_name = multiplexer_name
        self.owner = f"{namespace}/{name}"  # its keys in Ray's KV store
        # The TPE's Serve application; the predictive policy reads its quantiles each step.
        self.forecaster_app = forecaster_app
        self.forecasts: dict[str, dict[str, tuple[float, ...]]] = {}
        self.forecast_errors = 0
        self.forecast_ok_at: float | None = None  # the last forecast the forecaster answered
        self._forecast_misses = 0  # steps in a row it has not answered
        self.forecaster_down_since: float | None = None  # not answering, its forecasts dropped
        self.im: Any = ray.get_actor(multiplexer_name, namespace=namespace)
        self.interval_s = interval_s
        self.telemetry = (
            TelemetryWriter(telemetry_root, retention_hours=telemetry_retention_hours) if telemetry_root else None
        )
        self.managed: dict[str, Managed] = {}
        self.policy_state: dict[str, dict[str, Any]] = {p: {} for p in self.plans}
        # how far the last decision leaned on the forecast, per protocol (None: no forecast read)
        self.forecast_trust: dict[str, float | None] = {p: None for p in self.plans}
        self.last_reason: dict[str, str] = {}
        self.history: dict[str, deque[float]] = {p: deque(maxlen=HISTORY_STEPS) for p in self.plans}
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.start_latencies: dict[str, deque[float]] = {}
        self._next_id = 1  # of the next instance
        self._loop: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.steps = 0
        self._images: dict[str, str] = {}  # protocol -> stack image tag (docker plans)
        self.clocks: dict[str, ReplayClock] = {}
        # per protocol: (interval, the plan's policy config, it with the interval; `_policy_config`)
        self._policy_configs: dict[str, tuple[float, Mapping[str, Any], Mapping[str, Any]]] = {}
        # One row per protocol per step (bounded): what was measured and decided, for evaluation.
        self.timeline: deque[dict[str, Any]] = deque(maxlen=20_000)
        # Finished instances' (protocol, requested, ended) wall times, for instance-seconds.
        self.lifetimes: deque[tuple[str, float, float]] = deque(maxlen=20_000)
        self.actions: dict[str, int] = dict.fromkeys(self.plans, 0)
        self._starting: dict[str, int] = dict.fromkeys(self.plans, 0)
        self.pending = PendingStarts()  # instances asked of Ray and not started yet
        self.desired: dict[str, int] = {p: plan.min_instances for p, plan in self.plans.items()}
        self.warnings: list[dict[str, Any]] = []  # unplaceable demand, as of the last step
        self._published: tuple[float, Any] = (float("-inf"), None)  # (monotonic time, what changed it)
        self._tasks: set[asyncio.Task[None]] = set()
        self._offered = OfferedLoad()
        self._imbalances: dict[str, float] = {}
        # Per protocol: session-moving jobs ("drain", instance) / ("rebalance", None), run in
        # order by one mover task; bounded by the instances there are (rebalances coalesce).
        self._jobs: dict[str, deque[tuple[str, str | None]]] = {p: deque() for p in self.plans}
        self._movers: dict[str, asyncio.Task[None]] = {}
        self.move_errors = 0
        self._metrics = VpsmMetrics(list(self.plans))
        self.restarts = 0
        self.last_loads: dict[str, dict[str, Any]] = {}
        self._resume()

    # -- persisted state -----------------------------------------------------------------------

    def _save(self) -> None:
        """The control state a restarted VPSM takes up again (a few kilobytes, each step)."""
        persist.save(
            self.owner,
            "state",
            {
                "managed": {
                    i: [m.protocol, m.started, m.start_latency_s, m.requested, m.draining]
                    for i, m in self.managed.items()
                },
                "next_id": self._next_id,
                "policy_state": self.policy_state,
                "history": {p: list(h) for p, h in self.history.items()},
                "actions": self.actions,
                "start_latencies": {p: list(xs) for p, xs in self.start_latencies.items()},
                "loop": self._loop is not None,
                "steps": self.steps,
                "restarts": self.restarts,
            },
        )

    def _resume(self) -> None:
        """After a restart: the instances it managed (found by name; gone ones are reaped by the
        next step), its policies' state and history, and its loop if it was running."""
        st = persist.load(self.owner, "state")
        if not st:
            return
        self.restarts = int(st.get("restarts", 0)) + 1
        self._next_id = int(st["next_id"])
        self.steps = int(st.get("steps", 0))
        for p, v in st.get("policy_state", {}).items():
            if p in self.plans:
                self.policy_state[p] = v
        for p, h in st.get("history", {}).items():
            if p in self.history:
                self.history[p].extend(float(x) for x in h)
        self.actions.update({p: int(n) for p, n in st.get("actions", {}).items()})
        self.start_latencies.update(
            {
                p: deque((float(x) for x in xs), maxlen=START_LATENCY_SAMPLES)
                for p, xs in st.get("start_latencies", {}).items()
            }
        )
        for iid, (protocol, started, latency, requested, draining) in st.get("managed", {}).items():
            try:
                handle = ray.get_actor(instance_actor_name(iid), namespace=self.namespace)
            except ValueError:
                self.lifetimes.append((protocol, requested, time.time()))
                continue
            self.managed[iid] = Managed(iid, handle, protocol, started, latency, requested=requested, draining=draining)
            if draining:
                self._enqueue(protocol, "drain", iid)
        self.events.append({"ts": time.time(), "event": "restarted", "instances": len(self.managed)})
        log.warning("VPSM %s restarted: %d instances taken up again", self.name, len(self.managed))
        if st.get("loop"):
            self._loop = asyncio.get_event_loop().create_task(self._run())

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, run_loop: bool = True) -> dict[str, int]:
        """Bring every protocol to its minimum; then (optionally) run the control loop."""
        for plan in self.plans.values():
            if plan.backend == "docker" and plan.protocol not in self._images:
                # Once, here: an instance start then only checks the engine has it.
                from apsv.runtime.stack_image import ensure_image

                self._images[plan.protocol] = await asyncio.to_thread(ensure_image)
        for plan in self.plans.values():
            while self._count(plan.protocol) < plan.min_instances:
                await self._instantiate(plan, "minimum")
        if run_loop and self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())
        self._save()
        return {p: self._count(p) for p in self.plans}

    async def stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
            self._save()

    async def shutdown(self) -> None:
        """Stop the loop and destroy every instance (their sessions are closed, not moved)."""
        await self.stop_loop()
        # Instances still starting are cancelled, not waited for: one Ray cannot place would
        # hold the shutdown for as long as it waits.
        for handle in self.pending.handles():
            with contextlib.suppress(Exception):
                ray.kill(handle)
        for start in list(self._tasks):
            start.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for p in self.plans:
            # sessions are closed, not moved, on shutdown: a drain in flight is abandoned
            self._jobs[p].clear()
            task = self._movers.pop(p, None)
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for m in list(self.managed.values()):
            await self._destroy(m, drain=False)
        if self.telemetry is not None:
            self.telemetry.flush()
        persist.forget(self.owner)

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
            # an instance the mover is draining may stop answering as it is destroyed: not dead
            dead = [i for i, m in self.managed.items() if i not in loads and not m.draining]
            if dead:
                await self._reap([i for i in dead if not await self._alive(i)])
            decisions: dict[str, Any] = {}
            try:
                offered = await asyncio.wait_for(self.im.offered_by_client.remote(), 5.0)
            except (TimeoutError, RayActorError):
                # the multiplexer is restarting: no measure of the offered load this step, so no
                # decision (the instances serve on meanwhile)
                self.events.append({"ts": time.time(), "event": "step-skipped", "reason": "multiplexer unavailable"})
                return {}
            # the offered load (what the clients were given to send), not the instances'
            # throughput, which a saturated instance caps exactly when the policy most needs the truth
            rates = self._offered.rates(now, offered)
            for protocol in self.plans:
                self.history[protocol].append(self.clocks.get(protocol, IDENTITY).rate(rates.get(protocol, 0.0)))
            if self.forecaster_app is not None:
                await self._forecast()
            for protocol, plan in self.plans.items():
                decisions[protocol] = await self._decide(protocol, plan, loads, now)
            await self._check_pending(now)
            for protocol in self.plans:
                self._metrics.instances(protocol, self._counts(protocol), self.desired[protocol])
            self._save()
        # at once when the picture changed, else every STATUS_REFRESH_S
        changed = ({p: (self._counts(p), self.desired[p]) for p in self.plans}, self.warnings)
        due = changed != self._published[1] or time.monotonic() - self._published[0] >= STATUS_REFRESH_S
        if due and await self._publish_status():
            self._published = (time.monotonic(), changed)
        return decisions

    async def _decide(
        self, protocol: str, plan: ProtocolPlan, loads: dict[str, dict[str, Any]], now: float
    ) -> dict[str, Any]:
        """One protocol's decision this step: its context built, its policy asked, the answer
        recorded and acted on."""
        clock = self.clocks.get(protocol, IDENTITY)
        mine = [loads[i] for i, m in self.managed.items() if m.protocol == protocol and i in loads]
        # the protocol's latencies over every message of the interval, from all its instances
        lat = np.concatenate([x["latency_ms"] for x in mine if len(x.get("latency_ms", ()))] or [np.zeros(0)])
        ctx = self._context(protocol, plan, mine, lat, now, clock)
        d = get_policy(plan.policy)(ctx)
        self.policy_state[protocol] = d.state
        self.forecast_trust[protocol] = d.forecast_trust
        self.last_reason[protocol] = d.reason
        decision = {
            "current": ctx.current_instances,
            "desired": d.instances,
            "reason": d.reason,
            "forecast_trust": d.forecast_trust,
        }
        self._record(ctx, d, now, lat, clock)
        self._metrics.protocol(
            protocol, ctx.load, ctx.latency_p99_ms, ctx.forecast, ctx.table_backlog, d.forecast_trust
        )
        await self._scale(plan, d.instances, d.reason, background=True)
        self.desired[protocol] = self._bounded(plan, d.instances)
        return decision

    def _context(
        self,
        protocol: str,
        plan: ProtocolPlan,
        mine: list[dict[str, Any]],
        lat: Any,
        now: float,
        clock: ReplayClock,
    ) -> ScalingContext:
        """What the policy is given: the measurements of the protocol's instances, on its clock."""
        rate = self.history[protocol][-1]
        p99 = float(np.percentile(lat, 99)) * clock.speed if lat.size else None
        busy = [float(x["busy_fraction"]) for x in mine]
        t = clock.trace_time(now) if protocol in self.clocks else now
        k = max(0, int(t)) if protocol in self.clocks else 0
        forecast = self.forecasts.get(protocol)
        if clock.forecasts is not None:
            forecast = clock.forecasts.at(k)
        ctx = build_context(
            Limits(protocol, plan.capacity_per_instance, plan.min_instances, plan.max_instances, plan.slo_ms),
            now=t,
            current_instances=self._active(protocol),
            load=rate,
            load_history=tuple(self.history[protocol]),
            # the backlog new instances can relieve: not what waits at instances being drained
            inflight=float(sum(x["queue_depth"] for x in mine if x["accepting"])) / clock.rate_scale,
            sessions=sum(int(x["sessions"]) for x in mine),
            start_latency_s=self._start_latency(protocol) * clock.speed,
            forecast=forecast,
            forecast_step_s=1.0 if protocol in self.clocks else self.interval_s,
            instance_ages=[
                (now - m.started) * clock.speed
                for m in self.managed.values()
                if m.protocol == protocol and not m.draining
            ],
            latency_p99_ms=p99,
            # Each instance applies one batch at a time: its busy fraction is its
            # utilization (its CPU use when the stack is CPU-bound, and still right when
            # a message's cost is waiting on something).
            cpu_utilization=sum(busy) / len(busy) if busy else None,
            load_imbalance=self._imbalance(protocol, [float(x["traffic_share"]) for x in mine if x["accepting"]]),
            # tables that peers which reset will re-send (BGP): known before they arrive
            table_backlog=float(sum(int(x.get("table_backlog", 0)) for x in mine)) / clock.rate_scale
            + (clock.tables[min(k, len(clock.tables) - 1)] if clock.tables else 0.0),
            trace=clock.future,
            step=k,
            state=self.policy_state[protocol],
            config=self._policy_config(plan, clock),
        )
        return ctx

    def _policy_config(self, plan: ProtocolPlan, clock: ReplayClock) -> Mapping[str, Any]:
        """The plan's policy config with the decision interval where it sets none, in the
        context's time units: `interval_s` wall seconds, `speed` times as many trace seconds on a
        replay clock. Built once per plan and clock speed: the policy's settings are parsed once
        per config object (`apsv.scaling.settings.cached`)."""
        interval = self.interval_s * clock.speed
        held = self._policy_configs.get(plan.protocol)
        if held is None or held[0] != interval or held[1] is not plan.policy_config:
            held = (interval, plan.policy_config, with_interval(plan.policy_config, interval))
            self._policy_configs[plan.protocol] = held
        return held[2]

    def _record(self, ctx: ScalingContext, d: Decision, now: float, lat: Any, clock: ReplayClock) -> None:
        """The step's row of the protocol's timeline: what was measured and decided."""
        protocol, slo_ms = ctx.protocol, self.plans[ctx.protocol].slo_ms
        self.timeline.append(
            {
                "ts": now,
                "t": ctx.now,
                "protocol": protocol,
                "instances": ctx.current_instances,
                # billed: starting and draining ones too (the simulator's timeline counts these)
                "billed": self._billed(protocol),
                "desired": d.instances,
                "reason": d.reason,
                "forecast_trust": d.forecast_trust,
                "imbalance": ctx.load_imbalance,
                "load": ctx.load,
                "table_backlog": ctx.table_backlog,
                "p99_ms": ctx.latency_p99_ms,
                "messages": int(lat.size),
                "late": int((lat * clock.speed > slo_ms).sum()) if lat.size else 0,
                "utilization": ctx.cpu_utilization,
                "hist": histogram(lat * clock.speed).tolist() if lat.size else None,
                # what the policy read for the next step, per quantile
                "forecast": {q: float(v[0]) for q, v in (ctx.forecast or {}).items() if v},
            }
        )

    async def _publish_status(self) -> bool:
        """The deployment's status, as of this step, in Ray's KV store (`STATUS_KEY`): `apsv
        status` reads it there through a GCS client, without joining the cluster as a driver
        (which the dashboard would list as a job)."""
        try:
            parts = await asyncio.wait_for(self.im.status_parts.remote(), 5.0)
            cluster = await asyncio.to_thread(cluster_figures)
            snapshot = {"ts": time.time(), "vpsm": await self.status(), "multiplexer": parts, "cluster": cluster}
            persist.save(self.owner, persist.STATUS_KEY, snapshot)
            return True
        except Exception:  # the multiplexer restarting: the next step publishes
            log.debug("status not published this step", exc_info=True)
            return False

    async def _check_pending(self, now: float) -> None:
        """Unplaceable demand: the starts Ray has kept waiting, and the resource each lacks."""
        if not self.pending.waiting(now, self._start_latencies()):
            self.warnings = []
            return
        free = await asyncio.to_thread(ray.available_resources)
        self.warnings = self.pending.warnings(now, self._start_latencies(), free)
        for w in self.pending.unreported(self.warnings):
            log.warning("%s", w["message"])
            self.events.append({"ts": now, "event": "pending", **{k: v for k, v in w.items() if k != "message"}})

    async def set_clock(self, protocol: str, clock: ReplayClock | None) -> None:
        """Run a protocol on a replayed trace's clock (None: back to the wall's)."""
        async with self._lock:
            if clock is None:
                self.clocks.pop(protocol, None)
            else:
                self.clocks[protocol] = clock
            self.history[protocol].clear()
            self.policy_state[protocol] = {}
            self._imbalances.pop(protocol, None)

    async def get_timeline(self, protocol: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        return [r for r in self.timeline if (protocol is None or r["protocol"] == protocol) and r["ts"] >= since]

    async def instance_seconds(self, protocol: str, since: float, until: float) -> float:
        """Wall seconds of instances of a protocol alive (starting included) within [since, until]."""
        spans = [(a, b) for p, a, b in self.lifetimes if p == protocol]
        spans += [(m.requested, until) for m in self.managed.values() if m.protocol == protocol]
        return float(sum(max(0.0, min(b, until) - max(a, since)) for a, b in spans))

    async def scale_actions(self) -> dict[str, int]:
        return dict(self.actions)


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
    resources: Mapping[str, float] | None = None,
    instance_resources: Mapping[str, float] | None = None,
    telemetry_retention_hours: int | None = None,
) -> Any:
    """The VPSM actor. `telemetry_retention_hours`: the Parquet telemetry's hours kept (None: all)."""
    cls = ray.remote(VPSM)
    # Restarted by Ray when its process dies (it takes up its persisted state); calls in flight
    # then are retried on the new process.
    opts: dict[str, Any] = {
        "name": name,
        "num_cpus": 0,
        "max_concurrency": 64,
        "max_restarts": -1,
        "max_task_retries": -1,
    }
    if namespace:
        opts["namespace"] = namespace
    if detached:
        opts["lifetime"] = "detached"
    if resources:
        opts["resources"] = dict(resources)
    return cls.options(**opts).remote(
        plans,
        multiplexer_name,
        namespace,
        str(telemetry_root) if telemetry_root else None,
        interval_s,
        forecaster_app,
        name,
        dict(instance_resources or {}),
        telemetry_retention_hours,
    )

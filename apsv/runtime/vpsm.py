"""The VPSM (virtual protocol stack manager): the control loop over the stack instances.

Each interval it reads every instance's load and resource use, writes a telemetry row per
instance, asks the protocol's scaling policy (a pure function, `apsv.scaling.policy`) how many
instances it wants, and makes it so:

* up: instantiate instances with a resource allocation (CPU, memory, buffer quota), wait until
  they are ready (the start latency is measured), register them with the multiplexer;
* down: pick the least-used instance, drain it - every live session moved elsewhere by
  snapshot, restore and reroute - then destroy it (deregister, stop the actor or container).

Session moves (drains, and the rebalancing after instances join or leave) run in a mover task
per protocol, not in the control step: a hand-over waits for the batch its source is applying,
and a drain or rebalance of many sessions takes many - time the loop needs to keep observing and
deciding, most of all when instances are overloaded. The mover runs its protocol's moves one job at a time, so
no session is moved by two jobs at once; operators' calls (`scale_to`, `drain`) wait for it.

It is a named, detached actor: it outlives the job that started it, and anyone can find it.
Ray restarts it if its process dies: it keeps its control state in Ray's KV store
(`apsv.runtime.persist`) - the instances it manages (detached actors, found again by name), its
policies' state and load history - and takes up the loop where it was. Meanwhile the instances
keep serving: nothing on the data path waits for the VPSM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime import persist
from apsv.runtime.instance import Allocation, create_instance, instance_actor_name
from apsv.runtime.offered import OfferedLoad
from apsv.runtime.pending import PendingStart, PendingStarts
from apsv.runtime.telemetry import TelemetryWriter, now_utc
from apsv.scaling.clock import IDENTITY, ReplayClock
from apsv.scaling.context import HISTORY_STEPS, Limits, build_context
from apsv.scaling.latency import histogram
from apsv.scaling.policy import get_policy

log = logging.getLogger("apsv.vpsm")
VPSM_NAME = "apsv-vpsm"
# How often an unchanged status is republished for `apsv status` (well inside its 15 s
# staleness bound): each publication asks the GCS for the cluster's nodes and resources.
STATUS_REFRESH_S = 5.0
# After this many control steps in a row without an answer from the forecaster its forecasts
# are dropped: the predictive policy then reacts to the live load alone (and status says so)
FORECAST_STALE_STEPS = 5
# Instance start latencies kept per protocol (their median is the one the policy plans with)
START_LATENCY_SAMPLES = 100
# What status() reports of each instance, from its last load.
INSTANCE_STATUS_KEYS = (
    "sessions",
    "pending_sessions",
    "frames_in",
    "msgs_per_s",
    "busy_fraction",
    "queue_depth",
    "clients",
    "departed",
    "stale",
    "out_of_order",
    "pending",
    "foreign",
    "unknown_session",
    "bad_frames",
    "duplicates",
    "errors",
    "cpu_percent",
    "rss_bytes",
)


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
    rebalance_by: str = "load"  # "load" (sessions weighted by their traffic) or "sessions" (counts)

    def __post_init__(self) -> None:
        if self.rebalance_by not in ("load", "sessions"):
            raise ValueError(f"{self.protocol}: rebalance_by {self.rebalance_by!r}: expected load or sessions")


@dataclass
class Managed:
    instance_id: str
    handle: Any
    protocol: str
    started: float
    start_latency_s: float
    requested: float = 0.0  # when the VPSM asked for it: billed from here (it is starting)
    draining: bool = False  # chosen for scale-down: takes no sessions, its drain is queued
    last_frames: int = 0
    last_cpu: float = 0.0
    last_busy: float = 0.0
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
        name: str = "apsv-vpsm",
        instance_resources: dict[str, float] | None = None,
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
        self.telemetry = TelemetryWriter(telemetry_root) if telemetry_root else None
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
        self._metrics = _VpsmMetrics(list(self.plans))
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
                from apsv.runtime.docker_backend import ensure_image

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
                clock = self.clocks.get(protocol, IDENTITY)
                mine = [loads[i] for i, m in self.managed.items() if m.protocol == protocol and i in loads]
                rate = self.history[protocol][-1]
                # the protocol's p99 over every message of the interval, from all its instances
                lat = np.concatenate([x["latency_ms"] for x in mine if len(x.get("latency_ms", ()))] or [np.zeros(0)])
                p99 = float(np.percentile(lat, 99)) * clock.speed if lat.size else None
                late = int((lat * clock.speed > plan.slo_ms).sum()) if lat.size else 0
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
                    load_imbalance=self._imbalance(
                        protocol, [float(x["traffic_share"]) for x in mine if x["accepting"]]
                    ),
                    # tables that peers which reset will re-send (BGP): known before they arrive
                    table_backlog=float(sum(int(x.get("table_backlog", 0)) for x in mine)) / clock.rate_scale
                    + (clock.tables[min(k, len(clock.tables) - 1)] if clock.tables else 0.0),
                    trace=clock.future,
                    step=k,
                    state=self.policy_state[protocol],
                    config=plan.policy_config,
                )
                d = get_policy(plan.policy)(ctx)
                self.policy_state[protocol] = d.state
                self.forecast_trust[protocol] = d.forecast_trust
                self.last_reason[protocol] = d.reason
                decisions[protocol] = {
                    "current": ctx.current_instances,
                    "desired": d.instances,
                    "reason": d.reason,
                    "forecast_trust": d.forecast_trust,
                }
                self.timeline.append(
                    {
                        "ts": now,
                        "t": t,
                        "protocol": protocol,
                        "instances": ctx.current_instances,
                        # billed: starting and draining ones too (the simulator's timeline counts these)
                        "billed": self._billed(protocol),
                        "desired": d.instances,
                        "reason": d.reason,
                        "forecast_trust": d.forecast_trust,
                        "imbalance": ctx.load_imbalance,
                        "load": rate,
                        "table_backlog": ctx.table_backlog,
                        "p99_ms": p99,
                        "messages": int(lat.size),
                        "late": late,
                        "utilization": ctx.cpu_utilization,
                        "hist": histogram(lat * clock.speed).tolist() if lat.size else None,
                        # what the policy read for the next step, per quantile
                        "forecast": {q: float(v[0]) for q, v in (forecast or {}).items() if v},
                    }
                )
                self._metrics.protocol(protocol, rate, p99, forecast, ctx.table_backlog, d.forecast_trust)
                await self._scale(plan, d.instances, d.reason, background=True)
                self.desired[protocol] = self._bounded(plan, d.instances)
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
            log.warning("forecast from %s failed", self.forecaster_app, exc_info=True)
            r = {"error": "unavailable"}
        now = time.time()
        if "error" in r:
            self.forecast_errors += 1
            self._forecast_misses += 1
            if self._forecast_misses >= FORECAST_STALE_STEPS and self.forecaster_down_since is None:
                # reacting is better than acting on an old forecast: the policy sees none
                self.forecaster_down_since = now
                self.forecasts.clear()
                self.events.append({"ts": now, "event": "forecaster-unavailable", "fallback": "reactive"})
                self._metrics.forecaster(False)
            return
        if self.forecaster_down_since is not None:
            self.events.append({"ts": now, "event": "forecaster-back"})
        self.forecast_ok_at, self.forecaster_down_since, self._forecast_misses = now, None, 0
        self._metrics.forecaster(True)
        names = [f"p{round(q * 100)}" for q in r["quantiles"]]
        for j, p in enumerate(r["ids"]):
            self.forecasts[p] = {n: tuple(float(x) for x in r["forecasts"][j, :, k]) for k, n in enumerate(names)}

    async def _collect(self, now: float) -> dict[str, dict[str, Any]]:
        """Each instance's load and resource use (one call each, in its control thread); the
        multiplexer is told how busy each is (its placement weighs it)."""
        ids = list(self.managed)
        results = await asyncio.gather(*(self.managed[i].handle.load.remote() for i in ids), return_exceptions=True)
        rows = []
        out: dict[str, dict[str, Any]] = {}
        for iid, res in zip(ids, results, strict=True):
            m = self.managed.get(iid)
            if m is None:
                continue  # drained and destroyed by the mover meanwhile
            if isinstance(res, BaseException):
                continue  # a dead instance: reaped below (the multiplexer restores its sessions elsewhere)
            dt = max(now - m.last_ts, 1e-6) if m.last_ts else None
            # its throughput: frames applied (refused and repeated ones cost it little)
            frames = int(res.get("applied", res["frames_in"]))
            cpu = float(res["cpu_seconds"])
            busy_s = float(res.get("busy_seconds", 0.0))
            rate = (frames - m.last_frames) / dt if dt else 0.0
            cpu_pct = 100.0 * (cpu - m.last_cpu) / dt if dt else 0.0
            busy = min(1.0, (busy_s - m.last_busy) / dt) if dt else 0.0
            m.last_frames, m.last_cpu, m.last_busy, m.last_ts = frames, cpu, busy_s, now
            queue = int(res.get("queue_depth", 0))
            res.update(
                msgs_per_s=rate,
                cpu_percent=cpu_pct,
                busy_fraction=busy,
                traffic_share=float(res.get("session_frames", 0)),
                accepting=not m.draining,
            )
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
                    "frames_in": int(res["frames_in"]),
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
        # what `status` shows of each instance: its own view, as of this step
        self.last_loads = {
            i: {k: r.get(k) for k in INSTANCE_STATUS_KEYS} | {"accepting": not self.managed[i].draining}
            for i, r in out.items()
            if i in self.managed
        }
        if out:
            with contextlib.suppress(Exception):  # the multiplexer may be restarting: placement waits
                await asyncio.wait_for(self.im.observe.remote({i: r["busy_fraction"] for i, r in out.items()}), 2.0)
        return out

    # -- scaling -------------------------------------------------------------------------------

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

    # -- inspection ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return {
            "protocols": {
                p: {
                    "instances": self._count(p),
                    "starting": self._starting.get(p, 0),
                    "desired": self.desired.get(p, plan.min_instances),
                    **self._counts(p),
                    "scale_actions": self.actions.get(p, 0),
                    "backend": plan.backend,
                    "policy": plan.policy,
                    "min": plan.min_instances,
                    "max": plan.max_instances,
                    "start_latency_s": self._start_latency(p),
                    # "forecast trusted at 0.8": how far the last decision leaned on the forecast
                    "forecast_trust": self.forecast_trust.get(p),
                    "last_decision": self.last_reason.get(p, ""),
                }
                for p, plan in self.plans.items()
            },
            "instances": {
                i: {"protocol": m.protocol, "start_latency_s": m.start_latency_s, "draining": m.draining}
                for i, m in self.managed.items()
            },
            "loads": {i: v for i, v in self.last_loads.items() if i in self.managed},
            "warnings": list(self.warnings),
            "steps": self.steps,
            "restarts": self.restarts,
            "events": list(self.events)[-50:],
            "forecasts": {p: {q: list(v[:5]) for q, v in f.items()} for p, f in self.forecasts.items()},
            "forecast_errors": self.forecast_errors,
            # None: no forecaster configured; else whether its forecasts are used, or the policy
            # reacts to the live load alone since `down_since`
            "forecaster": None
            if self.forecaster_app is None
            else {
                "app": self.forecaster_app,
                "available": self.forecaster_down_since is None,
                "fallback": None if self.forecaster_down_since is None else "reactive",
                "down_since": self.forecaster_down_since,
                "last_forecast_at": self.forecast_ok_at,
            },
            "move_errors": self.move_errors,
            "moves_queued": {p: len(q) for p, q in self._jobs.items()},
        }

    async def instance_handles(self) -> dict[str, Any]:
        return {i: m.handle for i, m in self.managed.items()}

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def flush_telemetry(self) -> list[str]:
        return [str(p) for p in self.telemetry.flush()] if self.telemetry is not None else []


def cluster_figures() -> dict[str, Any]:
    r: Any = ray
    return {
        "resources": r.cluster_resources(),
        "available": r.available_resources(),
        "nodes": sum(1 for n in r.nodes() if n.get("Alive")),
    }


class _VpsmMetrics:
    """The control loop's Ray metrics (on the Prometheus endpoint with Ray's `ray_` prefix)."""

    def __init__(self, protocols: list[str]) -> None:
        from ray.util import metrics

        from apsv.runtime.metrics import start_at_zero

        self.n = metrics.Gauge(
            "apsv_instances",
            "Stack instances per protocol: running, pending (asked of Ray, not started) and draining",
            tag_keys=("protocol", "state"),
        )
        self.desired = metrics.Gauge(
            "apsv_instances_desired", "Stack instances the scaling policy wants per protocol", tag_keys=("protocol",)
        )
        self.load = metrics.Gauge(
            "apsv_protocol_load_msgs_per_s", "Messages/s per protocol, as the VPSM measures it", tag_keys=("protocol",)
        )
        self.p99 = metrics.Gauge(
            "apsv_protocol_latency_p99_ms",
            "p99 message latency per protocol over the last step",
            tag_keys=("protocol",),
        )
        self.forecast = metrics.Gauge(
            "apsv_forecast_msgs_per_s",
            "The forecast the policy reads: the next step's load per protocol and quantile",
            tag_keys=("protocol", "quantile"),
        )
        self.actions = metrics.Counter(
            "apsv_scale_actions_total", "Instances started (up) and drained (down)", tag_keys=("protocol", "direction")
        )
        self.trust = metrics.Gauge(
            "apsv_forecast_trust",
            "How far the predictive policy's last decision leaned on the forecast (0 reacts only, 1 fully proactive)",
            tag_keys=("protocol",),
        )
        self.tables = metrics.Gauge(
            "apsv_table_backlog_messages",
            "Messages of the tables peers that reset are expected to re-send (the leading indicator of a reset storm)",
            tag_keys=("protocol",),
        )
        self.forecaster_up = metrics.Gauge(
            "apsv_forecaster_available",
            "1 while the VPSM's forecasts come from the forecaster; 0 when it does not answer and the "
            "predictive policy reacts to the live load alone",
        )
        for p in protocols:  # "0 scale actions", not "no data", before the first one
            for direction in ("up", "down"):
                start_at_zero(self.actions, {"protocol": p, "direction": direction})

    def protocol(
        self,
        protocol: str,
        load: float,
        p99: float | None,
        forecast: Mapping[str, tuple[float, ...]] | None,
        tables: float = 0.0,
        trust: float | None = None,
    ) -> None:
        tags = {"protocol": protocol}
        self.load.set(load, tags)
        if trust is not None:
            self.trust.set(trust, tags)
        self.tables.set(tables, tags)
        if p99 is not None:
            self.p99.set(p99, tags)
        for q, values in (forecast or {}).items():
            if values:
                self.forecast.set(float(values[0]), {"protocol": protocol, "quantile": q})

    def forecaster(self, available: bool) -> None:
        self.forecaster_up.set(1.0 if available else 0.0)

    def instances(self, protocol: str, counts: Mapping[str, int], desired: int) -> None:
        for state, n in counts.items():
            self.n.set(float(n), {"protocol": protocol, "state": state})
        self.desired.set(float(desired), {"protocol": protocol})

    def action(self, protocol: str, direction: str, n: int) -> None:
        self.actions.inc(n, {"protocol": protocol, "direction": direction})


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
) -> Any:
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
    )

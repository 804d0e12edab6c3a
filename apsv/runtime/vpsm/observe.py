"""What the loop observes each step: every instance's load (and a telemetry row each), and the
forecaster's quantiles."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from apsv.runtime.telemetry import now_utc
from apsv.runtime.vpsm.base import Parts

log = logging.getLogger("apsv.vpsm")
# After this many control steps in a row without an answer from the forecaster its forecasts
# are dropped: the predictive policy then reacts to the live load alone (and status says so)
FORECAST_STALE_STEPS = 5
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


class Observe(Parts):
    """Part of the `VPSM` actor (actor.py): what it observes."""

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

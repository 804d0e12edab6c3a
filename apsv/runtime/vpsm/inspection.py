"""What the VPSM shows: its status (for `apsv status`), its instances' handles, telemetry."""

from __future__ import annotations

import os
from typing import Any

import ray

from apsv.runtime.vpsm.base import Parts


class Inspection(Parts):
    """Part of the `VPSM` actor (actor.py): its inspection calls."""

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

        return os.getpid()

    async def flush_telemetry(self) -> list[str]:
        return [str(p) for p in self.telemetry.flush()] if self.telemetry is not None else []


def cluster_figures() -> dict[str, Any]:
    """The cluster's resources as Ray counts them (logical CPUs: scheduling slots), its alive
    nodes, and the real CPU cores of their hosts (`host_cpus`)."""
    r: Any = ray
    alive = [n for n in r.nodes() if n.get("Alive")]
    return {
        "resources": r.cluster_resources(),
        "available": r.available_resources(),
        "nodes": len(alive),
        "host_cpus": host_cpus(alive, r.get_runtime_context().get_node_id(), os.cpu_count()),
    }


def host_cpus(nodes: list[dict[str, Any]], local_node_id: str | None, local_cpus: int | None) -> int | None:
    """The real CPU cores of the hosts the `nodes` run on, or None where they cannot be known.

    Ray records only the CPUs a node declares (its scheduling slots, any number), so the cores
    are known for the host this process runs on alone: `local_cpus`, where every node is on it
    (the node `local_node_id`'s address and hostname); a node on another host makes it None."""
    local = next((n for n in nodes if n.get("NodeID") == local_node_id), None)
    if local is None or not local_cpus:
        return None
    here = (local.get("NodeManagerAddress"), local.get("NodeManagerHostname"))
    if any((n.get("NodeManagerAddress"), n.get("NodeManagerHostname")) != here for n in nodes):
        return None
    return local_cpus

"""Instances the VPSM asked Ray for and has not seen start yet - and why they wait.

Ray keeps an actor whose resources no node can give in PENDING_CREATION, silently, for as long
as it takes. The VPSM records each start it asks for here; one that has waited longer than its
protocol's start latency allows, while the cluster's free resources cannot cover its allocation,
is *unplaceable demand*: `apsv status` shows it as a warning with the resource that is short
(`apsv.capacity.short_of`), and the VPSM logs one ``pending`` event for it. On shutdown every
pending start is cancelled (its actor killed) at once instead of waited for.

Pure bookkeeping: the clock and the free resources are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apsv.capacity import amount, cause_name, short_of

MIN_WAIT_S = 5.0  # a start is "waiting" after this long at least ...
LATENCY_FACTOR = 3.0  # ... or after this many times its protocol's median start latency


@dataclass
class PendingStart:
    instance_id: str
    protocol: str
    handle: Any
    requested: float  # wall time it was asked for
    demand: Mapping[str, float]  # Ray resources it asks for
    reported: bool = False  # its `pending` event is logged


class PendingStarts:
    def __init__(self) -> None:
        self.starts: dict[str, PendingStart] = {}

    def add(self, start: PendingStart) -> None:
        self.starts[start.instance_id] = start

    def done(self, instance_id: str) -> None:
        self.starts.pop(instance_id, None)

    def count(self, protocol: str) -> int:
        return sum(1 for s in self.starts.values() if s.protocol == protocol)

    def handles(self) -> list[Any]:
        return [s.handle for s in self.starts.values()]

    def waiting(self, now: float, start_latency_s: Mapping[str, float]) -> list[PendingStart]:
        """Starts that have waited longer than their protocol's start latency allows."""
        return [
            s
            for s in self.starts.values()
            if now - s.requested > max(MIN_WAIT_S, LATENCY_FACTOR * start_latency_s.get(s.protocol, 1.0))
        ]

    def warnings(
        self, now: float, start_latency_s: Mapping[str, float], available: Mapping[str, float]
    ) -> list[dict[str, Any]]:
        """Waiting starts that the cluster's free resources (`available`) cannot cover, each as
        ``{cause, protocol, instance, waiting_s, message}``; oldest first."""
        out = []
        for s in sorted(self.waiting(now, start_latency_s), key=lambda s: s.requested):
            short = short_of(s.demand, available)
            if short is None:
                continue  # it fits now: starting, not stuck
            need, have = float(s.demand.get(short, 0.0)), float(available.get(short, 0.0))
            out.append(
                {
                    "cause": cause_name(short),
                    "protocol": s.protocol,
                    "instance": s.instance_id,
                    "waiting_s": round(now - s.requested, 1),
                    "message": f"{s.instance_id} cannot be placed: it needs {amount(short, need)}, "
                    f"the cluster has {amount(short, have)} free",
                }
            )
        return out

    def unreported(self, warnings: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The warnings whose start has no `pending` event yet (marking them as reported)."""
        out = []
        for w in warnings:
            s = self.starts.get(w["instance"])
            if s is not None and not s.reported:
                s.reported = True
                out.append(w)
        return out

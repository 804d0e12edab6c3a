"""Will a deployment fit its cluster? Pure arithmetic over resource maps, shared by `apsv config`
(against the local head a configuration would start), `apsv up` (against the cluster it joined
or started) and the VPSM (why an instance it asked for is still pending).

A resource map is Ray's: ``{"CPU": 2.0, "memory": 8e9, "stack_host": 1.0, ...}``. A *cause* is
the resource that is short, named as `apsv status --json` reports it: ``cpu``, ``memory``, or
the custom resource's own name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

EPSILON = 1e-9


def cause_name(resource: str) -> str:
    """Ray's resource name as a warning's cause."""
    return {"CPU": "cpu", "memory": "memory", "GPU": "gpu"}.get(resource, resource)


def short_of(demand: Mapping[str, float], available: Mapping[str, float]) -> str | None:
    """The first resource of `demand` that `available` cannot cover (its Ray name), or None."""
    for name in ("CPU", "memory", *sorted(k for k in demand if k not in ("CPU", "memory"))):
        need = float(demand.get(name, 0.0))
        if need > EPSILON and need > float(available.get(name, 0.0)) + EPSILON:
            return name
    return None


@dataclass(frozen=True)
class Demand:
    """What one part of a deployment asks for: `count` actors of `each` resources."""

    what: str  # "bgp instances", "the forecaster"
    count: int
    each: Mapping[str, float]


def total(demands: Iterable[Demand]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in demands:
        for k, v in d.each.items():
            out[k] = out.get(k, 0.0) + d.count * float(v)
    return out


def amount(resource: str, x: float) -> str:
    """An amount of a resource as a person reads it ("0.5 CPUs", "512.0 MiB", "1 stack_host")."""
    if resource == "memory":
        from apsv.sizes import format_size

        return format_size(int(x))
    if resource == "CPU":
        return f"{x:g} CPU" + ("s" if x != 1 else "")
    return f"{x:g} {resource}"


def fit_warnings(demands: list[Demand], capacity: Mapping[str, float], where: str) -> list[dict[str, str]]:
    """One warning per resource the deployment at its largest (`demands`) needs more of than
    `capacity` (the cluster's total, described by `where`): ``{"cause", "message"}``."""
    need = total(demands)
    out = []
    for name in ("CPU", "memory", *sorted(k for k in need if k not in ("CPU", "memory"))):
        n = need.get(name, 0.0)
        have = float(capacity.get(name, 0.0))
        if n > have + EPSILON:
            parts = " + ".join(
                f"{d.count} x {amount(name, float(d.each[name]))} ({d.what})" for d in demands if d.each.get(name)
            )
            out.append(
                {
                    "cause": cause_name(name),
                    "message": f"at max_instances the deployment needs {amount(name, n)} ({parts}); {where} has "
                    f"{amount(name, have)}: instances beyond that stay pending",
                }
            )
    return out

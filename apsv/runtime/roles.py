"""Which node does what: placement by role, through Ray custom resources.

A cluster says which of its nodes host the control plane (the multiplexer and the VPSM), stack
instances and agents by giving them a custom resource each (cluster.yaml: ``control_plane`` on
the head, ``stack_host`` and ``vrouter_host`` on workers). Every APSV actor asks for a sliver of
its role's resource - a tag, not a budget: a node offering ``stack_host: 1`` takes up to 1,000
instances, whose real budget is their `Allocation` (CPU, memory) - so Ray places each only on a
node of its role. A role set to None asks for nothing (any node will do). A local head (`apsv up`,
`start_local_ray`) offers every role: one node plays them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ROLE_SHARE = 0.001  # of a role's resource per actor (Ray resolves custom resources to 1e-4)
ROLES = ("control_plane", "stack_host", "vrouter_host")


class RoleError(RuntimeError):
    """No node offers a role's resource; the message says which and what to do."""


@dataclass(frozen=True)
class Roles:
    """The custom resource of each role (None: that role is not placed by resource)."""

    control_plane: str | None = "control_plane"
    stack_host: str | None = "stack_host"
    vrouter_host: str | None = "vrouter_host"

    def resource(self, role: str) -> str | None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        name: str | None = getattr(self, role)
        return name

    def request(self, role: str) -> dict[str, float]:
        """What an actor of `role` asks Ray for, beside its CPU and memory."""
        name = self.resource(role)
        return {name: ROLE_SHARE} if name else {}

    def offered(self) -> dict[str, float]:
        """What one node playing every role offers."""
        return {name: 1.0 for role in ROLES if (name := self.resource(role))}

    def check(self, cluster: Mapping[str, float], roles: tuple[str, ...] = ROLES) -> None:
        """Refuse, naming the resource, a cluster where no node offers a role's resource."""
        for role in roles:
            name = self.resource(role)
            if name and float(cluster.get(name, 0.0)) < ROLE_SHARE:
                raise RoleError(
                    f"no node of the cluster offers the resource {name!r} that {role.replace('_', ' ')} actors ask "
                    f"for (placement.{role}): start the nodes meant for it with --resources='{{\"{name}\": 1}}' "
                    f"(cluster.yaml does), or set placement.{role}: null to place them anywhere"
                )


NO_ROLES = Roles(None, None, None)

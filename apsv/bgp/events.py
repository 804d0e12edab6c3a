"""What a BGP session tells its virtual router, besides bytes and transport actions: route
changes, NOTIFICATIONs sent and received, and what it did about BFD and policy changes.
(Graceful restart's and maximum-prefix's events live with those procedures.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import MP_NEXT_HOP
from apsv.bgp.nlri import prefix_str
from apsv.bgp.path_attributes import PathAttributes
from apsv.bgp.rib import BestPathChange
from apsv.stacks.interface import StackEvent


def next_hop_of(attrs: PathAttributes) -> str | None:
    return attrs.get(MP_NEXT_HOP) or attrs.next_hop


@dataclass(frozen=True, slots=True)
class RoutesChanged(StackEvent):
    """Best-path changes (FIB deltas) caused by one UPDATE or session event."""

    route_event: ClassVar[bool] = True
    changes: list[BestPathChange]

    def to_json(self) -> dict[str, Any]:
        out = []
        for ch in self.changes:
            item: dict[str, Any] = {"prefix": prefix_str(ch.prefix, ch.afi)}
            if ch.attributes is None:
                item["action"] = "withdraw"
            else:
                item["action"] = "install"
                item["next_hop"] = next_hop_of(ch.attributes)
                item["as_path"] = [a for _, seg in ch.attributes.as_path for a in seg]
            out.append(item)
        return {"event": "routes", "changes": out}


@dataclass(frozen=True, slots=True)
class PeerNotification(StackEvent):
    """The peer sent a NOTIFICATION."""

    code: int
    subcode: int
    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "notification-received",
            "code": self.code,
            "subcode": self.subcode,
            "name": C.error_name(self.code, self.subcode),
            "data": self.data.hex(),
        }


@dataclass(frozen=True, slots=True)
class BfdClientEvent(StackEvent):
    """What the session did about its BFD session (RFC 5882): ``down`` (torn down at once, held
    down until BFD is up again), ``up`` (re-establishment allowed after `hold_s`, longer the
    more often BFD went down lately)."""

    state: str
    reason: str
    hold_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"event": "bfd", "state": self.state, "reason": self.reason, "hold_s": self.hold_s}


@dataclass(frozen=True, slots=True)
class PolicyChanged(StackEvent):
    """A new policy is in force: `refreshed` lists the families whose routes the peer was asked
    to send again (ROUTE-REFRESH) so that import applies it; `needs_reset` those of a peer that
    cannot refresh (their routes change at the next session reset); export is re-applied at once
    (`announced`, `withdrawn` prefixes)."""

    refreshed: list[str]
    needs_reset: list[str]
    announced: int
    withdrawn: int

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "policy",
            "refreshed": self.refreshed,
            "needs_reset": self.needs_reset,
            "announced": self.announced,
            "withdrawn": self.withdrawn,
        }


@dataclass(frozen=True, slots=True)
class NotificationSent(StackEvent):
    code: int
    subcode: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "notification-sent",
            "code": self.code,
            "subcode": self.subcode,
            "name": C.error_name(self.code, self.subcode),
            "reason": self.reason,
        }

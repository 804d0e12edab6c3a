"""Graceful restart, the receiving speaker's side (RFC 4724 §4.2), for one session.

When a peer that negotiated graceful restart loses its transport without a NOTIFICATION, its
routes stay in the Adj-RIB-In and the Loc-RIB (the virtual router keeps forwarding on them),
marked stale. They stay for at most the peer's restart time while the session is down, then for
at most `stale_routes_time` once it is back; each route the peer sends again stops being stale,
and the peer's End-of-RIB for a family sweeps what it did not send again. A peer that comes
back without the capability, or without the family's forwarding-state bit, loses its stale
routes of that family at once.

Long-lived graceful restart (RFC 9494) extends this for a peer that announced it for a family:
when its restart time runs out (at once where it has none, or lists the family for long-lived
restart only), the family's routes stay for the peer's long-lived stale time (at most the
session's `long_lived_stale_time`). Routes carrying NO_LLGR go then; the others carry LLGR_STALE
from then on (the virtual router sees the community and prefers any other path). Coming back,
End-of-RIB and the stale timer work as above; without the long-lived capability's forwarding
bit for the family, its stale routes go at once.

APSV announces both capabilities with no address family: it performs these procedures for its
peers (RFC 4724 §3: "supports procedures for the Receiving Speaker") and does not claim to
preserve forwarding across a restart of its own.

`StaleRoutes` and `LongLived` only keep the marks and deadlines; the session owns the tables
and the timers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from apsv.bgp import constants as C
from apsv.bgp.context import CodecContext
from apsv.bgp.path_attributes import PathAttributes, with_community
from apsv.bgp.rib import AdjRibIn, BestPathChange, LocRib
from apsv.snapshot import SnapshotReader, SnapshotWriter
from apsv.stacks.interface import StackEvent

Family = tuple[int, int]


@dataclass(frozen=True, slots=True)
class GracefulRestartEvent(StackEvent):
    """A step of the receiving speaker's procedure: `phase` is ``retained`` (routes kept stale
    after the transport dropped), ``long-lived`` (the restart time passed: routes kept for the
    long-lived stale time, marked LLGR_STALE), ``swept`` (stale routes the peer did not send again, at its
    End-of-RIB or at the stale timer), ``expired`` (the peer was not back within its restart
    time) or ``flushed`` (dropped at once: the peer came back without graceful restart for the
    family, or the session was stopped)."""

    phase: str
    routes: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "graceful-restart", "phase": self.phase, "routes": self.routes, "reason": self.reason}


class StaleRoutes:
    """Which Adj-RIB-In keys of each family are stale."""

    __slots__ = ("_by_family",)

    def __init__(self) -> None:
        self._by_family: dict[Family, set[bytes]] = {}

    def __bool__(self) -> bool:
        return any(self._by_family.values())

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._by_family.values())

    def families(self) -> Iterator[Family]:
        return iter(sorted(f for f, keys in self._by_family.items() if keys))

    def count(self, family: Family) -> int:
        return len(self._by_family.get(family, ()))

    def is_stale(self, family: Family, key: bytes) -> bool:
        return key in self._by_family.get(family, ())

    def within(self, family: Family, keys: AbstractSet[bytes]) -> bool:
        """Whether every stale key of the family is among `keys` (a table's own)."""
        return self._by_family.get(family, set()) <= keys

    def mark(self, family: Family, keys: Iterable[bytes]) -> int:
        """Mark `keys` stale (added to any already marked); returns how many the family has now."""
        marked = self._by_family.setdefault(family, set())
        marked.update(keys)
        return len(marked)

    def refreshed(self, family: Family, keys: Iterable[bytes]) -> None:
        """The peer announced or withdrew `keys` again: they are current, whichever it was."""
        marked = self._by_family.get(family)
        if marked:
            marked.difference_update(keys)

    def take(self, family: Family) -> list[bytes]:
        """Unmark and return the family's stale keys (to be removed from the tables)."""
        return sorted(self._by_family.pop(family, ()))

    def clear(self) -> None:
        self._by_family.clear()

    # -- snapshot ----------------------------------------------------------------------------

    def write(self, w: SnapshotWriter) -> None:
        fams = list(self.families())
        w.u32(len(fams))
        for fam in fams:
            w.u32(fam[0])
            w.u32(fam[1])
            w.blobs(sorted(self._by_family[fam]))

    @classmethod
    def read(cls, r: SnapshotReader) -> StaleRoutes:
        s = cls()
        for _ in range(r.u32()):
            fam = (r.u32(), r.u32())
            s.mark(fam, r.blobs())
        return s


class LongLived:
    """Long-lived graceful restart's bookkeeping (RFC 9494): per family, the long-lived stale
    time still to come (the restart time is running) or the moment its routes go."""

    __slots__ = ("pending", "until")

    def __init__(self) -> None:
        self.pending: dict[Family, int] = {}  # family -> long-lived stale time, once the restart time ends
        self.until: dict[Family, float] = {}  # family -> when its long-lived stale routes go

    def __bool__(self) -> bool:
        return bool(self.pending or self.until)

    def clear(self) -> None:
        self.pending.clear()
        self.until.clear()

    def forget(self, family: Family) -> None:
        self.pending.pop(family, None)
        self.until.pop(family, None)

    def next_deadline(self) -> float | None:
        return min(self.until.values()) if self.until else None

    def due(self, now: float) -> list[Family]:
        return sorted(f for f, t in self.until.items() if t <= now)

    def to_json(self) -> dict[str, list[list[float]]]:
        return {
            "pending": [[afi, safi, t] for (afi, safi), t in sorted(self.pending.items())],
            "until": [[afi, safi, at] for (afi, safi), at in sorted(self.until.items())],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> LongLived:
        ll = cls()
        for afi, safi, t in (d or {}).get("pending", ()):
            ll.pending[(int(afi), int(safi))] = int(t)
        for afi, safi, at in (d or {}).get("until", ()):
            ll.until[(int(afi), int(safi))] = float(at)
        return ll


def mark_long_lived(
    rib: AdjRibIn, loc: LocRib, keys: list[bytes], ctx: CodecContext
) -> tuple[list[BestPathChange], int, int]:
    """RFC 9494 §4.2 for one family's stale `keys`, as the restart time ends: routes carrying
    NO_LLGR are deleted, the others carry LLGR_STALE. Returns the best-path changes, how many
    routes were kept and how many deleted (their keys are no longer in the table)."""
    groups: dict[int, tuple[PathAttributes, list[bytes]]] = {}
    for k in keys:
        pa = rib.routes.get(k)
        if pa is not None:
            groups.setdefault(id(pa), (pa, []))[1].append(k)
    changes: list[BestPathChange] = []
    kept = deleted = 0
    for pa, ks in groups.values():
        if C.COMMUNITY_NO_LLGR in (pa.get(C.ATTR_COMMUNITIES) or ()):
            changes += loc.withdraw(rib, ks)
            deleted += len(ks)
        else:
            changes += loc.update(rib, ks, with_community(pa, C.COMMUNITY_LLGR_STALE, ctx))
            kept += len(ks)
    return changes, kept, deleted

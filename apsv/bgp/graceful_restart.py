"""Graceful restart, the receiving speaker's side (RFC 4724 §4.2), for one session.

When a peer that negotiated graceful restart loses its transport without a NOTIFICATION, its
routes stay in the Adj-RIB-In and the Loc-RIB (the virtual router keeps forwarding on them),
marked stale. They stay for at most the peer's restart time while the session is down, then for
at most `stale_routes_time` once it is back; each route the peer sends again stops being stale,
and the peer's End-of-RIB for a family sweeps what it did not send again. A peer that comes
back without the capability, or without the family's forwarding-state bit, loses its stale
routes of that family at once.

APSV announces the capability with no address family: it performs these procedures for its
peers (RFC 4724 §3: "supports procedures for the Receiving Speaker") and does not claim to
preserve forwarding across a restart of its own.

`StaleRoutes` only keeps the marks; the session owns the tables and the timers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from apsv.snapshot import SnapshotReader, SnapshotWriter
from apsv.stack import StackEvent

Family = tuple[int, int]


@dataclass(frozen=True, slots=True)
class GracefulRestartEvent(StackEvent):
    """A step of the receiving speaker's procedure: `phase` is ``retained`` (routes kept stale
    after the transport dropped), ``swept`` (stale routes the peer did not send again, at its
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

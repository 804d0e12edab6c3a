"""Maximum-prefix: how many prefixes a peer may send per family, and what happens past it.

As FRR's `neighbor X maximum-prefix N [THRESHOLD] [warning-only] [restart M]`:

- at `threshold_pct` of N, a warning event (once per crossing);
- past N, the session ends with Cease / Maximum Number of Prefixes Reached (RFC 4486, data:
  AFI, SAFI and N), then stays down until started again, or restarts after `restart_s`;
- with `warning_only`, past N is a warning event, and routes are still accepted. The memory
  bound stays: `HARD_LIMIT` prefixes end the session in every mode.

`PrefixLimit` is pure: counts in, events out; the session acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apsv.bgp import constants as C
from apsv.stacks.interface import StackEvent

Family = tuple[int, int]
HARD_LIMIT = 2_000_000  # prefixes per family per session: what one session's memory is sized for


@dataclass(frozen=True, slots=True)
class PrefixLimitEvent(StackEvent):
    """`kind`: ``threshold`` (crossed threshold_pct of the limit), ``exceeded`` (past the limit,
    warning-only: routes still accepted), ``cease`` (past the limit: the session ends)."""

    kind: str
    family: Family
    received: int
    limit: int
    restart_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "prefix-limit",
            "kind": self.kind,
            "family": C.family_name(self.family),
            "received": self.received,
            "limit": self.limit,
        }
        if self.kind == "cease":
            out["restart_s"] = self.restart_s  # None: down until started again
        return out


@dataclass(slots=True)
class PrefixLimit:
    limit: int | None
    threshold_pct: int = 75
    warning_only: bool = False
    restart_s: float | None = None
    # families above the threshold / above the limit: an event is given once per crossing
    warned: set[Family] = field(default_factory=set)
    exceeded: set[Family] = field(default_factory=set)

    @property
    def rib_limit(self) -> int | None:
        """What the Adj-RIB-In enforces (it ends the session past it)."""
        if self.limit is None:
            return None
        return max(self.limit, HARD_LIMIT) if self.warning_only else self.limit

    def check(self, family: Family, received: int) -> list[PrefixLimitEvent]:
        """The family holds `received` prefixes now: the warnings that are due."""
        if self.limit is None:
            return []
        out: list[PrefixLimitEvent] = []
        if received * 100 >= self.limit * self.threshold_pct:
            if family not in self.warned:
                self.warned.add(family)
                out.append(PrefixLimitEvent("threshold", family, received, self.limit))
        else:
            self.warned.discard(family)
        if received > self.limit:
            if family not in self.exceeded:
                self.exceeded.add(family)
                out.append(PrefixLimitEvent("exceeded", family, received, self.limit))
        else:
            self.exceeded.discard(family)
        return out

    def ceased(self, family: Family, received: int, limit: int) -> PrefixLimitEvent:
        return PrefixLimitEvent("cease", family, received, limit, self.restart_s)

    def reset(self) -> None:
        self.warned.clear()
        self.exceeded.clear()

"""BFD as the session's failure detector (RFC 5882): the session is a client of its BFD session,
torn down when BFD goes down and held down, damped, until BFD is up again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apsv.bgp import constants as C
from apsv.bgp.events import BfdClientEvent
from apsv.bgp.fsm import Event, State
from apsv.bgp.session.common import BFD_FLAP_WINDOW_S, BFD_FLAPS_KEPT

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def bfd_changed(s: BgpSession, old: str, new: str, reason: str, now: float) -> None:
    """Apply a change of the session's BFD state (BgpSession.bfd_changed says what each does)."""
    s._now = now
    if new == "UP" and s.bfd_down:
        s.bfd_down = False
        hold = 0.0
        if s.state is State.IDLE and s.config.auto_restart:
            hold = bfd_hold(s, now)
            s.timers["idle_hold"] = now + hold
        s._out.append(BfdClientEvent("up", reason, hold))
    elif new == "DOWN" and old == "UP" and not reason.startswith("peer is ADMIN_DOWN"):
        s.bfd_down = True
        s.bfd_downs = [*s.bfd_downs, now][-BFD_FLAPS_KEPT:]
        s.counters["bfd_down"] += 1
        s._out.append(BfdClientEvent("down", reason))
        if s.state is not State.IDLE:
            s._cease_subcode, s._cease_data = C.CEASE_BFD_DOWN, b""
            s._why = f"BFD down ({reason})"
            s._dispatch(Event.AUTOMATIC_STOP)
            s._why = ""
        s.timers.pop("idle_hold", None)  # held down until BFD is up again


def bfd_hold(s: BgpSession, now: float) -> float:
    """How long to hold the session down once BFD is up: doubled for each recent down."""
    recent = sum(1 for t in s.bfd_downs if now - t <= BFD_FLAP_WINDOW_S)
    return min(s.config.idle_hold_time * float(2 ** max(recent - 1, 0)), s.config.max_idle_hold_time)

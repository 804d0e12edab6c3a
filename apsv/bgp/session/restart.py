"""Graceful restart (RFC 4724) and long-lived graceful restart (RFC 9494): a restarting peer's
routes kept stale, for how long, and dropped."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apsv.bgp import constants as C
from apsv.bgp.events import (
    RoutesChanged,
)
from apsv.bgp.fsm import State
from apsv.bgp.graceful_restart import GracefulRestartEvent, mark_long_lived
from apsv.bgp.rib import BestPathChange
from apsv.bgp.session.common import Family

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def retain_stale(s: BgpSession, state: State) -> bool:
    """The transport dropped without a NOTIFICATION: keep the routes of a peer that
    negotiated graceful restart, stale, for its restart time. False: delete them as usual."""
    n = s.negotiated
    if state is not State.ESTABLISHED:
        # a re-establishment that failed: what is stale waits out the running restart timer
        return bool(s.stale) and ("gr_restart" in s.timers or "llgr_stale" in s.timers)
    if n is None or not n.graceful_restart:
        return False
    restarting = n.peer_gr_families if n.peer_restart_time > 0 else frozenset()
    cap = s.config.long_lived_stale_time or 0
    long_lived = {f: min(n.llgr_stale_time(f), cap) for f in s.adj_in if n.llgr_stale_time(f) > 0 and cap}
    kept_families = (restarting | long_lived.keys()) & s.adj_in.keys()
    if not kept_families:
        return False  # the peer restarts no family of ours gracefully (a helper only, like APSV)
    # families the peer's capabilities did not list are not kept (RFC 4724 §4.2, RFC 9494 §4.2)
    drop_families(s, [f for f in s.adj_in if f not in kept_families])
    for fam, rib in s.adj_in.items():
        s.stale.mark(fam, rib.routes)
    kept = len(s.stale)
    s.timers.pop("gr_stale", None)
    s.counters["gr_restarts"] += 1
    s.long_lived.clear()
    s.long_lived.pending.update(long_lived)
    if kept_families & restarting:
        s.timers["gr_restart"] = s._now + n.peer_restart_time
        why = f"transport lost; kept stale for the peer's restart time of {n.peer_restart_time} s"
        s._out.append(GracefulRestartEvent("retained", kept, why))
        # a family listed for long-lived restart only starts its long-lived stale time now
        enter_long_lived(s, [f for f in long_lived if f not in restarting])
    else:
        s._out.append(GracefulRestartEvent("retained", kept, "transport lost; the peer has no restart time"))
        enter_long_lived(s, list(long_lived))
    return True


def restart_time_passed(s: BgpSession) -> None:
    """The peer was not back within its restart time: families it restarts long-lived go on
    stale for their long-lived stale time; the others' stale routes go."""
    ll = s.long_lived
    later = [f for f in s.stale.families() if f in ll.pending]
    gone = [f for f in s.stale.families() if f not in ll.pending and f not in ll.until]
    if gone:
        drop_stale(s, gone, "expired", "the peer was not back in its restart time")
    enter_long_lived(s, later)


def enter_long_lived(s: BgpSession, families: list[Family]) -> None:
    """RFC 9494 §4.2: the families' stale routes carrying NO_LLGR go, the others stay for the
    long-lived stale time, marked LLGR_STALE."""
    changes: list[BestPathChange] = []
    for fam in families:
        llst = s.long_lived.pending.pop(fam)
        rib, loc = s.adj_in.get(fam), s.loc_rib.get(fam)
        if rib is None or loc is None:
            continue
        keys = s.stale.take(fam)
        if not keys:
            continue
        moved, kept, deleted = mark_long_lived(rib, loc, keys, s.ctx)
        changes += moved
        s.stale.mark(fam, [k for k in keys if k in rib.routes])
        if s.received is not None and deleted:
            s.received.forget(fam, [k for k in keys if k not in rib.routes])
        s.long_lived.until[fam] = s._now + llst
        s.counters["llgr_stale_kept"] += kept
        s.counters["llgr_no_llgr_deleted"] += deleted
        why = f"restart time over; kept {llst} s more, marked LLGR_STALE ({deleted} NO_LLGR routes deleted)"
        s._out.append(GracefulRestartEvent("long-lived", kept, f"{C.family_name(fam)}: {why}"))
    arm_long_lived(s)
    if changes:
        s._out.append(RoutesChanged(changes))


def long_lived_passed(s: BgpSession, now: float) -> None:
    due = s.long_lived.due(now)
    for fam in due:
        s.long_lived.until.pop(fam, None)
    if due:
        drop_stale(s, due, "expired", "the peer was not back in its long-lived stale time")
    arm_long_lived(s)


def arm_long_lived(s: BgpSession) -> None:
    at = s.long_lived.next_deadline()
    if at is None:
        s.timers.pop("llgr_stale", None)
    else:
        s.timers["llgr_stale"] = at


def gr_reestablished(s: BgpSession) -> None:
    """Back after a restart: stale routes of families the peer no longer restarts gracefully
    go at once; the rest wait for its End-of-RIB, at most stale_routes_time."""
    s.timers.pop("gr_restart", None)
    s.timers.pop("llgr_stale", None)
    long_lived = set(s.long_lived.until)
    s.long_lived.clear()
    if not s.stale:
        return
    n = s.negotiated
    assert n is not None

    def preserved(f: Family) -> bool:
        if f in long_lived:  # RFC 9494 §4.2: the long-lived capability's own forwarding bit
            return n.long_lived and f in n.peer_llgr_forwarding
        return f in n.peer_gr_forwarding

    gone = [f for f in s.stale.families() if not n.graceful_restart or f not in n.families or not preserved(f)]
    if gone:
        drop_stale(s, gone, "flushed", "the peer came back without forwarding state preserved for the family")
    if s.stale:
        s.timers["gr_stale"] = s._now + s.config.stale_routes_time


def drop_stale(s: BgpSession, families: list[Family], phase: str, reason: str) -> None:
    changes: list[BestPathChange] = []
    dropped = 0
    for fam in families:
        keys = s.stale.take(fam)
        rib = s.adj_in.get(fam)
        if s.received is not None:
            s.received.forget(fam, keys)
        if rib is not None and keys:
            dropped += len(keys)
            changes += s.loc_rib[fam].withdraw(rib, keys)
    for fam in families:
        s.long_lived.forget(fam)
    if not s.stale:
        s.timers.pop("gr_restart", None)
        s.timers.pop("gr_stale", None)
        s.long_lived.clear()
    arm_long_lived(s)
    s.counters[f"gr_stale_{phase}"] += dropped
    s._out.append(GracefulRestartEvent(phase, dropped, reason))
    if changes:
        s._out.append(RoutesChanged(changes))


def drop_families(s: BgpSession, families: list[Family]) -> None:
    """Forget these families' tables outright (their routes withdrawn)."""
    changes: list[BestPathChange] = []
    for fam in families:
        s.stale.take(fam)
        s.long_lived.forget(fam)
        if s.received is not None:
            s.received.drop(fam)
        rib = s.adj_in.pop(fam, None)
        loc = s.loc_rib.pop(fam, None)
        if rib is not None and loc is not None and rib.routes:
            changes += loc.withdraw(rib, list(rib.routes))
    if changes:
        s._out.append(RoutesChanged(changes))

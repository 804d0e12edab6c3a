"""What a session host reports about itself and its sessions: its load (counters, sessions,
the table backlog the VPSM provisions for), one session's counters or routing table, and the
list a restarted multiplexer rebuilds its routes from. Off the data path; compiled all the
same, since the load report walks every session on each telemetry tick."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from apsv.runtime.host.state import Entry, HostCounters, Key, Pending


def load(
    sessions: Mapping[Key, Entry], pending: Mapping[Key, Pending], c: HostCounters, pending_output: int
) -> dict[str, Any]:
    return {
        "sessions": len(sessions),
        "pending_sessions": len(pending),
        "frames_in": c.frames_in,
        "applied": c.applied,
        "frames_out": c.frames_out,
        "duplicates": c.duplicates,
        "gaps": c.gaps,
        "unknown_session": c.unknown_session,
        "departed": c.departed,
        "stale": c.stale,
        "out_of_order": c.out_of_order,
        "pending": c.pending,
        "foreign": c.foreign,
        "bad_frames": c.bad_frames,
        "errors": c.errors,
        "output_dropped": c.output_dropped,
        "busy_seconds": round(c.busy_seconds, 6),
        "pending_output": pending_output,
        "table_backlog": table_backlog(sessions, time.time()),
    }


def table_backlog(sessions: Mapping[Key, Entry], now: float) -> int:
    """Frames of the tables the sessions' peers are expected to re-send (BGP sessions that went
    down, or came back and are mid-transfer; `BgpSession.table_backlog` counts UPDATEs): what
    the VPSM provisions for ahead. 0 for protocols without table transfers."""
    total = 0.0
    # a copy: load() runs on the instance's control thread while moves add and remove sessions
    for e in list(sessions.values()):
        fn = getattr(e.session, "table_backlog", None)
        if fn is None:
            return 0  # one protocol per host: none of its sessions has one
        n = int(fn(now))
        if n:
            # in the unit the VPSM counts load in - frames: an agent may pack several UPDATEs
            # into one frame (a TCP read), and does so as this session's peer sends
            counters = getattr(e.session, "counters", None)
            updates = int(counters.get("updates_in", 0)) if counters is not None else 0
            total += n * min(1.0, e.frames / updates) if updates and e.frames else n
    return math.ceil(total)


def session_table(e: Entry, family: str, detail: bool = False) -> list[tuple[Any, ...]]:
    """A session's Loc-RIB for a family name ("ipv4-unicast"), for stacks that keep one."""
    from apsv.bgp.constants import FAMILY_CODES

    table = getattr(e.session, "route_rows" if detail else "loc_rib_table", None)
    if table is None:
        raise TypeError(f"{e.protocol} sessions keep no routing table")
    return list(table(FAMILY_CODES[family]))


def session_info(e: Entry, digest: bool = True) -> dict[str, Any]:
    """A session's counters and stack stats; with `digest`, its RIB digest too (a pass over
    the whole RIB: what a check wants, not a poll)."""
    info: dict[str, Any] = {
        "last_seq": e.last_seq,
        "out_seq": e.out_seq,
        "frames": e.frames,
        "duplicates": e.duplicates,
        "gaps": e.gaps,
        "epoch": e.epoch,
        **e.session.stats(),
    }
    rib_digest = getattr(e.session, "rib_digest", None) if digest else None
    if callable(rib_digest):
        info["rib_digest"] = rib_digest()
    return info


def sessions_report(sessions: Mapping[Key, Entry], pending: Mapping[Key, Pending]) -> list[tuple[Key, str, int, bool]]:
    """(session, owner, epoch, pending) for every session held here: what a restarted
    multiplexer rebuilds its routes from."""
    out = [(k, e.owner, e.epoch, False) for k, e in sessions.items()]
    out += [(k, p.owner, p.epoch, True) for k, p in pending.items()]
    return out

"""Fencing: what a host tells a client whose frame it does not apply, and how it counts it.

A frame is applied only for a session held here for its sender, at the epoch it names. Any
other frame is refused with what the host knows (the session moved, is held at another epoch,
waits for its restore, or is unknown here), so that the client re-sends it by the right route;
a frame of another client's session is dropped and counted, and that client is told nothing.
"""

from __future__ import annotations

from apsv.runtime.host.state import Entry, HostCounters, Key, Pending

MAX_DEPARTED = 4096  # sessions remembered as moved away, per host

# Why frames were refused (the data-plane channel carries these codes; see apsv.runtime.channel).
MOVED, STALE, GAP, UNKNOWN, FOREIGN, PENDING = 1, 2, 3, 4, 5, 6

# A refusal: (session, reason, sequence number, epoch, instance it moved to). The sequence number
# is, for GAP, the next one this host will apply; otherwise the first refused frame's.
Refused = tuple[Key, int, int, int, str]


def refusal(
    key: Key,
    e: Entry | None,
    owner: str,
    seq: int,
    pending: dict[Key, Pending],
    departed: dict[Key, tuple[str, int]],
) -> Refused | None:
    """What to tell a client whose frame `seq` of `key` is not applied here (None: nothing -
    the session is another client's)."""
    if e is not None:
        if e.owner != owner:
            return None
        return (key, STALE, seq, e.epoch, "")
    p = pending.get(key)
    if p is not None:
        return None if p.owner != owner else (key, PENDING, seq, p.epoch, "")
    gone = departed.get(key)
    if gone is not None:
        return (key, MOVED, seq, gone[1], gone[0])
    return (key, UNKNOWN, seq, 0, "")


def count_refused(
    key: Key,
    e: Entry | None,
    owner: str,
    pending: dict[Key, Pending],
    departed: dict[Key, tuple[str, int]],
    c: HostCounters,
) -> None:
    """Count a frame that is not applied, by why."""
    if e is not None:
        if e.owner != owner:
            c.foreign += 1
        else:
            c.stale += 1
    elif key in pending:
        if pending[key].owner != owner:
            c.foreign += 1
        else:
            c.pending += 1
    elif key in departed:
        c.departed += 1
    else:
        c.unknown_session += 1

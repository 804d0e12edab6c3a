"""The session host: what a stack instance runs, whatever backend it is on.

A `SessionHost` holds many sessions of one protocol and turns batches of offload frames into
batches of output frames. It is pure: no Ray, no sockets, the clock passed in. The process
backend calls it inside the instance actor; the Docker backend calls it inside the container.

Ordering and exactly-once: every session's frames carry a per-direction sequence number. The
host applies a frame only if its number is the next one: a lower or equal one is a redelivery
(after a failure or a move) and is dropped and counted; a higher one means a frame before it
has not arrived here (it is still on its way, or was sent where the session was before) and is
refused, so that its sender re-sends from the gap. Output frames get their own per-session
sequence. Snapshots record the last sequence number applied, so a session restored from one and
fed the frames after it ends exactly where the original would have.

Fencing: each session is held at an epoch for one owner (the client that opened it). A frame is
applied only if it names the session's current epoch and comes from its owner; otherwise it is
refused with what the host knows - where the session moved to, its current epoch here, or that
it is waiting to be restored from its client's custody - and the client re-sends it by the
right route. A frame of another owner's session is dropped and counted, never applied.

The parts: core.py (`SessionHost`: lifecycle and the data path), state.py (what is kept per
session, limits, counters), fencing.py (refusals), output.py (output frames and where they
wait), report.py (load and session reports).
"""

from apsv.runtime.host.core import SessionHost
from apsv.runtime.host.fencing import FOREIGN, GAP, MAX_DEPARTED, MOVED, PENDING, STALE, UNKNOWN, Refused
from apsv.runtime.host.output import MAX_UNSOLICITED_FRAMES
from apsv.runtime.host.state import (
    EVENTS_ALL,
    EVENTS_NONE,
    EVENTS_STATE,
    NO_TIMER,
    UNSENT,
    Entry,
    HostCounters,
    HostLimits,
    Key,
    Pending,
    SeqState,
    key_of,
)

__all__ = [
    "EVENTS_ALL",
    "EVENTS_NONE",
    "EVENTS_STATE",
    "FOREIGN",
    "GAP",
    "MAX_DEPARTED",
    "MAX_UNSOLICITED_FRAMES",
    "MOVED",
    "NO_TIMER",
    "PENDING",
    "STALE",
    "UNKNOWN",
    "UNSENT",
    "Entry",
    "HostCounters",
    "HostLimits",
    "Key",
    "Pending",
    "Refused",
    "SeqState",
    "SessionHost",
    "key_of",
]

"""What a session host keeps: each session's entry (its stack session, sequence numbers, owner
and epoch), the places held for sessions waiting for their restore, the host's limits and its
counters. Compiled: the data path reads and writes an `Entry` per frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NamedTuple

from apsv.frame import SessionKey
from apsv.stacks.interface import StackSession

Key = tuple[int, int, int, int]  # (tenant, vrouter, protocol, session): the frame header's identity

# `Entry.wake_sent` before the session's first DEADLINE frame (its client ticks it regularly)
UNSENT: Final = -1.0
NO_TIMER: Final = float("inf")

# Which events a session sends its virtual router (the `emit_events` of open/restore).
EVENTS_NONE, EVENTS_ALL, EVENTS_STATE = 0, 1, 2  # state: everything but routing-table changes


def key_of(k: SessionKey | Key) -> Key:
    return (k.tenant, k.vrouter, k.protocol, k.session) if isinstance(k, SessionKey) else k


@dataclass
class HostLimits:
    max_sessions: int = 10_000
    max_output_frames: int = 100_000  # output not yet collected, per call and unsolicited
    snapshot_every: int = 256  # frames applied to a session between automatic snapshots
    snapshot_bytes: int = 4 << 20  # payload octets applied between automatic snapshots


class SeqState(NamedTuple):
    """A session's sequence bookkeeping, carried with its snapshot across moves and recoveries.

    (A tuple, not a dataclass: it crosses Ray pickled - and the container socket as JSON -
    and this module is compiled.)"""

    last_seq: int = 0  # highest inbound sequence number applied
    out_seq: int = 0  # last outbound sequence number used
    applied: int = 0  # inbound frames applied, over the session's whole life
    duplicates: int = 0  # redelivered frames dropped, likewise


@dataclass
class Entry:
    session: StackSession
    protocol: str
    last_seq: int = 0  # highest inbound sequence number applied
    out_seq: int = 0  # last outbound sequence number used
    since_snapshot: int = 0
    emit_events: int = EVENTS_NONE  # which events go to the agent as EVENTS frames
    frames: int = 0
    duplicates: int = 0
    gaps: int = 0  # frames applied out of order: none, by construction (they are refused)
    owner: str = ""  # the client that opened it: only its frames are applied
    epoch: int = 0  # the route epoch its frames must carry
    since_bytes: int = 0
    wake_sent: float = UNSENT  # the deadline last told its client (NO_TIMER: none)
    applied_at: float = 0.0  # the stack clock of the last frame applied

    def seq_state(self) -> SeqState:
        return SeqState(self.last_seq, self.out_seq, self.frames, self.duplicates)


@dataclass
class Pending:
    """A session placed here whose state is in its client's custody (its instance died): its
    frames are refused until the client restores it, from its snapshot or - never snapshot -
    afresh from its configuration."""

    owner: str
    epoch: int


@dataclass
class HostCounters:
    frames_in: int = 0  # frames received, whatever became of them
    applied: int = 0  # frames applied to their sessions
    frames_out: int = 0
    duplicates: int = 0
    gaps: int = 0
    unknown_session: int = 0
    departed: int = 0  # frames of a session that moved away (refused; the client re-sends them)
    stale: int = 0  # frames naming an older epoch of a session held here (refused, re-sent)
    out_of_order: int = 0  # frames after a gap (refused; re-sent from the gap)
    pending: int = 0  # frames of a session waiting for its restore (refused, re-sent after)
    foreign: int = 0  # frames naming a session another client owns: dropped
    bad_frames: int = 0  # offsets or headers that do not describe a frame: skipped
    errors: int = 0
    output_dropped: int = 0  # output frames over the bound (the oldest unsolicited go first)
    busy_seconds: float = 0.0
    latency_ns: list[int] = field(default_factory=list)  # rx -> processed, drained by telemetry

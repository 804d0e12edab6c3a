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
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from apsv.frame import (
    HEADER,
    HEADER_LEN,
    MAGIC,
    VERSION,
    Frame,
    FrameKind,
    SessionKey,
    encode_deadline,
    encode_frame,
    frame_offsets,
)
from apsv.stack import (
    CloseTransport,
    OpenTransport,
    ProtocolProblem,
    Send,
    StackEvent,
    StackSession,
    TxProgram,
    load_stack,
)

Key = tuple[int, int, int, int]  # (tenant, vrouter, protocol, session): the frame header's identity

MAX_DEPARTED = 4096  # sessions remembered as moved away, per host
MAX_UNSOLICITED_FRAMES = 100_000  # output produced outside a batch, waiting for its owner, per host

# The header as read per frame (the magic as an int: no object made for it), and what is
# looked up per frame kept where the compiled module finds it without a lookup.
_FRAME: Final = struct.Struct("!HBBHHIIQQQQII")
_MAGIC: Final = int.from_bytes(MAGIC, "big")
_pack_header: Final = HEADER.pack
_SendEvent: Final = Send
# Frame kinds as plain ints: compared per frame, where an enum member's lookup costs.
_DATA: Final = int(FrameKind.DATA)
_TIMER: Final = int(FrameKind.TIMER)
_CONNECTED: Final = int(FrameKind.CONNECTED)
_DISCONNECTED: Final = int(FrameKind.DISCONNECTED)
_CONTROL: Final = int(FrameKind.CONTROL)
_EXPIRED: Final = int(FrameKind.EXPIRED)
_SEND: Final = int(FrameKind.SEND)
_CLOSE: Final = int(FrameKind.CLOSE)
_OPEN: Final = int(FrameKind.OPEN)
_TX_PROGRAM: Final = int(FrameKind.TX_PROGRAM)
_DEADLINE: Final = int(FrameKind.DEADLINE)
# `Entry.wake_sent` before the session's first DEADLINE frame (its client ticks it regularly)
UNSENT: Final = -1.0
NO_TIMER: Final = float("inf")

# Which events a session sends its virtual router (the `emit_events` of open/restore).
EVENTS_NONE, EVENTS_ALL, EVENTS_STATE = 0, 1, 2  # state: everything but routing-table changes

# Why frames were refused (the data-plane channel carries these codes; see apsv.runtime.channel).
MOVED, STALE, GAP, UNKNOWN, FOREIGN, PENDING = 1, 2, 3, 4, 5, 6

# A refusal: (session, reason, sequence number, epoch, instance it moved to). The sequence number
# is, for GAP, the next one this host will apply; otherwise the first refused frame's.
Refused = tuple[Key, int, int, int, str]


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


class SessionHost:
    def __init__(self, protocol: str, limits: HostLimits | None = None) -> None:
        self.protocol = protocol
        self.stack = load_stack(protocol)
        self.limits = limits or HostLimits()
        self.sessions: dict[Key, Entry] = {}
        self.pending: dict[Key, Pending] = {}
        self.counters = HostCounters()
        self._out: list[bytes] = []  # output of the batch being applied: headers and payloads
        self._out_frames = 0
        self._in_batch = False
        # output produced outside a batch (opens, closes, timers), by the owner it goes to
        self._unsolicited: dict[str, list[bytes]] = {}
        self._unsolicited_count = 0
        self._snapshots: dict[Key, tuple[SeqState, bytes]] = {}
        # sessions that left, most recent last (bounded): where they went, at which epoch
        self._departed: dict[Key, tuple[str, int]] = {}
        self.refusals: list[Refused] = []  # of the last process() call, one per session
        self._tx_ns = 0

    # -- session lifecycle ---------------------------------------------------------------------

    def open(
        self,
        key: Key,
        config: Mapping[str, Any],
        now: float,
        *,
        emit_events: int = EVENTS_NONE,
        owner: str = "",
        epoch: int = 0,
    ) -> None:
        if key in self.sessions:
            raise ValueError(f"session {key} already exists on this instance")
        if len(self.sessions) >= self.limits.max_sessions:
            raise OverflowError(f"instance is full ({self.limits.max_sessions} sessions)")
        session = self.stack.create_session(config)
        entry = Entry(session, self.protocol, emit_events=emit_events, owner=owner, epoch=epoch)
        self.sessions[key] = entry
        self.pending.pop(key, None)
        self._departed.pop(key, None)
        self._tx_ns = time.time_ns()
        self._emit(key, entry, session.start(now), 0)

    def restore(
        self, key: Key, blob: bytes, seq: SeqState, *, emit_events: int = EVENTS_NONE, owner: str = "", epoch: int = 0
    ) -> None:
        if len(self.sessions) >= self.limits.max_sessions and key not in self.sessions:
            raise OverflowError(f"instance is full ({self.limits.max_sessions} sessions)")
        session = self.stack.restore_session(blob)
        self.pending.pop(key, None)
        self._departed.pop(key, None)
        self.sessions[key] = Entry(
            session,
            self.protocol,
            seq.last_seq,
            seq.out_seq,
            emit_events=emit_events,
            frames=seq.applied,
            duplicates=seq.duplicates,
            owner=owner,
            epoch=epoch,
        )

    def expect(self, key: Key, owner: str, epoch: int) -> None:
        """Hold a place for a session its client will restore (`restore_pending`)."""
        if key in self.sessions:
            raise ValueError(f"session {key} already exists on this instance")
        if len(self.sessions) + len(self.pending) >= self.limits.max_sessions and key not in self.pending:
            raise OverflowError(f"instance is full ({self.limits.max_sessions} sessions)")
        self._departed.pop(key, None)
        self.pending[key] = Pending(owner, epoch)

    def restore_pending(
        self,
        key: Key,
        owner: str,
        epoch: int,
        snapshot: tuple[bytes, SeqState] | None,
        config: Mapping[str, Any],
        emit_events: int,
        now: float,
    ) -> None:
        """The client restores a session held for it, from its custody: the last snapshot it
        has, or afresh from `config` (a session never snapshot, whose every frame the client
        still has). Raises LookupError if nothing is held here for it at that epoch."""
        p = self.pending.get(key)
        if p is None or p.owner != owner or p.epoch != epoch:
            raise LookupError(f"no session {key} waits here for this client at epoch {epoch}")
        if snapshot is None:
            self.open(key, config, now, emit_events=emit_events, owner=owner, epoch=epoch)
        else:
            blob, seq = snapshot
            self.restore(key, blob, seq, emit_events=emit_events, owner=owner, epoch=epoch)

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        """A session's snapshot and its sequence state."""
        e = self.sessions[key]
        return e.session.snapshot(), e.seq_state()

    def detach(self, key: Key, moved_to: str = "", epoch: int = 0) -> tuple[bytes, SeqState]:
        """Snapshot a session and remove it (the first half of a move); its frames still sent
        here are refused, naming `moved_to` at `epoch`."""
        out = self.snapshot(key)
        del self.sessions[key]
        self._snapshots.pop(key, None)
        self.depart(key, moved_to, epoch)
        return out

    def depart(self, key: Key, moved_to: str, epoch: int) -> None:
        self._departed.pop(key, None)
        self._departed[key] = (moved_to, epoch)
        if len(self._departed) > MAX_DEPARTED:
            del self._departed[next(iter(self._departed))]

    def reattach(self, key: Key, blob: bytes, seq: SeqState, owner: str, epoch: int, emit_events: int) -> None:
        """Undo a detach whose move failed: the session is back, at its old epoch."""
        self._departed.pop(key, None)
        self.restore(key, blob, seq, emit_events=emit_events, owner=owner, epoch=epoch)

    def close(self, key: Key, now: float) -> None:
        self.pending.pop(key, None)
        e = self.sessions.pop(key, None)
        self._tx_ns = time.time_ns()
        if e is not None:
            self._emit(key, e, e.session.stop(now, "session closed"), 0)

    # -- the data path -------------------------------------------------------------------------

    def process(
        self,
        data: bytes | memoryview,
        offsets: Sequence[int] | None,
        now: float,
        owner: str = "",
        snapshot_keys: Sequence[Key] = (),
    ) -> bytes:
        """Apply the frames of a batch (those at `offsets`, or all) sent by client `owner`;
        return the output batch. Refused frames are listed in `self.refusals` (one entry per
        session: its first refused frame). `snapshot_keys`: sessions the client wants a
        snapshot of now (its custody of their frames grew large), taken after the batch.

        The batch may sit in memory its sender can still write: each offset and header is
        checked before it is read, and a frame only ever reaches its owner's own sessions.
        """
        t0 = time.perf_counter()
        view = memoryview(data)
        size = len(view)
        self._tx_ns = time.time_ns()
        self._out = []
        self._out_frames = 0
        self._in_batch = True
        if offsets is None:
            offsets = frame_offsets(view, strict=False)  # a malformed frame ends it: counted below
        elif not isinstance(offsets, list):
            offsets = list(offsets)
        # everything the loop uses, in locals (compiled: no lookup per frame)
        unpack = _FRAME.unpack_from
        hl = HEADER_LEN
        version_ok = VERSION
        magic_ok = _MAGIC
        time_ns = time.time_ns
        data_kind = _DATA
        sessions = self.sessions
        c = self.counters
        lat = c.latency_ns
        refused: dict[Key, Refused] = {}
        touched: dict[Key, Entry] = {}  # sessions whose next timer may have moved
        applied = 0
        snapshot_every = self.limits.snapshot_every
        snapshot_bytes = self.limits.snapshot_bytes
        for off in offsets:
            if off < 0 or off + hl > size:
                c.bad_frames += 1
                continue
            magic, version, kind, proto, _f, tenant, vrouter, sid, seq, rx, _tx, n, epoch = unpack(view, off)
            if magic != magic_ok or version != version_ok or off + hl + n > size:
                c.bad_frames += 1
                continue
            key = (tenant, vrouter, proto, sid)
            e = sessions.get(key)
            c.frames_in += 1  # (live: a batch in progress shows)
            if e is None or e.owner != owner or e.epoch != epoch:
                if key not in refused:
                    r = self._refusal(key, e, owner, seq)
                    if r is not None:
                        refused[key] = r
                self._count_refused(key, e, owner)
                continue
            last = e.last_seq
            if seq != last + 1:
                if seq <= last:
                    e.duplicates += 1
                    c.duplicates += 1
                else:
                    c.out_of_order += 1
                    if key not in refused:
                        refused[key] = (key, GAP, last + 1, e.epoch, "")
                continue
            e.last_seq = seq
            e.frames += 1
            applied += 1
            s = e.session
            # The stack's clock is the frame's own time (when the agent received it): a session
            # restored from a snapshot and fed the same frames again then does exactly the same.
            t = rx / 1e9 if rx else now
            try:
                if kind == data_kind:
                    events = s.data_received(view[off + hl : off + hl + n], t)
                elif kind == _TIMER:
                    events = s.on_timer(t)
                elif kind == _CONNECTED:
                    events = s.connection_made(t)
                elif kind == _DISCONNECTED:
                    events = s.connection_lost(t, bytes(view[off + hl : off + hl + n]).decode())
                elif kind == _CONTROL:
                    command = json.loads(bytes(view[off + hl : off + hl + n]))
                    events = s.control(command, t)  # type: ignore[attr-defined]
                elif kind == _EXPIRED:
                    name = bytes(view[off + hl : off + hl + n]).decode()
                    events = s.timer_expired(name, t)  # type: ignore[attr-defined]
                else:
                    c.errors += 1
                    continue
            except Exception as x:  # a stack bug or a bad command must not take down the other sessions
                c.errors += 1
                self._emit(key, e, [ProtocolProblem("refused", f"{_kind_name(kind)}: {type(x).__name__}: {x}")], rx)
                continue
            if events:
                self._emit(key, e, events, rx)
            touched[key] = e
            e.applied_at = t
            if rx and len(lat) < 65536:
                # receive -> applied, stamped after this frame: the wait behind the frames of the
                # batch before it counts, as it does for the message
                lat.append(time_ns() - rx)
            e.since_snapshot += 1
            e.since_bytes += n
            if e.since_snapshot >= snapshot_every or e.since_bytes >= snapshot_bytes:
                self._snapshots[key] = (e.seq_state(), s.snapshot())
                e.since_snapshot = 0
                e.since_bytes = 0
        for key, e in touched.items():  # once per session and batch, not per frame
            self._tell_deadline(key, e, e.applied_at)
        for key in snapshot_keys:
            e = sessions.get(key)
            if e is not None and e.owner == owner and e.since_snapshot:
                self._snapshots[key] = (e.seq_state(), e.session.snapshot())
                e.since_snapshot = 0
                e.since_bytes = 0
        self.refusals = list(refused.values())
        c.applied += applied
        out = b"".join(self._out)
        self._out = []
        self._in_batch = False
        c.busy_seconds += time.perf_counter() - t0
        return out

    def _refusal(self, key: Key, e: Entry | None, owner: str, seq: int) -> Refused | None:
        """What to tell a client whose frame `seq` of `key` is not applied here (None: nothing -
        the session is another client's)."""
        if e is not None:
            if e.owner != owner:
                return None
            return (key, STALE, seq, e.epoch, "")
        p = self.pending.get(key)
        if p is not None:
            return None if p.owner != owner else (key, PENDING, seq, p.epoch, "")
        gone = self._departed.get(key)
        if gone is not None:
            return (key, MOVED, seq, gone[1], gone[0])
        return (key, UNKNOWN, seq, 0, "")

    def _count_refused(self, key: Key, e: Entry | None, owner: str) -> None:
        c = self.counters
        if e is not None:
            if e.owner != owner:
                c.foreign += 1
            else:
                c.stale += 1
        elif key in self.pending:
            if self.pending[key].owner != owner:
                c.foreign += 1
            else:
                c.pending += 1
        elif key in self._departed:
            c.departed += 1
        else:
            c.unknown_session += 1

    def tick(self, now: float) -> int:
        """Run the timers of every session that is due; output waits for collect()."""
        self._tx_ns = time.time_ns()
        n = 0
        for key, e in self.sessions.items():
            d = e.session.next_deadline()
            if d is not None and d <= now:
                self._emit(key, e, e.session.on_timer(now), 0)
                n += 1
        return n

    def collect(self) -> dict[str, bytes]:
        """Output produced outside batches (opens, closes, timers), by the owner it is for."""
        out = {owner: b"".join(frames) for owner, frames in self._unsolicited.items() if frames}
        self._unsolicited = {}
        self._unsolicited_count = 0
        return out

    def owner_of(self, key: Key) -> str | None:
        e = self.sessions.get(key)
        if e is not None:
            return e.owner
        p = self.pending.get(key)
        return None if p is None else p.owner

    def has_snapshots(self) -> bool:
        return bool(self._snapshots)

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]:
        """Snapshots made since the last call, by session: (sequence state, blob)."""
        snaps, self._snapshots = self._snapshots, {}
        return snaps

    # -- output --------------------------------------------------------------------------------

    def _emit(self, key: Key, e: Entry, events: list[StackEvent], rx_ns: int) -> None:
        tenant, vrouter, proto, sid = key
        tx = self._tx_ns
        pack = _pack_header
        magic, version = MAGIC, VERSION
        lines: list[dict[str, Any]] | None = None
        for ev in events:
            t = type(ev)
            if t is _SendEvent:
                kind, payload = _SEND, ev.data  # type: ignore[attr-defined]
            elif t is CloseTransport:
                kind, payload = _CLOSE, ev.reason.encode()  # type: ignore[attr-defined]
            elif t is OpenTransport:
                kind, payload = _OPEN, b""
            elif t is TxProgram:
                kind, payload = _TX_PROGRAM, ev.data  # type: ignore[attr-defined]
            else:
                if e.emit_events == EVENTS_ALL or (e.emit_events == EVENTS_STATE and not ev.route_event):
                    if lines is None:
                        lines = []
                    lines.append(ev.to_json())
                continue
            e.out_seq += 1
            # header and payload queued apart, joined once for the whole output
            self._queue(
                e.owner,
                pack(magic, version, kind, proto, 0, tenant, vrouter, sid, e.out_seq, rx_ns, tx, len(payload), 0),
                payload,
            )
        if lines:
            e.out_seq += 1
            body = "\n".join(json.dumps(x, separators=(",", ":")) for x in lines).encode()
            self._queue(
                e.owner,
                encode_frame(Frame(FrameKind.EVENTS, proto, tenant, vrouter, sid, e.out_seq, rx_ns, tx, body)),
                b"",
            )

    def _tell_deadline(self, key: Key, e: Entry, now: float) -> None:
        """A DEADLINE frame when the session's next timer comes earlier than the one its client
        was told, or that one has passed (not when a timer only moves later, as the hold timer
        does with every message: the client then ticks early once, and hears the new one)."""
        d = e.session.next_deadline()
        w = e.wake_sent
        if d is None:
            if w == UNSENT or w > now:  # never told, or told "none" (inf), or its tick is still to come
                return
            d_value, payload = NO_TIMER, encode_deadline(None)
        else:
            if w != UNSENT and d >= w - 0.001 and w > now:
                return
            d_value, payload = d, encode_deadline(d)
        e.wake_sent = d_value
        tenant, vrouter, proto, sid = key
        # sequence number 0 and no receive stamp: outside the session's output order
        header = _pack_header(
            MAGIC, VERSION, _DEADLINE, proto, 0, tenant, vrouter, sid, 0, 0, self._tx_ns, len(payload), 0
        )
        self._queue(e.owner, header, payload)

    def _queue(self, owner: str, header: bytes, payload: bytes) -> None:
        c = self.counters
        if self._in_batch:
            if self._out_frames >= self.limits.max_output_frames:
                c.output_dropped += 1  # never grows without bound
                return
            self._out.append(header)
            self._out.append(payload)
            self._out_frames += 1
        else:
            if self._unsolicited_count >= MAX_UNSOLICITED_FRAMES:
                c.output_dropped += 1  # an owner that never collects loses the newest (counted)
                return
            self._unsolicited.setdefault(owner, []).append(header + payload)
            self._unsolicited_count += 1
        c.frames_out += 1

    # -- load ----------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        c = self.counters
        return {
            "sessions": len(self.sessions),
            "pending_sessions": len(self.pending),
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
            "pending_output": self._unsolicited_count,
            "table_backlog": self.table_backlog(time.time()),
        }

    def table_backlog(self, now: float) -> int:
        """Frames of the tables the sessions' peers are expected to re-send (BGP sessions that went
        down, or came back and are mid-transfer; `BgpSession.table_backlog` counts UPDATEs): what
        the VPSM provisions for ahead. 0 for protocols without table transfers."""
        total = 0.0
        # a copy: load() runs on the instance's control thread while moves add and remove sessions
        for e in list(self.sessions.values()):
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

    def session_table(self, key: Key, family: str, detail: bool = False) -> list[tuple[Any, ...]]:
        """A session's Loc-RIB for a family name ("ipv4-unicast"), for stacks that keep one."""
        from apsv.bgp.constants import FAMILY_CODES

        table = getattr(self.sessions[key].session, "route_rows" if detail else "loc_rib_table", None)
        if table is None:
            raise TypeError(f"{self.protocol} sessions keep no routing table")
        return list(table(FAMILY_CODES[family]))

    def session_info(self, key: Key, digest: bool = True) -> dict[str, Any]:
        """A session's counters and stack stats; with `digest`, its RIB digest too (a pass over
        the whole RIB: what a check wants, not a poll)."""
        e = self.sessions[key]
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

    def sessions_report(self) -> list[tuple[Key, str, int, bool]]:
        """(session, owner, epoch, pending) for every session held here: what a restarted
        multiplexer rebuilds its routes from."""
        out = [(k, e.owner, e.epoch, False) for k, e in self.sessions.items()]
        out += [(k, p.owner, p.epoch, True) for k, p in self.pending.items()]
        return out


def _kind_name(kind: int) -> str:
    try:
        return FrameKind(kind).name
    except ValueError:
        return str(kind)

"""The session host: what a stack instance runs, whatever backend it is on.

A `SessionHost` holds many sessions of one protocol and turns batches of offload frames into
batches of output frames. It is pure: no Ray, no sockets, the clock passed in. The process
backend calls it inside the instance actor; the Docker backend calls it inside the container.

Ordering and exactly-once: every session's frames carry a per-direction sequence number. The
host applies a frame only if its number is above the last one applied; a lower or equal one is
a redelivery (after a failure or a move) and is dropped and counted. Output frames get their
own per-session sequence. Snapshots record the last sequence number applied, so a session
restored from one and fed the frames after it ends exactly where the original would have.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from apsv.frame import HEADER, HEADER_LEN, MAGIC, VERSION, Frame, FrameKind, SessionKey, encode_frame, frame_offsets
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

# Which events a session sends its virtual router (the `emit_events` of open/restore).
EVENTS_NONE, EVENTS_ALL, EVENTS_STATE = 0, 1, 2  # state: everything but routing-table changes


def key_of(k: SessionKey | Key) -> Key:
    return (k.tenant, k.vrouter, k.protocol, k.session) if isinstance(k, SessionKey) else k


@dataclass
class HostLimits:
    max_sessions: int = 10_000
    max_output_frames: int = 100_000  # queued timer output not yet collected
    snapshot_every: int = 256  # frames applied to a session between automatic snapshots


class SeqState(NamedTuple):
    """A session's sequence bookkeeping, carried with its snapshot across moves and recoveries.

    (A tuple, not a dataclass: it crosses Ray and the container socket, pickled, and this
    module is compiled.)"""

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
    gaps: int = 0

    def seq_state(self) -> SeqState:
        return SeqState(self.last_seq, self.out_seq, self.frames, self.duplicates)


@dataclass
class HostCounters:
    frames_in: int = 0
    frames_out: int = 0
    duplicates: int = 0
    gaps: int = 0
    unknown_session: int = 0
    departed: int = 0  # frames of a session moved away after they were sent here (applied at its new instance)
    foreign: int = 0  # frames naming a session the multiplexer did not route here
    errors: int = 0
    busy_seconds: float = 0.0
    latency_ns: list[int] = field(default_factory=list)  # rx -> processed, drained by telemetry


class SessionHost:
    def __init__(self, protocol: str, limits: HostLimits | None = None) -> None:
        self.protocol = protocol
        self.stack = load_stack(protocol)
        self.limits = limits or HostLimits()
        self.sessions: dict[Key, Entry] = {}
        self.counters = HostCounters()
        self._pending: list[bytes] = []  # output produced outside process() (timers)
        self._snapshots: dict[Key, tuple[SeqState, bytes]] = {}
        # sessions detached from here, most recent last (bounded): their frames still queued
        # here are not errors - the multiplexer redelivers them to the session's new instance
        self._departed: dict[Key, None] = {}
        self._tx_ns = 0

    # -- session lifecycle ---------------------------------------------------------------------

    def open(self, key: Key, config: Mapping[str, Any], now: float, *, emit_events: int = EVENTS_NONE) -> None:
        if key in self.sessions:
            raise ValueError(f"session {key} already exists on this instance")
        if len(self.sessions) >= self.limits.max_sessions:
            raise OverflowError(f"instance is full ({self.limits.max_sessions} sessions)")
        session = self.stack.create_session(config)
        entry = Entry(session, self.protocol, emit_events=emit_events)
        self.sessions[key] = entry
        self._departed.pop(key, None)
        self._tx_ns = time.time_ns()
        self._emit(key, entry, session.start(now), 0)

    def restore(self, key: Key, blob: bytes, seq: SeqState, *, emit_events: int = EVENTS_NONE) -> None:
        if len(self.sessions) >= self.limits.max_sessions and key not in self.sessions:
            raise OverflowError(f"instance is full ({self.limits.max_sessions} sessions)")
        session = self.stack.restore_session(blob)
        self._departed.pop(key, None)
        self.sessions[key] = Entry(
            session,
            self.protocol,
            seq.last_seq,
            seq.out_seq,
            emit_events=emit_events,
            frames=seq.applied,
            duplicates=seq.duplicates,
        )

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        """A session's snapshot and its sequence state."""
        e = self.sessions[key]
        return e.session.snapshot(), e.seq_state()

    def detach(self, key: Key) -> tuple[bytes, SeqState]:
        """Snapshot a session and remove it (the first half of a move)."""
        out = self.snapshot(key)
        del self.sessions[key]
        self._snapshots.pop(key, None)
        self._departed[key] = None
        if len(self._departed) > MAX_DEPARTED:
            del self._departed[next(iter(self._departed))]
        return out

    def close(self, key: Key, now: float) -> None:
        e = self.sessions.pop(key, None)
        self._tx_ns = time.time_ns()
        if e is not None:
            self._emit(key, e, e.session.stop(now, "session closed"), 0)

    # -- the data path -------------------------------------------------------------------------

    def process(
        self, data: bytes | memoryview, offsets: Sequence[int] | None, now: float, allowed: set[Key] | None = None
    ) -> bytes:
        """Apply the frames of a batch (those at `offsets`, or all) and return the output batch.

        With `allowed`, a frame of any other session is refused (counted as foreign): the batch
        sits in memory its sender can still write, and the multiplexer vetted these sessions.
        """
        t0 = time.perf_counter()
        view = memoryview(data)
        self._tx_ns = time.time_ns()
        # Output from before this call (e.g. a close) stays for collect(): what this returns
        # belongs to these frames' sessions only, so the caller can hand it to their owner.
        earlier, self._pending = self._pending, []
        if offsets is None:
            offsets = frame_offsets(view)
        elif not isinstance(offsets, list):
            offsets = offsets.tolist()  # type: ignore[attr-defined]  # a numpy array from the multiplexer
        unpack = HEADER.unpack_from
        sessions = self.sessions
        c = self.counters
        lat = c.latency_ns
        for off in offsets:
            _m, _v, kind, proto, _f, tenant, vrouter, sid, seq, rx, _tx, n, _r = unpack(view, off)
            key = (tenant, vrouter, proto, sid)
            e = sessions.get(key)
            c.frames_in += 1
            if allowed is not None and key not in allowed:
                c.foreign += 1
                continue
            if e is None:
                if key in self._departed:
                    c.departed += 1
                else:
                    c.unknown_session += 1
                continue
            if seq <= e.last_seq:
                e.duplicates += 1
                c.duplicates += 1
                continue
            if seq != e.last_seq + 1 and e.last_seq:
                e.gaps += 1
                c.gaps += 1
            e.last_seq = seq
            e.frames += 1
            s = e.session
            # The stack's clock is the frame's own time (when the agent received it): a session
            # restored from a snapshot and fed the same frames again then does exactly the same.
            t = rx / 1e9 if rx else now
            try:
                if kind == FrameKind.DATA:
                    events = s.data_received(view[off + HEADER_LEN : off + HEADER_LEN + n], t)
                elif kind == FrameKind.TIMER:
                    events = s.on_timer(t)
                elif kind == FrameKind.CONNECTED:
                    events = s.connection_made(t)
                elif kind == FrameKind.DISCONNECTED:
                    events = s.connection_lost(t, bytes(view[off + HEADER_LEN : off + HEADER_LEN + n]).decode())
                elif kind == FrameKind.CONTROL:
                    command = json.loads(bytes(view[off + HEADER_LEN : off + HEADER_LEN + n]))
                    events = s.control(command, t)  # type: ignore[attr-defined]
                elif kind == FrameKind.EXPIRED:
                    name = bytes(view[off + HEADER_LEN : off + HEADER_LEN + n]).decode()
                    events = s.timer_expired(name, t)  # type: ignore[attr-defined]
                else:
                    c.errors += 1
                    continue
            except Exception as x:  # a stack bug or a bad command must not take down the other sessions
                c.errors += 1
                self._emit(key, e, [ProtocolProblem("refused", f"{FrameKind(kind).name}: {type(x).__name__}: {x}")], rx)
                continue
            if events:
                self._emit(key, e, events, rx)
            if rx and len(lat) < 65536:
                # receive -> applied, stamped after this frame: the wait behind the frames of the
                # batch before it counts, as it does for the message
                lat.append(time.time_ns() - rx)
            e.since_snapshot += 1
            if e.since_snapshot >= self.limits.snapshot_every:
                self._snapshots[key] = (e.seq_state(), s.snapshot())
                e.since_snapshot = 0
        out = b"".join(self._pending)
        self._pending = earlier
        c.busy_seconds += time.perf_counter() - t0
        return out

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

    def collect(self) -> bytes:
        out = b"".join(self._pending)
        self._pending = []
        return out

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]:
        """Snapshots made since the last call, by session: (sequence state, blob)."""
        snaps, self._snapshots = self._snapshots, {}
        return snaps

    # -- output --------------------------------------------------------------------------------

    def _emit(self, key: Key, e: Entry, events: list[StackEvent], rx_ns: int) -> None:
        tenant, vrouter, proto, sid = key
        tx = self._tx_ns
        pack = HEADER.pack
        lines: list[dict[str, Any]] | None = None
        for ev in events:
            t = type(ev)
            if t is Send:
                kind, payload = FrameKind.SEND, ev.data  # type: ignore[attr-defined]
            elif t is CloseTransport:
                kind, payload = FrameKind.CLOSE, ev.reason.encode()  # type: ignore[attr-defined]
            elif t is OpenTransport:
                kind, payload = FrameKind.OPEN, b""
            elif t is TxProgram:
                kind, payload = FrameKind.TX_PROGRAM, ev.data  # type: ignore[attr-defined]
            else:
                if e.emit_events == EVENTS_ALL or (e.emit_events == EVENTS_STATE and not ev.route_event):
                    if lines is None:
                        lines = []
                    lines.append(ev.to_json())
                continue
            e.out_seq += 1
            self._queue(
                pack(MAGIC, VERSION, kind, proto, 0, tenant, vrouter, sid, e.out_seq, rx_ns, tx, len(payload), 0)
                + payload
            )
        if lines:
            e.out_seq += 1
            body = "\n".join(json.dumps(x, separators=(",", ":")) for x in lines).encode()
            self._queue(encode_frame(Frame(FrameKind.EVENTS, proto, tenant, vrouter, sid, e.out_seq, rx_ns, tx, body)))

    def _queue(self, frame: bytes) -> None:
        if len(self._pending) >= self.limits.max_output_frames:
            self.counters.errors += 1  # never grows without bound: the oldest output is the agent's loss
            return
        self._pending.append(frame)
        self.counters.frames_out += 1

    # -- load ----------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        c = self.counters
        return {
            "sessions": len(self.sessions),
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "duplicates": c.duplicates,
            "gaps": c.gaps,
            "unknown_session": c.unknown_session,
            "departed": c.departed,
            "foreign": c.foreign,
            "errors": c.errors,
            "busy_seconds": round(c.busy_seconds, 6),
            "pending_output": len(self._pending),
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

    def session_table(self, key: Key, family: str) -> list[tuple[str, str | None, str]]:
        """A session's Loc-RIB for a family name ("ipv4-unicast"), for stacks that keep one."""
        from apsv.bgp.constants import FAMILY_CODES

        table = getattr(self.sessions[key].session, "loc_rib_table", None)
        if table is None:
            raise TypeError(f"{self.protocol} sessions keep no routing table")
        return list(table(FAMILY_CODES[family]))

    def session_info(self, key: Key) -> dict[str, Any]:
        e = self.sessions[key]
        info: dict[str, Any] = {
            "last_seq": e.last_seq,
            "out_seq": e.out_seq,
            "frames": e.frames,
            "duplicates": e.duplicates,
            "gaps": e.gaps,
            **e.session.stats(),
        }
        digest = getattr(e.session, "rib_digest", None)
        if callable(digest):
            info["rib_digest"] = digest()
        return info

"""`SessionHost`: its sessions' lifecycle (open, restore, move, close) and the data path that
applies batches of frames to them (the package's docstring has the ordering and fencing rules).
Compiled: `process` is the data path's loop."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from apsv.frame import HEADER_LEN, MAGIC, VERSION, FrameKind, frame_offsets
from apsv.runtime.host import report
from apsv.runtime.host.fencing import GAP, MAX_DEPARTED, Refused, count_refused, refusal
from apsv.runtime.host.output import Output
from apsv.runtime.host.state import EVENTS_NONE, Entry, HostCounters, HostLimits, Key, Pending, SeqState
from apsv.stacks.interface import ProtocolProblem, load_stack

# The header as read per frame (the magic as an int: no object made for it), kept where the
# compiled module finds it without a lookup.
_FRAME: Final = struct.Struct("!HBBHHIIQQQQII")
_MAGIC: Final = int.from_bytes(MAGIC, "big")
# Frame kinds as plain ints: compared per frame, where an enum member's lookup costs.
_DATA: Final = int(FrameKind.DATA)
_TIMER: Final = int(FrameKind.TIMER)
_CONNECTED: Final = int(FrameKind.CONNECTED)
_DISCONNECTED: Final = int(FrameKind.DISCONNECTED)
_CONTROL: Final = int(FrameKind.CONTROL)
_EXPIRED: Final = int(FrameKind.EXPIRED)


class SessionHost:
    def __init__(self, protocol: str, limits: HostLimits | None = None) -> None:
        self.protocol = protocol
        self.stack = load_stack(protocol)
        self.limits = limits or HostLimits()
        self.sessions: dict[Key, Entry] = {}
        self.pending: dict[Key, Pending] = {}
        self.counters = HostCounters()
        self.output = Output(self.limits, self.counters)
        self._snapshots: dict[Key, tuple[SeqState, bytes]] = {}
        # sessions that left, most recent last (bounded): where they went, at which epoch
        self._departed: dict[Key, tuple[str, int]] = {}
        self.refusals: list[Refused] = []  # of the last process() call, one per session

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
        self.output.tx_ns = time.time_ns()
        self.output.emit(key, entry, session.start(now), 0)

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
        self.output.tx_ns = time.time_ns()
        if e is not None:
            self.output.emit(key, e, e.session.stop(now, "session closed"), 0)

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
        self.output.begin_batch(time.time_ns())
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
                self._refuse(refused, key, e, owner, seq)
                continue
            if seq != e.last_seq + 1:
                self._out_of_sequence(refused, key, e, seq)
                continue
            e.last_seq = seq
            e.frames += 1
            applied += 1
            # The stack's clock is the frame's own time (when the agent received it): a session
            # restored from a snapshot and fed the same frames again then does exactly the same.
            t = rx / 1e9 if rx else now
            if not self._apply(key, e, kind, view, off + hl, n, t, rx):
                continue
            touched[key] = e
            e.applied_at = t
            if rx and len(lat) < 65536:
                # receive -> applied, stamped after this frame: the wait behind the frames of the
                # batch before it counts, as it does for the message
                lat.append(time_ns() - rx)
            e.since_snapshot += 1
            e.since_bytes += n
            if e.since_snapshot >= snapshot_every or e.since_bytes >= snapshot_bytes:
                self._take_snapshot(key, e)
        self._end_batch(touched, owner, snapshot_keys)
        self.refusals = list(refused.values())
        c.applied += applied
        out = self.output.end_batch()
        c.busy_seconds += time.perf_counter() - t0
        return out

    def _refuse(self, refused: dict[Key, Refused], key: Key, e: Entry | None, owner: str, seq: int) -> None:
        """A frame not for a session held here for `owner` at the epoch it names: counted, and the
        batch's first such frame of its session answered (apsv.runtime.host.fencing)."""
        if key not in refused:
            r = refusal(key, e, owner, seq, self.pending, self._departed)
            if r is not None:
                refused[key] = r
        count_refused(key, e, owner, self.pending, self._departed, self.counters)

    def _out_of_sequence(self, refused: dict[Key, Refused], key: Key, e: Entry, seq: int) -> None:
        """A frame whose number is not the session's next: a redelivery is dropped and counted;
        one after a gap is refused, so that its client re-sends from the gap."""
        last = e.last_seq
        if seq <= last:
            e.duplicates += 1
            self.counters.duplicates += 1
        else:
            self.counters.out_of_order += 1
            if key not in refused:
                refused[key] = (key, GAP, last + 1, e.epoch, "")

    def _apply(self, key: Key, e: Entry, kind: int, view: memoryview, start: int, n: int, t: float, rx: int) -> bool:
        """Hand a frame (its body the `n` octets at `start`) to its session and queue what the
        session answers. False if it was not applied: a kind no session takes, or the stack
        raised (both counted as errors)."""
        s = e.session
        try:
            if kind == _DATA:
                events = s.data_received(view[start : start + n], t)
            elif kind == _TIMER:
                events = s.on_timer(t)
            elif kind == _CONNECTED:
                events = s.connection_made(t)
            elif kind == _DISCONNECTED:
                events = s.connection_lost(t, bytes(view[start : start + n]).decode())
            elif kind == _CONTROL:
                command = json.loads(bytes(view[start : start + n]))
                events = s.control(command, t)  # type: ignore[attr-defined]
            elif kind == _EXPIRED:
                name = bytes(view[start : start + n]).decode()
                events = s.timer_expired(name, t)  # type: ignore[attr-defined]
            else:
                self.counters.errors += 1
                return False
        except Exception as x:  # a stack bug or a bad command must not take down the other sessions
            self.counters.errors += 1
            self.output.emit(key, e, [ProtocolProblem("refused", f"{_kind_name(kind)}: {type(x).__name__}: {x}")], rx)
            return False
        if events:
            self.output.emit(key, e, events, rx)
        return True

    def _end_batch(self, touched: dict[Key, Entry], owner: str, snapshot_keys: Sequence[Key]) -> None:
        """Once per session and batch, not per frame: tell the clients the deadlines that moved,
        and take the snapshots the client asked for."""
        for key, e in touched.items():
            self.output.tell_deadline(key, e, e.applied_at)
        for key in snapshot_keys:
            asked = self.sessions.get(key)
            if asked is not None and asked.owner == owner and asked.since_snapshot:
                self._take_snapshot(key, asked)

    def _take_snapshot(self, key: Key, e: Entry) -> None:
        """Snapshot a session for its client's custody (collected by `take_snapshots`)."""
        self._snapshots[key] = (e.seq_state(), e.session.snapshot())
        e.since_snapshot = 0
        e.since_bytes = 0

    def tick(self, now: float) -> int:
        """Run the timers of every session that is due; output waits for collect()."""
        self.output.tx_ns = time.time_ns()
        n = 0
        for key, e in self.sessions.items():
            d = e.session.next_deadline()
            if d is not None and d <= now:
                self.output.emit(key, e, e.session.on_timer(now), 0)
                n += 1
        return n

    def collect(self) -> dict[str, bytes]:
        """Output produced outside batches (opens, closes, timers), by the owner it is for."""
        return self.output.collect()

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

    # -- reports (apsv.runtime.host.report) ------------------------------------------------------

    def load(self) -> dict[str, Any]:
        return report.load(self.sessions, self.pending, self.counters, self.output.unsolicited_count)

    def table_backlog(self, now: float) -> int:
        return report.table_backlog(self.sessions, now)

    def session_table(self, key: Key, family: str, detail: bool = False) -> list[tuple[Any, ...]]:
        return report.session_table(self.sessions[key], family, detail)

    def session_info(self, key: Key, digest: bool = True) -> dict[str, Any]:
        return report.session_info(self.sessions[key], digest)

    def sessions_report(self) -> list[tuple[Key, str, int, bool]]:
        return report.sessions_report(self.sessions, self.pending)


def _kind_name(kind: int) -> str:
    try:
        return FrameKind(kind).name
    except ValueError:
        return str(kind)

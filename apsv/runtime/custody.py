"""A client's custody of its sessions: the last snapshot of each, and every frame sent since (pure).

A session's state lives in one stack instance; what it would take to rebuild it elsewhere lives
with the client that owns it - the agent holding the session's socket, so the two share fate:
if the agent goes, the session's transport is gone anyway. Each batch a client sends is copied
once into a `Chunk` (off the path to the stack decoder, which reads the client's buffer in
place); a session keeps, in order, the chunks holding its frames since its last snapshot. The
instances send snapshots back with their replies, every `snapshot_every` frames of a session or
when asked (`wants_snapshot`); a snapshot frees what it covers.

With custody here, the multiplexer owns no session state at all: it can restart without losing
any, and a session whose instance died - or whose every instance died - is restored on another
from its snapshot, then fed the frames after it (`frames_from`); the instance drops any it
already has, by sequence number.

Bounded by octets: past `max_bytes` in all, or `session_bytes` for one session, the sessions
holding the most are asked for a snapshot; past twice `max_bytes` the client stops taking
frames until snapshots free some (counted).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from apsv.frame import HEADER, HEADER_LEN
from apsv.runtime.host import Key, SeqState


class Chunk:
    """A copy of one batch, shared by the sessions with frames in it."""

    __slots__ = ("data", "refs")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.refs = 0


@dataclass
class CustodyStats:
    chunks: int = 0
    bytes: int = 0
    peak_bytes: int = 0
    snapshots: int = 0
    snapshot_bytes: int = 0  # of the snapshots held now
    snapshots_requested: int = 0
    frames_resent: int = 0


class SessionCustody:
    __slots__ = ("chunks", "octets", "snapshot")

    def __init__(self) -> None:
        self.snapshot: tuple[bytes, SeqState] | None = None
        # (chunk, first seq, last seq, octets of this session's frames in it), oldest first
        self.chunks: deque[tuple[Chunk, int, int, int]] = deque()
        self.octets = 0

    @property
    def covered(self) -> int:
        """The last sequence number the snapshot holds (0: none yet)."""
        return 0 if self.snapshot is None else self.snapshot[1].last_seq


class Custody:
    def __init__(self, max_bytes: int = 256 << 20, session_bytes: int = 16 << 20) -> None:
        self.max_bytes = max_bytes
        self.session_bytes = session_bytes
        self.sessions: dict[Key, SessionCustody] = {}
        self.over: set[Key] = set()  # sessions holding more than `session_bytes`
        self._asked: dict[Key, float] = {}  # when a snapshot was last asked of a session
        self.stats = CustodyStats()

    def add(self, key: Key) -> None:
        self.sessions.setdefault(key, SessionCustody())

    def remove(self, key: Key) -> None:
        sc = self.sessions.pop(key, None)
        self.over.discard(key)
        self._asked.pop(key, None)
        if sc is not None:
            if sc.snapshot is not None:
                self.stats.snapshot_bytes -= len(sc.snapshot[0])
            for chunk, *_ in sc.chunks:
                self._unref(chunk)

    # -- what was sent -------------------------------------------------------------------------

    def retain(self, data: bytes, ranges: list[tuple[Key, int, int, int]]) -> None:
        """A batch was sent: `data` is its copy, `ranges` each session's (key, first seq, last
        seq, octets) in it."""
        chunk = Chunk(data)
        for key, first, last, octets in ranges:
            sc = self.sessions.get(key)
            if sc is None or last <= sc.covered:
                continue
            sc.chunks.append((chunk, first, last, octets))
            sc.octets += octets
            chunk.refs += 1
            if sc.octets > self.session_bytes:
                self.over.add(key)
        if chunk.refs:
            self.stats.chunks += 1
            self.stats.bytes += len(data)
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)

    def snapshot(self, key: Key, seq: SeqState, blob: bytes) -> None:
        """An instance snapshot the session: keep it if it is the newest, free what it covers."""
        sc = self.sessions.get(key)
        if sc is None or seq.last_seq < sc.covered or (sc.snapshot is not None and seq.last_seq == sc.covered):
            return
        if sc.snapshot is not None:
            self.stats.snapshot_bytes -= len(sc.snapshot[0])
        sc.snapshot = (blob, seq)
        self.stats.snapshots += 1
        self.stats.snapshot_bytes += len(blob)
        while sc.chunks and sc.chunks[0][2] <= seq.last_seq:
            chunk, _f, _l, octets = sc.chunks.popleft()
            sc.octets -= octets
            self._unref(chunk)
        self._asked.pop(key, None)
        if sc.octets <= self.session_bytes:
            self.over.discard(key)

    def _unref(self, chunk: Chunk) -> None:
        chunk.refs -= 1
        if chunk.refs == 0:
            self.stats.chunks -= 1
            self.stats.bytes -= len(chunk.data)

    # -- bounds --------------------------------------------------------------------------------

    def wants_snapshot(self, now: float, limit: int = 64) -> list[Key]:
        """Sessions to ask a snapshot of: those over their own bound and, while the whole is
        over its bound, those holding the most - each at most once a second."""
        over = list(self.over)
        if self.stats.bytes > self.max_bytes:
            biggest = sorted(self.sessions.items(), key=lambda kv: -kv[1].octets)[:limit]
            over += [k for k, sc in biggest if sc.octets and k not in self.over]
        out = [k for k in over if now - self._asked.get(k, -1e9) >= 1.0][:limit]
        for k in out:
            self._asked[k] = now
        self.stats.snapshots_requested += len(out)
        return out

    def full(self) -> bool:
        """Too much held to take more frames (the sender waits for snapshots)."""
        return self.stats.bytes > 2 * self.max_bytes

    # -- what a resend or a restore takes ------------------------------------------------------

    def frames_from(self, key: Key, seq: int) -> Iterator[memoryview]:
        """The session's frames with sequence numbers from `seq` on (those a snapshot covers
        are never needed again), in order, each once, as views of the chunks."""
        sc = self.sessions.get(key)
        if sc is None:
            return
        want = max(seq, sc.covered + 1)
        tenant, vrouter, proto, sid = key
        unpack = HEADER.unpack_from
        for chunk, _first, last, _octets in list(sc.chunks):
            if last < want:
                continue
            view = memoryview(chunk.data)
            off, end = 0, len(view)
            while off + HEADER_LEN <= end:
                _m, _v, _k, p, _fl, t, v, s, q, _rx, _tx, n, _e = unpack(view, off)
                size = HEADER_LEN + n
                if q == want and s == sid and v == vrouter and t == tenant and p == proto:
                    yield view[off : off + size]
                    self.stats.frames_resent += 1
                    want += 1
                off += size

    def restore_point(self, key: Key) -> tuple[tuple[bytes, SeqState] | None, int]:
        """What restores the session elsewhere: its snapshot (None: never snapshot) and the
        first sequence number to re-send after it."""
        sc = self.sessions.get(key)
        if sc is None:
            return None, 1
        return sc.snapshot, sc.covered + 1

    def held(self, key: Key) -> int:
        sc = self.sessions.get(key)
        return 0 if sc is None else sc.octets

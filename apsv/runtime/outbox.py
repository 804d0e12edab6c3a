"""A client's frames on their way out: its sessions, and the buffer being filled (pure; compiled).

This is the client's per-frame work, compiled with the host (setup.py): a frame is written once,
where the instances will read it, and noted in the part of the buffer for its session's route -
nothing else happens per frame. What a batch needs besides (custody, windows, counters) is taken
once per buffer, when it is sent (`OffloadClient.flush`).
"""

from __future__ import annotations

import struct
import time
from typing import Any, Final

from apsv.frame import HEADER, HEADER_LEN, MAGIC, VERSION
from apsv.runtime.host import Key

_pack_header: Final = HEADER.pack_into
_EPOCH: Final = struct.Struct("!I")  # the header's epoch field, at offset 52


class Session:
    """What a client knows of one of its sessions."""

    def __init__(self, key: Key, protocol: str, config: dict[str, Any], emit: int) -> None:
        self.key = key
        self.protocol = protocol
        self.config = config
        self.emit = emit
        self.seq = 0  # last sequence number given
        self.epoch = 0
        self.link: Any = None  # where its frames go (a Link); None: held until a route comes
        self.hold = True
        self.resend_from = 0  # frames from here on are to be sent again once routed (0: none)
        self.resent_from = 0
        self.resend_mark = -1
        self.restoring = 0  # request id of a restore in flight
        self.restored = 0  # the epoch it was last restored at (from custody)
        self.located = 0.0  # when the multiplexer was last asked where it is
        self.opened = time.monotonic()
        self.buf: Any = None  # the pool buffer its latest frames are in
        self.part_of: Any = None  # the buffer `part` is for
        self.part: list[int] | None = None  # offsets of its frames that go to `link` from that buffer
        self.first = 0  # its first sequence number in that buffer
        self.octets = 0  # its octets in that buffer


class Outbox:
    """The pool buffer being filled: frames written into it, sorted by where they go."""

    def __init__(self) -> None:
        self.buf: Any = None  # the pool buffer (None: none taken)
        self.mv: memoryview = memoryview(b"")
        self.used = 0
        self.cap = 0
        self.frames = 0
        self.parts: dict[Any, list[int]] = {}  # offsets of the frames for each link
        self.touched: list[Session] = []  # sessions with frames in it

    def start(self, buf: Any, mv: memoryview, cap: int) -> None:
        self.buf, self.mv, self.cap = buf, mv, cap
        self.used = self.frames = 0
        self.parts = {}
        self.touched = []

    def write(self, s: Session, kind: int, payload: bytes | memoryview, rx_ns: int) -> int:
        """Write one frame of `s` (numbered, at its route's epoch); its offset, or -1 if it
        does not fit (or no buffer is taken)."""
        n = len(payload)
        off = self.used
        end = off + HEADER_LEN + n
        if end > self.cap:
            return -1
        key = s.key
        seq = s.seq + 1
        now = time.time_ns()
        mv = self.mv
        _pack_header(
            mv, off, MAGIC, VERSION, kind, key[2], 0, key[0], key[1], key[3], seq, rx_ns or now, now, n, s.epoch
        )
        mv[off + HEADER_LEN : end] = payload
        self.used = end
        self.frames += 1
        s.seq = seq
        buf = self.buf
        if s.buf is not buf:
            s.buf = buf
            s.first = seq
            s.octets = 0
            self.touched.append(s)
        s.octets += end - off
        part = s.part
        if s.part_of is not buf:
            s.part_of = buf
            if s.hold or s.link is None:
                part = None
            else:
                part = self.parts.get(s.link)
                if part is None:
                    part = self.parts[s.link] = []
            s.part = part
        if part is not None:
            part.append(off)
        return off

    def copy(self, s: Session, frame: bytes | memoryview, epoch: int) -> int:
        """Copy a whole frame of `s` in (a resend from custody), at `epoch`; its offset, or -1."""
        off = self.used
        end = off + len(frame)
        if end > self.cap:
            return -1
        mv = self.mv
        mv[off:end] = frame
        _EPOCH.pack_into(mv, off + 52, epoch)
        self.used = end
        self.frames += 1
        if s.buf is not self.buf:
            s.buf = self.buf
            s.first = int.from_bytes(frame[24:32], "big")
            s.octets = 0
            self.touched.append(s)
        s.octets += end - off
        part = self.parts.get(s.link)
        if part is None:
            part = self.parts[s.link] = []
        part.append(off)
        return off

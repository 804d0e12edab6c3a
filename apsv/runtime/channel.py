"""The data-plane channel between an offload client and a stack instance: its messages (pure).

The frames themselves never travel on this channel on the same node: they stay where the
client wrote them, in its shared-memory buffer pool, and a BATCH names them by position. The
channel carries those descriptors one way and, the other way, each batch's REPLY - the output
frames its sessions produced, the frames the instance refused (fencing), and the snapshots it
took, which the client keeps in custody. Across nodes the same REPLY comes back as the result of
a Ray call (`StackInstance.rx_batch`), so a client reads both transports with one decoder.

A message on a stream: u32 length (of what follows), u8 type, body. Integers are network byte
order. A session key is tenant u32, vrouter u32, protocol u16, session u64.

    HELLO    1  u16 version | str client | 32 credential | str segment ("" if none)
    BATCH    2  u64 batch | u32 start | u32 length | u32 frames | u32 snapshot requests |
                key * requests | offset * frames (u32 little-endian, relative to start: the one
                array both ends handle as machine words, with no per-offset conversion)
    RESTORE  3  u64 request | key | u32 epoch | u8 emit events | u8 has snapshot | seq state |
                u32 n | snapshot blob, or the session's configuration (JSON) when it has none
    WELCOME 64  str instance | u32 window (octets in flight allowed on this connection)
    REPLY   65  u64 batch | u32 refusals | u32 snapshots | refusal * | snapshot * | u32 n | output
    OUTPUT  66  u32 snapshots | snapshot * | u32 n | output      (not tied to a batch, or a part
                of the next REPLY's: see `reply_messages`)
    RESTORED 67 u64 request | key | str error ("" when restored)
    ERROR  127  str reason                                          (then the instance closes)

    str = u16 n | n octets of UTF-8;  seq state = last u64 | out u64 | applied u64 | duplicates u64
    refusal = key | u8 reason | u64 seq | u32 epoch | str instance   (seq: GAP - the next one the
              instance will apply; otherwise the session's first frame it refused)
    snapshot = key | seq state | u32 n | blob
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from apsv.errors import DecodeError
from apsv.frame import HEADER, HEADER_LEN
from apsv.runtime.host import GAP, MOVED, PENDING, STALE, UNKNOWN, Key, SeqState

VERSION: Final = 1
MAX_MESSAGE: Final = 256 << 20  # a restore of a large RIB is the biggest thing on the channel
PART_BYTES: Final = 64 << 20  # a reply carrying more goes as several messages (`reply_messages`)
MAX_REFUSALS: Final = 1 << 20  # refusals in one REPLY (each at most ~300 octets)

HELLO, BATCH, RESTORE = 1, 2, 3
WELCOME, REPLY, OUTPUT, RESTORED, ERROR = 64, 65, 66, 67, 127

# Why an instance refused a session's frames (the host decides; the client re-sends them where
# they belong): MOVED - the session left, `instance`/`epoch` say where to; STALE - it is here at a
# later epoch than the frame's (`epoch`); GAP - an earlier frame has not been applied here,
# re-send from `expected`; UNKNOWN - not here, no word of where; PENDING - placed here, waiting
# for its client to restore it from custody. (Frames of another client's session are dropped
# without a word.)
REASONS: Final = {MOVED: "moved", STALE: "stale", GAP: "gap", UNKNOWN: "unknown", PENDING: "pending"}

_LEN = struct.Struct("!I")
_KEY = struct.Struct("!IIHQ")
_SEQ = struct.Struct("!QQQQ")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_BATCH = struct.Struct("!BQIIII")
_REPLY = struct.Struct("!BQII")
_REFUSAL = struct.Struct("!BQI")
_RESTORE = struct.Struct("!BQ")


@dataclass(frozen=True, slots=True)
class Refusal:
    key: Key
    reason: int
    seq: int = 0  # GAP: the next sequence number the instance will apply; else the first refused
    epoch: int = 0  # MOVED / STALE: the session's epoch where it is now
    instance: str = ""  # MOVED: where it went


@dataclass(frozen=True, slots=True)
class Snapshot:
    key: Key
    seq: SeqState
    blob: bytes


@dataclass(slots=True)
class Reply:
    """What an instance answers for one batch (or sends unasked, `batch` = -1)."""

    batch: int
    output: bytes = b""
    refusals: list[Refusal] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)


def _str(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise ValueError("string too long for the channel")
    return _U16.pack(len(b)) + b


def _frame(body: bytes | bytearray) -> bytes:
    return _frame_parts([body])


def _frame_parts(parts: list[bytes | bytearray | memoryview]) -> bytes:
    """One message from its parts, copied once."""
    n = sum(len(p) for p in parts)
    if n > MAX_MESSAGE:
        raise ValueError(f"channel message of {n} octets exceeds {MAX_MESSAGE}")
    return b"".join([_LEN.pack(n), *parts])


def _snapshots(snaps: Sequence[Snapshot]) -> bytes:
    parts = []
    for s in snaps:
        parts.append(_KEY.pack(*s.key) + _SEQ.pack(*s.seq) + _U32.pack(len(s.blob)))
        parts.append(s.blob)
    return b"".join(parts)


# -- encoding ----------------------------------------------------------------------------------


def hello(client: str, credential: bytes, segment: str) -> bytes:
    if len(credential) != 32:
        raise ValueError("a credential is 32 octets")
    return _frame(bytes([HELLO]) + _U16.pack(VERSION) + _str(client) + credential + _str(segment))


def batch(batch_id: int, start: int, length: int, offsets: bytes, snapshot_keys: Sequence[Key] = ()) -> bytes:
    """`offsets`: u32 little-endian (`offsets_bytes`), relative to `start`, one per frame."""
    head = _BATCH.pack(BATCH, batch_id, start, length, len(offsets) // 4, len(snapshot_keys))
    return _frame(head + b"".join(_KEY.pack(*k) for k in snapshot_keys) + offsets)


def restore(
    request: int,
    key: Key,
    epoch: int,
    emit_events: int,
    snapshot: tuple[bytes, SeqState] | None,
    config: Mapping[str, Any],
) -> bytes:
    """Restore a session held for this client (from custody): its snapshot, or - none taken
    yet - its configuration, to open it afresh before its frames are re-sent from the first."""
    blob, seq = snapshot if snapshot is not None else (json.dumps(dict(config)).encode(), SeqState())
    return _frame(
        _RESTORE.pack(RESTORE, request)
        + _KEY.pack(*key)
        + _U32.pack(epoch)
        + bytes([emit_events, snapshot is not None])
        + _SEQ.pack(*seq)
        + _U32.pack(len(blob))
        + blob
    )


def welcome(instance: str, window: int) -> bytes:
    return _frame(bytes([WELCOME]) + _str(instance) + _U32.pack(min(window, 0xFFFFFFFF)))


def reply(r: Reply) -> bytes:
    parts: list[bytes | bytearray | memoryview] = [
        _REPLY.pack(REPLY, r.batch & 0xFFFFFFFFFFFFFFFF, len(r.refusals), len(r.snapshots))
    ]
    for f in r.refusals:
        parts.append(_KEY.pack(*f.key) + _REFUSAL.pack(f.reason, f.seq, f.epoch) + _str(f.instance))
    if r.snapshots:
        parts.append(_snapshots(r.snapshots))
    parts.append(_U32.pack(len(r.output)))
    parts.append(r.output)
    return _frame_parts(parts)


def output(out: bytes, snaps: Sequence[Snapshot] = ()) -> bytes:
    return _frame_parts([bytes([OUTPUT]) + _U32.pack(len(snaps)) + _snapshots(snaps) + _U32.pack(len(out)), out])


def reply_messages(r: Reply, limit: int = PART_BYTES) -> tuple[list[bytes], int]:
    """A batch's reply as channel messages, each well under MAX_MESSAGE: what does not fit one
    REPLY goes ahead of it in OUTPUT messages - the output cut at frame boundaries, snapshots
    apart - which the client delivers in order before the REPLY completes the batch. Also the
    number of snapshots left out, each on its own too large for the channel (the client keeps
    the session's frames in custody, so nothing is lost but a shorter restore)."""
    if len(r.output) + sum(len(s.blob) for s in r.snapshots) + 64 * len(r.refusals) <= limit:
        return [reply(r)], 0
    msgs: list[bytes] = []
    dropped = 0
    for s in r.snapshots:
        if len(s.blob) > MAX_MESSAGE - 4096:
            dropped += 1
        else:
            msgs.append(output(b"", [s]))
    parts = _cut_frames(r.output, limit)
    for part in parts[:-1]:
        msgs.append(output(part))
    refusals = r.refusals
    while len(refusals) > MAX_REFUSALS:  # (only a batch of millions of sessions' frames)
        msgs.append(reply(Reply(r.batch, b"", refusals[:MAX_REFUSALS])))
        refusals = refusals[MAX_REFUSALS:]
    msgs.append(reply(Reply(r.batch, parts[-1] if parts else b"", refusals)))
    return msgs, dropped


def output_messages(out: bytes) -> list[bytes]:
    """Output produced outside a batch as OUTPUT messages (none for none)."""
    return [output(part) for part in _cut_frames(out, PART_BYTES)] if out else []


def _cut_frames(data: bytes, limit: int) -> list[bytes]:
    """Frames back to back, cut into runs of at most `limit` octets (a frame is never split)."""
    if len(data) <= limit:
        return [data]
    view = memoryview(data)
    out: list[bytes] = []
    start = off = 0
    while off + HEADER_LEN <= len(data):
        size = HEADER_LEN + HEADER.unpack_from(data, off)[11]  # (its payload's length)
        if off + size - start > limit and off > start:
            out.append(bytes(view[start:off]))
            start = off
        off += size
    out.append(bytes(view[start:]))
    return out


def restored(request: int, key: Key, error: str = "") -> bytes:
    return _frame(_RESTORE.pack(RESTORED, request) + _KEY.pack(*key) + _str(error))


def error(reason: str) -> bytes:
    return _frame(bytes([ERROR]) + _str(reason[:1000]))


# -- decoding ----------------------------------------------------------------------------------


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DecodeError("channel message truncated", self.pos)
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        end = self.pos + s.size
        if end > len(self.data):
            raise DecodeError("channel message truncated", self.pos)
        out = s.unpack_from(self.data, self.pos)
        self.pos = end
        return out

    def str(self) -> str:
        (n,) = self.unpack(_U16)
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise DecodeError("channel string is not UTF-8", self.pos) from None

    def key(self) -> Key:
        t, v, p, s = self.unpack(_KEY)
        return (t, v, p, s)

    def blob(self) -> bytes:
        (n,) = self.unpack(_U32)
        return self.take(n)

    def snapshots(self, count: int) -> list[Snapshot]:
        out = []
        for _ in range(count):
            k = self.key()
            seq = SeqState(*self.unpack(_SEQ))
            out.append(Snapshot(k, seq, self.blob()))
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{len(self.data) - self.pos} octets after a channel message", self.pos)


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    client: str
    credential: bytes
    segment: str


@dataclass(frozen=True, slots=True)
class Batch:
    batch: int
    start: int
    length: int
    offsets: bytes  # u32 big-endian per frame, relative to start
    snapshot_keys: list[Key]


@dataclass(frozen=True, slots=True)
class Restore:
    request: int
    key: Key
    epoch: int
    emit_events: int
    snapshot: tuple[bytes, SeqState] | None
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Welcome:
    instance: str
    window: int


@dataclass(frozen=True, slots=True)
class Restored:
    request: int
    key: Key
    error: str


Message = Hello | Batch | Restore | Welcome | Reply | Restored | str


def decode(body: bytes | memoryview) -> Message:
    """One message body (its length prefix removed). ERROR decodes to its reason (a str).
    Raises DecodeError for anything malformed."""
    if not body:
        raise DecodeError("empty channel message")
    kind = body[0]
    c = _Cursor(body)
    msg: Message
    if kind == HELLO:
        c.pos = 1
        (version,) = c.unpack(_U16)
        client = c.str()
        msg = Hello(version, client, c.take(32), c.str())
    elif kind == BATCH:
        _t, bid, start, length, frames, nsnap = c.unpack(_BATCH)
        keys = [c.key() for _ in range(nsnap)]
        msg = Batch(bid, start, length, c.take(4 * frames), keys)
    elif kind == RESTORE:
        _t, req = c.unpack(_RESTORE)
        key = c.key()
        (epoch,) = c.unpack(_U32)
        emit, has = c.take(2)
        seq = SeqState(*c.unpack(_SEQ))
        blob = c.blob()
        if has:
            msg = Restore(req, key, epoch, emit, (blob, seq), {})
        else:
            try:
                config = json.loads(blob)
            except ValueError:
                raise DecodeError("restore: the configuration is not JSON") from None
            if not isinstance(config, dict):
                raise DecodeError("restore: the configuration is not an object")
            msg = Restore(req, key, epoch, emit, None, config)
    elif kind == WELCOME:
        c.pos = 1
        inst = c.str()
        (window,) = c.unpack(_U32)
        msg = Welcome(inst, window)
    elif kind == REPLY:
        _t, bid, nref, nsnap = c.unpack(_REPLY)
        refusals = []
        for _ in range(nref):
            k = c.key()
            reason, first, epoch = c.unpack(_REFUSAL)
            refusals.append(Refusal(k, reason, first, epoch, c.str()))
        snaps = c.snapshots(nsnap)
        msg = Reply(bid, c.blob(), refusals, snaps)
    elif kind == OUTPUT:
        c.pos = 1
        (nsnap,) = c.unpack(_U32)
        snaps = c.snapshots(nsnap)
        msg = Reply(-1, c.blob(), [], snaps)
    elif kind == RESTORED:
        _t, req = c.unpack(_RESTORE)
        key = c.key()
        msg = Restored(req, key, c.str())
    elif kind == ERROR:
        c.pos = 1
        msg = c.str()
    else:
        raise DecodeError(f"channel message type {kind} undefined")
    c.end()
    return msg


class Reader:
    """Splits a byte stream into message bodies (sans-I/O: feed it what the socket gave).

    `buffer()` is where the next read goes (`sock.recv_into(reader.buffer())`), `advance(n)`
    says how much arrived, and `messages()` hands out the complete bodies so far (copies, so
    they outlive the next read). Bounded: a declared length over MAX_MESSAGE is an error."""

    def __init__(self, size: int = 1 << 20) -> None:
        self._buf = bytearray(size)
        self._start = 0
        self._end = 0

    def buffer(self) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        if len(self._buf) - self._end < 4096 and self._start:
            self._compact()
        if len(self._buf) - self._end < 4096:
            self._buf.extend(bytes(len(self._buf)))
        return memoryview(self._buf)[self._end :]

    def _compact(self) -> None:
        n = self._end - self._start
        self._buf[:n] = self._buf[self._start : self._end]
        self._start, self._end = 0, n

    def advance(self, n: int) -> None:
        self._end += n

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            room = self.buffer()
            k = min(len(room), len(view))
            room[:k] = view[:k]
            del room
            self.advance(k)
            view = view[k:]

    def messages(self) -> list[bytes]:
        out = []
        buf = self._buf
        while self._end - self._start >= 4:
            (n,) = _LEN.unpack_from(buf, self._start)
            if n > MAX_MESSAGE:
                raise DecodeError(f"channel message of {n} octets exceeds {MAX_MESSAGE}")
            if self._end - self._start - 4 < n:
                if n + 4 > len(buf) - self._start:  # make room for the rest of it
                    self._compact()
                    if n + 4 > len(buf):
                        buf.extend(bytes(n + 4 - len(buf)))
                break
            out.append(bytes(buf[self._start + 4 : self._start + 4 + n]))
            self._start += 4 + n
        return out


def offsets_bytes(offsets: list[int], base: int = 0) -> bytes:
    """Frame offsets (relative to `base`) as a BATCH carries them."""
    a = array("I", offsets if not base else [o - base for o in offsets])
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def offsets_list(data: bytes) -> list[int]:
    a = array("I")
    a.frombytes(data)
    if _SWAP:
        a.byteswap()
    return a.tolist()


_SWAP = sys.byteorder != "little"
assert array("I").itemsize == 4, "this platform's unsigned int is not 32-bit"

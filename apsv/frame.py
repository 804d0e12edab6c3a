"""The offload frame: the unit that crosses between a virtual router's agent and the cluster.

Version 1 layout (network byte order, 56-octet header, then the payload):

    offset size field
    0      2    magic        b"AF"
    2      1    version      1
    3      1    kind         FrameKind (what the payload is)
    4      2    protocol     ProtocolId (BGP = 1, BFD = 2, ...)
    6      2    flags        reserved, 0
    8      4    tenant       tenant id
    12     4    vrouter      virtual router id within the tenant
    16     8    session      session id within the virtual router
    24     8    seq          per-session sequence number, per direction, starting at 1
    32     8    rx_ns        when the agent received the bytes (ns since the Unix epoch)
    40     8    tx_ns        when the frame was sent into the cluster (ns)
    48     4    length       payload length in octets
    52     4    epoch        the route epoch the sender addressed (agent -> cluster; 0 otherwise)

A batch is frames back to back. `decode_batch` returns frames whose payloads are memoryview
slices of the batch buffer: a frame crosses the cluster without its payload being copied.
See docs/frame-format.md.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from apsv.errors import DecodeError

MAGIC: Final = b"AF"
VERSION: Final = 1
HEADER = struct.Struct("!2sBBHHIIQQQQII")
HEADER_LEN: Final = HEADER.size  # 56
MAX_PAYLOAD: Final = 1 << 20  # 1 MiB: far above any BGP (65535) or BFD message


class FrameKind(enum.IntEnum):
    """What a frame carries. Agent -> cluster kinds are below 64, cluster -> agent kinds above."""

    DATA = 1  # bytes the agent received from the peer
    CONNECTED = 2  # the transport came up (BGP: TCP established); payload: JSON endpoint info
    DISCONNECTED = 3  # the transport went down; payload: reason text
    TIMER = 4  # a tick: lets a stack run its timers when no traffic arrives
    CONTROL = 5  # a command for the session from its virtual router (JSON: announce, withdraw, ...)
    EXPIRED = 6  # a timer the agent runs for the stack expired (BFD detection time); payload: its name
    SEND = 64  # bytes for the agent to send to the peer
    CLOSE = 65  # the agent must close the transport
    EVENTS = 66  # route/state events for the virtual router (JSON lines)
    TX_PROGRAM = 67  # periodic transmission the agent must run (BFD): payload describes it
    OPEN = 68  # the agent must open the transport towards the peer (BGP: active TCP connect)
    # When the session's next timer is due (payload: an 8-octet IEEE double, unix seconds; empty:
    # no timer), sent when it comes earlier than the last one sent, or that one has passed: the
    # agent then sends TIMER frames only when one is due. Outside the session's output order
    # (sequence number 0): it describes the session now, and a repeat or a loss is harmless.
    DEADLINE = 69


class ProtocolId(enum.IntEnum):
    BGP = 1
    BFD = 2
    ECHO = 255  # a trivial stack for measuring the offload path


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session, globally: tenant, virtual router, protocol, session id."""

    tenant: int
    vrouter: int
    protocol: int
    session: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.vrouter}/{self.protocol}/{self.session}"


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    protocol: int
    tenant: int
    vrouter: int
    session: int
    seq: int
    rx_ns: int
    tx_ns: int
    payload: bytes | memoryview = b""
    flags: int = 0
    epoch: int = 0

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.tenant, self.vrouter, self.protocol, self.session)

    def encode(self) -> bytes:
        return encode_frame(self)


_DEADLINE_AT = struct.Struct("!d")


def encode_deadline(at: float | None) -> bytes:
    """A DEADLINE frame's payload: when the session's next timer is due (None: no timer)."""
    return b"" if at is None else _DEADLINE_AT.pack(at)


def decode_deadline(payload: bytes | bytearray | memoryview) -> float:
    """When a DEADLINE frame says the next timer is due: unix seconds, or infinity for none (a
    payload of another size reads as none, as an empty one does)."""
    return _DEADLINE_AT.unpack(payload)[0] if len(payload) == _DEADLINE_AT.size else math.inf


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"frame field {name}={value} does not fit in {bits} bits")


def encode_frame(f: Frame) -> bytes:
    n = len(f.payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {n} octets exceeds {MAX_PAYLOAD}")
    for name, value, bits in (
        ("kind", f.kind, 8),
        ("protocol", f.protocol, 16),
        ("flags", f.flags, 16),
        ("tenant", f.tenant, 32),
        ("vrouter", f.vrouter, 32),
        ("session", f.session, 64),
        ("seq", f.seq, 64),
        ("rx_ns", f.rx_ns, 64),
        ("tx_ns", f.tx_ns, 64),
        ("epoch", f.epoch, 32),
    ):
        _check_range(name, value, bits)
    head = HEADER.pack(
        MAGIC, VERSION, f.kind, f.protocol, f.flags, f.tenant, f.vrouter, f.session, f.seq, f.rx_ns, f.tx_ns, n, f.epoch
    )
    return head + bytes(f.payload)


def encode_batch(frames: Iterable[Frame]) -> bytes:
    return b"".join(encode_frame(f) for f in frames)


def _decode_at(view: memoryview, off: int, max_payload: int) -> tuple[Frame, int]:
    if len(view) - off < HEADER_LEN:
        raise DecodeError(f"truncated frame: header needs {HEADER_LEN} octets, {len(view) - off} remain", off)
    magic, version, kind, proto, flags, tenant, vrouter, session, seq, rx, tx, n, epoch = HEADER.unpack_from(view, off)
    if magic != MAGIC:
        raise DecodeError(f"not an offload frame: magic {bytes(magic)!r}, expected {MAGIC!r}", off)
    if version != VERSION:
        raise DecodeError(f"offload frame version {version} unsupported (this build reads version {VERSION})", off)
    if kind not in _KINDS:
        raise DecodeError(f"offload frame kind {kind} undefined", off)
    if n > max_payload:
        raise DecodeError(f"offload frame payload length {n} exceeds the limit {max_payload}", off)
    end = off + HEADER_LEN + n
    if end > len(view):
        raise DecodeError(f"truncated frame: payload of {n} octets, {len(view) - off - HEADER_LEN} present", off)
    return Frame(kind, proto, tenant, vrouter, session, seq, rx, tx, view[off + HEADER_LEN : end], flags, epoch), end


_KINDS = frozenset(int(k) for k in FrameKind)


def decode_frame(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> Frame:
    view = memoryview(data)
    frame, end = _decode_at(view, 0, max_payload)
    if end != len(view):
        raise DecodeError(f"{len(view) - end} octets after the frame", end)
    return frame


def iter_batch(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> Iterator[Frame]:
    """Frames of a batch, payloads as zero-copy memoryview slices. Raises DecodeError on a bad frame."""
    view = memoryview(data)
    off = 0
    while off < len(view):
        frame, off = _decode_at(view, off, max_payload)
        yield frame


def decode_batch(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD) -> list[Frame]:
    return list(iter_batch(data, max_payload))


def frame_offsets(
    data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD, *, strict: bool = True
) -> list[int]:
    """Start offsets of the frames of a batch, checking each header as decode_batch does. A
    malformed frame raises DecodeError; with `strict` off it ends the list as -1 instead (the
    frames before it stand, what follows it cannot be delimited)."""
    view = memoryview(data)
    out = []
    off = 0
    n = len(view)
    unpack = _PREFIX.unpack_from
    try:
        while off < n:
            if n - off < HEADER_LEN:
                raise DecodeError(f"truncated frame: header needs {HEADER_LEN} octets, {n - off} remain", off)
            magic, version, kind = unpack(view, off)
            if magic != MAGIC or version != VERSION or kind not in _KINDS:
                _decode_at(view, off, max_payload)  # raises the precise error
            length = int.from_bytes(view[off + 48 : off + 52], "big")
            if length > max_payload or off + HEADER_LEN + length > n:
                _decode_at(view, off, max_payload)
            out.append(off)
            off += HEADER_LEN + length
    except DecodeError:
        if strict:
            raise
        out.append(-1)
    return out


_PREFIX = struct.Struct("!2sBB")

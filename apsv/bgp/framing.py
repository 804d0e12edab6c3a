"""BGP message framing (RFC 4271 §4.1, §6.1): a TCP byte stream split into messages, each header
checked before its body is read. Sans-I/O: bytes in, (type, body) out."""

from __future__ import annotations

from apsv.bgp import constants as C
from apsv.bgp.errors import BgpError


def check_header(header: bytes, max_len: int) -> tuple[int, int]:
    """Validate a 19-octet header (RFC 4271 §6.1); return (length, type)."""
    if header[:16] != C.MARKER:
        raise BgpError(C.ERR_HEADER, C.ERR_HEADER_NOT_SYNCHRONIZED, b"", "marker is not all ones")
    length = (header[16] << 8) | header[17]
    mtype = header[18]
    if length < C.HEADER_LEN or length > max_len:
        raise BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, header[16:18], f"length {length} outside 19..{max_len}")
    if mtype < 1 or mtype > 5:
        raise BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_TYPE, bytes((mtype,)), f"message type {mtype} undefined")
    bad = (
        (mtype == C.MSG_OPEN and length < 29)
        or (mtype == C.MSG_UPDATE and length < 23)
        or (mtype == C.MSG_KEEPALIVE and length != 19)
        or (mtype == C.MSG_NOTIFICATION and length < 21)
        or (mtype in (C.MSG_OPEN, C.MSG_KEEPALIVE) and length > C.MAX_MESSAGE_LEN)  # RFC 8654 §4
    )
    if bad:
        raise BgpError(
            C.ERR_HEADER,
            C.ERR_HEADER_BAD_LENGTH,
            header[16:18],
            f"length {length} invalid for {C.MESSAGE_NAMES[mtype]}",
        )
    return length, mtype


class MessageReader:
    """Splits a TCP byte stream into BGP messages (sans-I/O; bounded to one message of backlog).

    feed() appends bytes; next_message() returns (type, body) or None when more bytes are
    needed. Header errors raise BgpError. The buffer never holds more than what the peer sent
    beyond the last complete message, and a message can be at most `max_len` octets.
    """

    __slots__ = ("_buf", "max_len")

    def __init__(self, max_len: int = C.MAX_MESSAGE_LEN) -> None:
        self._buf = bytearray()
        self.max_len = max_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf)

    def pending_bytes(self) -> bytes:
        return bytes(self._buf)

    def next_message(self) -> tuple[int, bytes] | None:
        buf = self._buf
        if len(buf) < C.HEADER_LEN:
            return None
        length, mtype = check_header(bytes(buf[: C.HEADER_LEN]), self.max_len)
        if len(buf) < length:
            return None
        body = bytes(buf[C.HEADER_LEN : length])
        del buf[:length]
        return mtype, body

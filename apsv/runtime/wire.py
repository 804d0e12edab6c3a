"""The call protocol between a stack instance actor and its container, over a Unix socket.

A message is:

    u32 length (of what follows) | u8 op | u32 meta length | meta (JSON) | u16 blob count |
    (u32 blob length | blob octets)*

Metadata is JSON and payloads are raw octets, so nothing a container sends can make the actor
execute anything (no pickle crosses this boundary). Replies use op 0 (ok) or 255 (error, with
`meta["error"]`). Messages are bounded by MAX_MESSAGE.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

OPS = {
    "open": 1,
    "process": 2,
    "restore": 3,
    "detach": 4,
    "snapshot": 5,
    "close": 7,
    "load": 9,
    "session_info": 10,
    "shutdown": 11,
    "ping": 12,
    "session_table": 13,
    "expect": 14,
    "restore_pending": 15,
    "holding": 16,
    "depart": 17,
    "collect": 18,
    "sessions_report": 19,
    "session_weights": 20,
}
OP_NAMES = {v: k for k, v in OPS.items()}
OK, ERROR = 0, 255
MAX_MESSAGE = 512 << 20
NOSIGNAL = socket.MSG_NOSIGNAL  # a peer gone is EPIPE, never SIGPIPE (whatever its action)


class WireError(ConnectionError):
    pass


def send(
    sock: socket.socket, op: int, meta: dict[str, Any] | None = None, blobs: Sequence[bytes | memoryview] = ()
) -> None:
    m = json.dumps(meta or {}, separators=(",", ":")).encode()
    parts: list[bytes | memoryview] = [struct.pack("!BI", op, len(m)), m, struct.pack("!H", len(blobs))]
    for b in blobs:
        parts.append(struct.pack("!I", len(b)))
        parts.append(b)
    total = sum(len(p) for p in parts)
    if total > MAX_MESSAGE:
        raise WireError(f"message of {total} octets exceeds {MAX_MESSAGE}")
    sock.sendall(struct.pack("!I", total), NOSIGNAL)
    for p in parts:
        sock.sendall(p, NOSIGNAL)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError("connection closed")
        got += k
    return buf


def recv(sock: socket.socket) -> tuple[int, dict[str, Any], list[bytes]]:
    (total,) = struct.unpack("!I", _recv_exact(sock, 4))
    if total > MAX_MESSAGE or total < 7:
        raise WireError(f"message length {total} out of range")
    data = bytes(_recv_exact(sock, total))
    op, mlen = struct.unpack_from("!BI", data, 0)
    i = 5 + mlen
    if i + 2 > total:
        raise WireError("metadata overruns the message")
    try:
        meta = json.loads(data[5:i])
    except ValueError as e:
        raise WireError(f"bad metadata: {e}") from None
    (count,) = struct.unpack_from("!H", data, i)
    i += 2
    blobs = []
    for _ in range(count):
        if i + 4 > total:
            raise WireError("blob header overruns the message")
        (n,) = struct.unpack_from("!I", data, i)
        i += 4
        if i + n > total:
            raise WireError("blob overruns the message")
        blobs.append(data[i : i + n])
        i += n
    if not isinstance(meta, dict):
        raise WireError("metadata is not an object")
    return op, meta, blobs


def call(
    sock: socket.socket, op: str, meta: dict[str, Any] | None = None, blobs: list[bytes | memoryview] | None = None
) -> tuple[dict[str, Any], list[bytes]]:
    send(sock, OPS[op], meta, blobs or [])
    code, rmeta, rblobs = recv(sock)
    if code == ERROR:
        raise RemoteError(rmeta.get("error", "unknown error"))
    return rmeta, rblobs


class RemoteError(RuntimeError):
    """The container refused or failed a call; the message is what it said."""

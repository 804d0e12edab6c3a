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
from collections.abc import Mapping, Sequence
from typing import Any

from apsv.runtime.host import Key, SeqState

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


# -- the JSON forms of what crosses with the octets -----------------------------------------------


def key_from_json(v: Any) -> Key:
    """A session key sent as a list of 4 integers; ValueError otherwise."""
    t = tuple(int(x) for x in v)
    if len(t) != 4:
        raise ValueError(f"a session key has 4 parts, not {len(t)}")
    return (t[0], t[1], t[2], t[3])


def seq_to_json(s: SeqState) -> dict[str, int]:
    return {"last_seq": s.last_seq, "out_seq": s.out_seq, "applied": s.applied, "duplicates": s.duplicates}


def seq_from_json(d: Mapping[str, Any]) -> SeqState:
    return SeqState(int(d["last_seq"]), int(d["out_seq"]), int(d.get("applied", 0)), int(d.get("duplicates", 0)))


def snapshots_to_json(snaps: Mapping[Key, tuple[SeqState, bytes]]) -> tuple[dict[str, Any], list[bytes]]:
    """Snapshots as metadata (keys, sequence states) and one blob each, in the same order."""
    keys = list(snaps)
    return {"keys": [list(k) for k in keys], "seqs": [seq_to_json(snaps[k][0]) for k in keys]}, [
        snaps[k][1] for k in keys
    ]


def snapshots_from_json(meta: Mapping[str, Any], blobs: Sequence[bytes]) -> dict[Key, tuple[SeqState, bytes]]:
    return {key_from_json(k): (seq_from_json(s), b) for k, s, b in zip(meta["keys"], meta["seqs"], blobs, strict=True)}

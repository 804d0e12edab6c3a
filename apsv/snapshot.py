"""A small, versioned binary container for session snapshots.

    magic "APSVSNAP" | u16 format version | str protocol | sections...

Sections are written and read in order with explicit lengths; every read is bounds-checked
and a short or foreign blob raises DecodeError naming what was missing. No pickle: a snapshot
crosses process and machine boundaries and must never execute anything when read.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable
from typing import Any, Final, TypeVar

from apsv.errors import DecodeError

MAGIC: Final = b"APSVSNAP"
FORMAT_VERSION: Final = 1

_R = TypeVar("_R")

# What reading a hostile or corrupt blob can raise past the bounds checks: a field of the wrong
# type or value in its JSON parts, an enum value that does not exist, nesting too deep.
_CORRUPT = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError, struct.error)


def decodes_snapshot(restore: Callable[[Any, bytes], _R]) -> Callable[[Any, bytes], _R]:
    """For a session class's `restore(cls, blob)`: whatever a blob holds, the caller gets the
    session or one DecodeError naming the protocol and what was wrong - never another error."""

    @functools.wraps(restore)
    def checked(cls: Any, blob: bytes) -> _R:
        try:
            return restore(cls, blob)
        except DecodeError:
            raise
        except _CORRUPT as e:
            what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise DecodeError(f"{cls.protocol} snapshot: {type(e).__name__}: {what}") from None

    return checked


class SnapshotWriter:
    def __init__(self, protocol: str) -> None:
        self._parts: list[bytes] = [MAGIC, struct.pack("!H", FORMAT_VERSION)]
        self.str(protocol)

    def u8(self, v: int) -> None:
        self._parts.append(struct.pack("!B", v))

    def u32(self, v: int) -> None:
        self._parts.append(struct.pack("!I", v))

    def u64(self, v: int) -> None:
        self._parts.append(struct.pack("!Q", v))

    def f64(self, v: float) -> None:
        self._parts.append(struct.pack("!d", v))

    def blob(self, b: bytes | bytearray | memoryview) -> None:
        self._parts.append(struct.pack("!I", len(b)))
        self._parts.append(bytes(b))

    def str(self, s: str) -> None:
        self.blob(s.encode("utf-8"))

    def json(self, obj: Any) -> None:
        self.blob(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8"))

    def blobs(self, items: list[bytes]) -> None:
        """Many short blobs: a count, then u16 length + bytes each."""
        self.u32(len(items))
        self._parts.extend(struct.pack("!H", len(b)) + b for b in items)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class SnapshotReader:
    def __init__(self, data: bytes | memoryview, expect_protocol: str) -> None:
        self._b = bytes(data)
        self._i = 0
        if self._take(len(MAGIC), "magic") != MAGIC:
            raise DecodeError("not an APSV snapshot (bad magic)", 0)
        version = self.u16()
        if version != FORMAT_VERSION:
            raise DecodeError(f"snapshot format {version} unsupported (this build reads {FORMAT_VERSION})", 8)
        proto = self.str()
        if proto != expect_protocol:
            raise DecodeError(f"snapshot is of a {proto!r} session, not {expect_protocol!r}", 10)

    def _take(self, n: int, what: str) -> bytes:
        if self._i + n > len(self._b):
            raise DecodeError(f"snapshot truncated reading {what}: needs {n} octets", self._i)
        out = self._b[self._i : self._i + n]
        self._i += n
        return out

    def u8(self) -> int:
        return int(self._take(1, "u8")[0])

    def u16(self) -> int:
        return int(struct.unpack("!H", self._take(2, "u16"))[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self._take(4, "u32"))[0])

    def u64(self) -> int:
        return int(struct.unpack("!Q", self._take(8, "u64"))[0])

    def f64(self) -> float:
        return float(struct.unpack("!d", self._take(8, "f64"))[0])

    def blob(self) -> bytes:
        return self._take(self.u32(), "blob")

    def str(self) -> str:
        return self.blob().decode("utf-8")

    def json(self) -> Any:
        try:
            return json.loads(self.blob())
        except ValueError as e:
            raise DecodeError(f"snapshot JSON section is corrupt: {e}", self._i) from None

    def blobs(self) -> list[bytes]:
        n = self.u32()
        out = []
        for _ in range(n):
            ln = self.u16()
            out.append(self._take(ln, "blob item"))
        return out

    def done(self) -> None:
        if self._i != len(self._b):
            raise DecodeError(f"{len(self._b) - self._i} unexpected octets at the end of the snapshot", self._i)

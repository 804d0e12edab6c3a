"""MRT framing: a plain, gzip or bzip2 stream split into records (RFC 6396 §2), in chunks, so a
multi-gigabyte dump needs no more memory than its largest record. A header that cannot be right
ends the stream with an `MrtError`, or, with `recover`, the reader scans forward to the next
chain of plausible headers."""

from __future__ import annotations

import bz2
import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from apsv.bgp import constants as C
from apsv.mrt.records import (
    MRT_BGP,
    MRT_BGP4MP,
    MRT_BGP4MP_ET,
    MRT_BGP4PLUS,
    MRT_BGP4PLUS_01,
    MRT_TABLE_DUMP,
    MRT_TABLE_DUMP_V2,
    MrtError,
    MrtRecord,
)

MAX_RECORD_LEN: Final = 16 << 20  # no legitimate record comes near this; guards memory on garbage


def open_mrt(path: str | Path) -> BinaryIO:
    """Open a plain, gzip or bzip2 MRT file (by content, not by name)."""
    raw = open(path, "rb")  # noqa: SIM115 - wrapped and returned
    magic = raw.read(3)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if magic == b"BZh":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    return raw


_FRAMED_TYPES: Final = frozenset(
    {
        MRT_BGP,
        MRT_TABLE_DUMP,
        MRT_TABLE_DUMP_V2,
        MRT_BGP4MP,
        MRT_BGP4MP_ET,
        MRT_BGP4PLUS,
        MRT_BGP4PLUS_01,
        11,
        32,
        33,
        48,
        49,
    }
)


def _plausible(buf: bytes, i: int, ts_ref: int) -> bool:
    """Does a believable MRT header start at buf[i]? (known type, small subtype and length, near in time)"""
    if i + 12 > len(buf):
        return False
    ts, t, st, ln = struct.unpack_from("!IHHI", buf, i)
    return t in _FRAMED_TYPES and st < 64 and ln < 1 << 20 and (not ts_ref or abs(ts - ts_ref) < 86400 * 7)


def _table_dump_physical_length(buf: bytes, start: int, declared: int, afi: int, limit: int) -> int:
    """Length of a TABLE_DUMP record as some 1999-2000 writers produced it, or `declared`.

    Those writers batched many entries into one record (view and sequence once, then entries
    without them) and declared a length 4 octets short of what they wrote. Walk the entries:
    if they end exactly 4 octets past the declared length, that is the record's real length.
    """
    alen = 4 if afi == C.AFI_IPV4 else 16
    entry = alen + 1 + 1 + 4 + alen + 2 + 2
    i = start + 4
    end = start + declared
    while i + entry <= limit:
        i += entry + ((buf[i + entry - 2] << 8) | buf[i + entry - 1])
        if i >= end:
            break
    return declared + 4 if i == end + 4 and i <= limit else declared


@dataclass
class FramingStats:
    records: int = 0
    resyncs: int = 0
    skipped_bytes: int = 0
    legacy_batched: int = 0  # TABLE_DUMP records in the batched 1999-2000 layout
    errors: list[str] = field(default_factory=list)  # damaged framing (also yielded as MrtError)
    stream_errors: list[str] = field(default_factory=list)  # the compressed stream cut short or corrupt


def iter_raw_records(
    stream: BinaryIO, *, recover: bool = False, stats: FramingStats | None = None, chunk: int = 1 << 22
) -> Iterator[MrtRecord | MrtError]:
    """Split a stream into MRT records.

    A header that cannot be right (unknown type, absurd length, truncated) yields an MrtError and
    ends the stream, unless `recover` is set: then each record must also be followed by a
    plausible header (or the end of the file), and where the framing is damaged the reader
    scans forward for the next chain of two plausible headers and carries on from there.
    """
    st = stats if stats is not None else FramingStats()
    buf = b""  # bytes, so a record's body is one slice (one copy), not two
    base = 0  # file offset of buf[0]
    pos = 0
    eof = False
    last_ts = 0
    unpack = struct.unpack_from

    # read1: what one read of the underlying stream gives. A compressed stream cut short raises
    # at its end, and one large read() would lose everything it had decompressed before that.
    read1 = getattr(stream, "read1", stream.read)

    def fill(need: int) -> bool:
        nonlocal buf, base, pos, eof
        have = len(buf) - pos
        if have >= need or eof:
            return have >= need
        parts = [buf[pos:]]
        want = max(chunk, need)
        while have < want and not eof:
            try:
                data = read1(want - have)
            except (EOFError, OSError) as e:  # truncated or corrupt compressed stream
                st.errors.append(f"compressed stream ends early: {e}")
                st.stream_errors.append(f"compressed stream ends early: {e}")
                data = b""
            if not data:
                eof = True
            else:
                parts.append(data)
                have += len(data)
        buf = b"".join(parts)
        base += pos
        pos = 0
        return have >= need

    def resync(from_pos: int) -> int | None:
        fill(from_pos - pos + (1 << 20))
        j = from_pos
        while j + 12 <= len(buf):
            if _plausible(buf, j, last_ts):
                nxt = j + 12 + unpack("!I", buf, j + 8)[0]
                if (nxt == len(buf) and eof) or _plausible(buf, nxt, last_ts):
                    return j
            j += 1
        return None

    while True:
        if not fill(12):
            if len(buf) - pos:
                yield MrtError(base + pos, -1, -1, f"{len(buf) - pos} trailing octets are not a whole MRT header")
            return
        ts, mtype, subtype, length = unpack("!IHHI", buf, pos)
        et = mtype in (MRT_BGP4MP_ET, 33, 49)
        sane = mtype in _FRAMED_TYPES and length <= MAX_RECORD_LEN and not (et and length < 4)
        if sane and recover:
            sane = _plausible(buf, pos, last_ts)
        if sane and not fill(12 + length + 16) and len(buf) - pos < 12 + length:
            yield MrtError(
                base + pos, mtype, subtype, f"record declares {length} octets, only {len(buf) - pos - 12} remain"
            )
            return
        if sane and mtype == MRT_TABLE_DUMP and subtype in (1, 2):
            phys = _table_dump_physical_length(buf, pos + 12, length, subtype, len(buf))
            if phys != length:
                st.legacy_batched += 1
                length = phys
        nxt = pos + 12 + length
        if sane and recover and not (nxt == len(buf) and eof) and not _plausible(buf, nxt, ts):
            sane = False  # the length field points into the middle of something else
        if not sane:
            reason = f"damaged MRT framing (type {mtype}, subtype {subtype}, length {length})"
            st.errors.append(reason)
            yield MrtError(base + pos, mtype, subtype, reason)
            if not recover:
                return
            j = resync(pos + 1)
            st.resyncs += 1
            if j is None:
                st.skipped_bytes += len(buf) - pos
                return
            st.skipped_bytes += j - pos
            pos = j
            continue
        start = pos + 12
        if et:
            usec = unpack("!I", buf, start)[0]
            rec = MrtRecord(base + pos, ts + usec / 1e6, mtype, subtype, buf[start + 4 : start + length])
        else:
            rec = MrtRecord(base + pos, float(ts), mtype, subtype, buf[start : start + length])
        pos = nxt
        last_ts = ts
        st.records += 1
        yield rec

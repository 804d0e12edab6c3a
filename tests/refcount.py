"""A deliberately separate, minimal MRT/BGP counter used as a second opinion in tests.

Where mrtparse (the reference parser of MANIFEST.tsv) fails, the tests compare APSV against
this walker instead. It shares no code with apsv: it finds the BGP message in a record by
scanning for the marker rather than by parsing the record header fields, and it counts NLRI
by the RFC 4271 length-octet rule only.
"""

from __future__ import annotations

import bz2
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

MARKER = b"\xff" * 16


@dataclass
class RefCounts:
    records: int = 0
    updates: int = 0
    announced: int = 0
    withdrawn: int = 0


def _read(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    return raw


def _count_prefixes(b: bytes, width_bits: int) -> int:
    n = 0
    i = 0
    while i < len(b):
        i += 1 + (b[i] + 7) // 8
        n += 1
    if i != len(b):
        raise ValueError("prefix overrun")
    _ = width_bits
    return n


def _mp_counts(attrs: bytes) -> tuple[int, int]:
    ann = wd = 0
    i = 0
    while i < len(attrs):
        flags, code = attrs[i], attrs[i + 1]
        if flags & 0x10:
            ln = struct.unpack_from("!H", attrs, i + 2)[0]
            v = attrs[i + 4 : i + 4 + ln]
            i += 4 + ln
        else:
            ln = attrs[i + 2]
            v = attrs[i + 3 : i + 3 + ln]
            i += 3 + ln
        if code == 14:
            afi, safi, nhl = struct.unpack_from("!HBB", v)
            if safi in (1, 2):
                ann += _count_prefixes(v[5 + nhl :], 32 if afi == 1 else 128)
        elif code == 15:
            afi, safi = struct.unpack_from("!HB", v)
            if safi in (1, 2):
                wd += _count_prefixes(v[3:], 32 if afi == 1 else 128)
    return ann, wd


def count_update(body: bytes) -> tuple[int, int]:
    """(announced, withdrawn) of an UPDATE body (after the 19-octet header)."""
    wl = struct.unpack_from("!H", body, 0)[0]
    wd = _count_prefixes(body[2 : 2 + wl], 32)
    al = struct.unpack_from("!H", body, 2 + wl)[0]
    attrs = body[4 + wl : 4 + wl + al]
    ann = _count_prefixes(body[4 + wl + al :], 32)
    mp_ann, mp_wd = _mp_counts(attrs)
    return ann + mp_ann, wd + mp_wd


def count_file(path: Path) -> RefCounts:
    """Count BGP4MP (16/17) and legacy BGP (5) UPDATE records of an MRT file."""
    d = _read(path)
    c = RefCounts()
    off = 0
    while off + 12 <= len(d):
        _ts, mtype, subtype, length = struct.unpack_from("!IHHI", d, off)
        rec = d[off + 12 : off + 12 + length]
        off += 12 + length
        c.records += 1
        if mtype in (16, 17):
            if mtype == 17:
                rec = rec[4:]
            m = rec.find(MARKER)
            if subtype in (0, 5) or m < 0 or len(rec) < m + 19 or rec[m + 18] != 2:
                continue
            body = rec[m + 19 : m + ((rec[m + 16] << 8) | rec[m + 17])]
        elif mtype == 5 and subtype == 1:
            body = rec[12:]  # peer AS, peer IP, local AS, local IP; the UPDATE follows without header
        else:
            continue
        try:
            ann, wd = count_update(body)
        except (ValueError, IndexError, struct.error):
            continue
        c.updates += 1
        c.announced += ann
        c.withdrawn += wd
    return c

"""Reading a batch's frame headers all at once (numpy), for the multiplexer's routing.

The client sends, with each batch, the offsets of its frames. `index_batch` checks them
against the headers themselves (each frame starts where the previous one ends, magic, version,
kind, lengths) and gathers every header field into arrays; `by_session` groups the frames of
each session, in order. The multiplexer's work per batch is then per session, not per frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from apsv.errors import DecodeError
from apsv.frame import HEADER_LEN, MAX_PAYLOAD, FrameKind

HEADER_DTYPE = np.dtype(
    [
        ("magic", "S2"),
        ("version", "u1"),
        ("kind", "u1"),
        ("protocol", ">u2"),
        ("flags", ">u2"),
        ("tenant", ">u4"),
        ("vrouter", ">u4"),
        ("session", ">u8"),
        ("seq", ">u8"),
        ("rx_ns", ">u8"),
        ("tx_ns", ">u8"),
        ("length", ">u4"),
        ("reserved", ">u4"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_LEN
_KIND_OK = np.zeros(256, dtype=bool)
_KIND_OK[[int(k) for k in FrameKind]] = True
_COLS = np.arange(HEADER_LEN)

Array = np.ndarray[Any, Any]


@dataclass
class BatchIndex:
    offsets: Array  # int64, one per frame
    headers: Array  # HEADER_DTYPE records
    sizes: Array  # header + payload octets per frame


def index_batch(data: Array, offsets: Array, max_payload: int = MAX_PAYLOAD) -> BatchIndex:
    """Validate a batch's frame offsets against its headers and read every header."""
    n = int(offsets.shape[0])
    total = int(data.shape[0])
    if n == 0:
        if total:
            raise DecodeError("batch has octets but no frames")
        return BatchIndex(offsets.astype(np.int64), np.zeros(0, HEADER_DTYPE), np.zeros(0, np.int64))
    offs = offsets.astype(np.int64, copy=False)
    if int(offs[0]) != 0 or int(offs.min()) < 0 or int(offs.max()) + HEADER_LEN > total:
        raise DecodeError("frame offsets fall outside the batch", int(offs[0]))
    headers = data[offs[:, None] + _COLS].view(HEADER_DTYPE).reshape(n)
    sizes = HEADER_LEN + headers["length"].astype(np.int64)
    ends = offs + sizes
    if not (np.array_equal(ends[:-1], offs[1:]) and int(ends[-1]) == total):
        bad = int(np.argmax(np.append(ends[:-1] != offs[1:], int(ends[-1]) != total)))
        raise DecodeError(f"frame {bad} does not end where the next begins", int(offs[bad]))
    if not (headers["magic"] == b"AF").all():
        raise DecodeError("not an offload frame: bad magic", int(offs[int(np.argmin(headers["magic"] == b"AF"))]))
    if not (headers["version"] == 1).all():
        raise DecodeError("offload frame version unsupported (this build reads version 1)")
    if not _KIND_OK[headers["kind"]].all():
        raise DecodeError("offload frame kind undefined")
    if int(headers["length"].max()) > max_payload:
        raise DecodeError(f"offload frame payload exceeds the limit {max_payload}")
    return BatchIndex(offs, headers, sizes)


def by_session(bi: BatchIndex) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """[(session key, positions of its frames in batch order)], sessions in first-seen order."""
    h = bi.headers
    if h.shape[0] == 0:
        return []
    # A dict over the header columns as Python ints: for batches of hundreds of frames this beats
    # numpy's unique on structured keys several times over.
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    cols = zip(h["tenant"].tolist(), h["vrouter"].tolist(), h["protocol"].tolist(), h["session"].tolist(), strict=False)
    for i, key in enumerate(cols):
        g = groups.get(key)
        if g is None:
            groups[key] = [i]
        else:
            g.append(i)
    return list(groups.items())

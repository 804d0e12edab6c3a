"""The offload frame codec: round trips, zero-copy batches, and clear errors for bad frames."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apsv.errors import DecodeError
from apsv.frame import (
    HEADER_LEN,
    Frame,
    FrameKind,
    ProtocolId,
    decode_batch,
    decode_frame,
    encode_batch,
    encode_frame,
)

frames = st.builds(
    Frame,
    kind=st.sampled_from(list(FrameKind)),
    protocol=st.sampled_from(list(ProtocolId)),
    tenant=st.integers(0, 2**32 - 1),
    vrouter=st.integers(0, 2**32 - 1),
    session=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    rx_ns=st.integers(0, 2**64 - 1),
    tx_ns=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=300),
)


@given(st.lists(frames, max_size=20))
def test_batch_round_trip(fs: list[Frame]) -> None:
    raw = encode_batch(fs)
    back = decode_batch(raw)
    assert len(back) == len(fs)
    for a, b in zip(fs, back, strict=True):
        assert (a.kind, a.protocol, a.tenant, a.vrouter, a.session, a.seq, a.rx_ns, a.tx_ns) == (
            b.kind,
            b.protocol,
            b.tenant,
            b.vrouter,
            b.session,
            b.seq,
            b.rx_ns,
            b.tx_ns,
        )
        assert bytes(b.payload) == bytes(a.payload)


def test_payloads_are_views_of_the_batch_not_copies() -> None:
    raw = bytearray(encode_batch([Frame(FrameKind.DATA, 1, 1, 2, 3, 4, 5, 6, b"hello")]))
    (f,) = decode_batch(raw)
    assert isinstance(f.payload, memoryview) and f.payload.obj is raw
    raw[HEADER_LEN] = ord("J")
    assert bytes(f.payload) == b"Jello"


def test_header_is_56_octets_and_documented() -> None:
    assert HEADER_LEN == 56
    assert len(encode_frame(Frame(FrameKind.TIMER, 2, 0, 0, 0, 0, 0, 0))) == 56


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XX" + b[2:], "not an offload frame"),
        (lambda b: b[:2] + b"\x09" + b[3:], "version 9 unsupported"),
        (lambda b: b[:3] + b"\x63" + b[4:], "kind 99 undefined"),
        (lambda b: b[:20], "truncated frame: header"),
        (lambda b: b[:-1], "truncated frame: payload"),
        (lambda b: b + b"\x00", "after the frame"),
    ],
)
def test_bad_frames_get_clear_errors(mutate: object, message: str) -> None:
    good = encode_frame(Frame(FrameKind.DATA, 1, 7, 8, 9, 10, 11, 12, b"payload"))
    with pytest.raises(DecodeError, match=message):
        decode_frame(mutate(good))  # type: ignore[operator]


def test_limits_are_enforced() -> None:
    with pytest.raises(ValueError, match="tenant"):
        encode_frame(Frame(FrameKind.DATA, 1, 2**32, 0, 0, 0, 0, 0))
    big = encode_frame(Frame(FrameKind.DATA, 1, 0, 0, 0, 0, 0, 0, b"x" * 2000))
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_frame(big, max_payload=1000)
    f = Frame(FrameKind.DATA, 1, 1, 2, 3, 4, 0, 0)
    assert str(f.key) == "1/2/1/3"

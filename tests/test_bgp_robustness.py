"""Bad input: every fuzz corpus input and ≥10,000 mutations of valid messages per run end in a
decoded message or a typed protocol error carrying its RFC 7606 / RFC 4271 action - never an
unhandled exception, and never a hang."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apsv.bench.fuzz import corpus_messages
from apsv.bgp import constants as C
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action, BgpError
from apsv.bgp.events import NotificationSent, PeerNotification
from apsv.bgp.framing import MessageReader
from apsv.bgp.fsm import State
from apsv.bgp.message import Update, decode_bytes, decode_message
from apsv.bgp.session import BgpSession
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord
from apsv.pcap import decode_capture
from tests.conftest import shared_data_dir

CONTEXTS = [
    CodecContext(asn4=True),
    CodecContext(asn4=False),
    CodecContext(asn4=True, ibgp=True, add_path=frozenset({(1, 1), (2, 1)})),
]


def check_decode(raw: bytes) -> None:
    """The property: whole message bytes -> a message or a BgpError, under every context."""
    for ctx in CONTEXTS:
        try:
            m = decode_bytes(raw, ctx)
        except BgpError as e:
            assert e.action is Action.SESSION_RESET
            assert 1 <= e.code <= 7 and 0 <= e.subcode <= 255
            continue
        if isinstance(m, Update):
            assert m.action in (Action.NONE, Action.ATTRIBUTE_DISCARD, Action.TREAT_AS_WITHDRAW)
            assert (m.action is Action.NONE) == (not m.problems or m.action is Action.NONE)


def check_stream(data: bytes) -> None:
    """The same bytes arriving on an Established session: it survives or resets with a NOTIFICATION."""
    cfg = BgpSessionConfig(local_as=65000, router_id="192.0.2.1", peer_as=65001, hold_time=0)
    s = BgpSession.established(cfg, asn4=True)
    events = s.data_received(data, 1.0)
    if s.state is State.IDLE:
        # Either we reset it and told the peer why, or the peer reset it with its own NOTIFICATION.
        assert any(isinstance(e, (NotificationSent, PeerNotification)) for e in events)


def fuzz_inputs() -> list[tuple[str, bytes]]:
    out = corpus_messages()
    assert len(out) >= 15
    return out


@pytest.mark.parametrize(("name", "raw"), fuzz_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_fuzz_corpus_inputs(name: str, raw: bytes) -> None:
    check_decode(raw)
    check_stream(raw)
    reader = MessageReader(C.MAX_EXTENDED_MESSAGE_LEN)
    reader.feed(raw)
    try:
        while (m := reader.next_message()) is not None:
            with contextlib.suppress(BgpError):
                decode_message(m[0], m[1])
    except BgpError as e:
        assert e.code == C.ERR_HEADER


def test_gobgp_bad_length_corpus_is_rejected_with_header_errors() -> None:
    """GoBGP's bad-len corpus: each input must end in a NOTIFICATION, mostly Message Header errors."""
    root = shared_data_dir() / "fuzz" / "gobgp-bad-len-corpus"
    codes = []
    for f in sorted(root.iterdir()):
        if f.name in ("SOURCE.txt", "LICENSE.upstream"):
            continue
        with pytest.raises(BgpError) as ei:
            decode_bytes(f.read_bytes(), CodecContext())
        codes.append((ei.value.code, ei.value.subcode))
    assert len(codes) == 11 and all(c[0] in (1, 3) for c in codes)


FUZZ_PCAPS = sorted((shared_data_dir() / "fuzz").rglob("*.pcap"))


@pytest.mark.parametrize("path", FUZZ_PCAPS, ids=lambda p: p.name)
def test_fuzz_captures(path: Path) -> None:
    """Captures that crashed tcpdump's decoders: every segment, as a stream of its own."""
    for item in decode_capture(path, reassemble=False):
        assert (item.message is None) != (item.error is None)
        if item.error is not None:
            assert isinstance(item.error, BgpError)
        check_stream(item.raw)


# ------------------------------------------------------------------------------------------------
# Property-based mutations of valid messages (hypothesis): ≥ 10,000 per run.


def _valid_messages() -> list[bytes]:
    data = shared_data_dir()
    msgs: list[bytes] = []
    with MrtReader(data / "mrt/mrtparse-samples/quagga_bgp") as r:
        msgs += [i.raw_header + i.body for i in r if isinstance(i, BgpMessageRecord)]
    with MrtReader(data / "mrt/ryu-mrt/updates.20161101.0000.bz2") as r:
        msgs += [i.raw_header + i.body for i in r if isinstance(i, BgpMessageRecord)][:200]
    for p in ("pcap/pcapplusplus-tests/BgpPackets.pcap", "pcap/tcpdump-tests/bgp-4byte-asn.pcap"):
        msgs += [d.raw for d in decode_capture(data / p)]
    assert len(msgs) > 250
    return msgs


VALID = _valid_messages()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]))
        if not base:
            break
        i = draw(st.integers(0, len(base) - 1))
        if kind == "flip":
            base[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            base[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del base[i:]
        elif kind == "insert":
            base[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del base[i : i + draw(st.integers(1, 8))]
        elif kind == "length" and len(base) > 24:
            # Corrupt an inner length field: the withdrawn/attribute lengths or an attribute's.
            j = draw(st.integers(19, min(len(base) - 2, 60)))
            base[j] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
    if len(base) >= 19 and draw(st.booleans()):
        # Keep the header's length consistent so the mutation reaches the body decoders.
        base[16:18] = len(base).to_bytes(2, "big")
    return bytes(base)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(mutated())
def test_mutations_decode_or_fail_typed(raw: bytes) -> None:
    check_decode(raw)


@settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(VALID), min_size=1, max_size=5), st.binary(max_size=64), st.integers(0, 400))
def test_mutated_streams_never_crash_a_session(msgs: list[bytes], junk: bytes, cut: int) -> None:
    stream = b"".join(msgs)
    stream = stream[:cut] + junk + stream[cut:]
    check_stream(stream)

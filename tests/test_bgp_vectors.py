"""ExaBGP's decoding vectors (shared/data/bgp-test-vectors/exabgp-decoding): same fields, or opaque."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from apsv.bgp import constants as C
from apsv.bgp.capabilities import FourOctetAs, Multiprotocol, SoftwareVersion
from apsv.bgp.context import CodecContext
from apsv.bgp.message import Open, Update, decode_bytes, decode_update, encode_message, encode_update
from tests.conftest import shared_data_dir

# ExaBGP produced these on a session with local AS = peer AS = 65533 (iBGP) and 4-octet ASNs.
CTX = CodecContext(asn4=True, ibgp=True)
VECTORS = shared_data_dir() / "bgp-test-vectors" / "exabgp-decoding"


def load(name: str) -> tuple[str, bytes, dict[str, Any] | None]:
    lines = (VECTORS / name).read_text().splitlines()
    kind = lines[0].strip()
    raw = bytes.fromhex(re.sub(r"[^0-9A-Fa-f]", "", lines[1]))
    expected = json.loads(lines[2]) if len(lines) > 2 and lines[2].strip() else None
    return kind, raw, expected


def decode_vector(kind: str, raw: bytes, ctx: CodecContext = CTX) -> Update | Open:
    if raw[:16] == C.MARKER:
        m = decode_bytes(raw, ctx)
        assert isinstance(m, (Update, Open))
        return m
    return decode_update(raw, ctx)  # ExaBGP's files sometimes hold only the UPDATE body


def exabgp_attributes(u: Update) -> dict[str, Any]:
    """APSV's decoded attributes in ExaBGP's JSON shape, for the fields both express."""
    assert u.attributes is not None
    out: dict[str, Any] = {}
    for a in u.attributes:
        if a.type_code == C.ATTR_ORIGIN:
            out["origin"] = C.ORIGIN_NAMES[a.value]
        elif a.type_code == C.ATTR_AS_PATH and a.value:
            out["as-path"] = {
                str(i): {"element": C.SEGMENT_NAMES[st], "value": list(asns)} for i, (st, asns) in enumerate(a.value)
            }
        elif a.type_code == C.ATTR_MED:
            out["med"] = a.value
        elif a.type_code == C.ATTR_LOCAL_PREF:
            out["local-preference"] = a.value
        elif a.type_code == C.ATTR_ATOMIC_AGGREGATE:
            out["atomic-aggregate"] = True
        elif a.type_code == C.ATTR_AGGREGATOR:
            out["aggregator"] = f"{a.value[0]}:{a.value[1]}"
    return out


@pytest.mark.parametrize("name", ["ipv4-unicast-1", "ipv4-unicast-2"])
def test_ipv4_unicast_vectors_decode_to_the_same_fields(name: str) -> None:
    kind, raw, expected = load(name)
    assert expected is not None
    want = expected["neighbor"]["message"]["update"]
    u = decode_vector(kind, raw)
    assert isinstance(u, Update) and not u.problems
    assert exabgp_attributes(u) == want["attribute"]
    if "announce" in want:
        got = u.to_json(CTX)["announce"]
        assert got == want["announce"]
    else:
        assert u.announced_count == 0
    assert encode_update(u, CTX) == raw  # and back, byte for byte


def test_open_vector_decodes_to_the_same_fields() -> None:
    kind, raw, expected = load("bgp-open-sofware-version")
    assert expected is not None
    want = expected["neighbor"]["open"]
    m = decode_vector(kind, raw)
    assert isinstance(m, Open)
    assert (m.version, m.real_asn, m.hold_time, m.router_id) == (
        want["version"],
        want["asn"],
        want["hold_time"],
        want["router_id"],
    )
    caps = {c.code: c.parsed() for c in m.capabilities}
    assert sorted(str(k) for k in caps) == sorted(want["capabilities"])
    mp = caps[C.CAP_MULTIPROTOCOL]
    assert (
        isinstance(mp, Multiprotocol)
        and [f"{C.AFI_NAMES[mp.afi]}/{C.SAFI_NAMES[mp.safi]}"] == want["capabilities"]["1"]["families"]
    )
    asn4 = caps[C.CAP_FOUR_OCTET_AS]
    assert isinstance(asn4, FourOctetAs) and asn4.asn == want["capabilities"]["65"]["asn4"]
    sw = caps[C.CAP_SOFTWARE_VERSION]
    assert isinstance(sw, SoftwareVersion) and sw.version == want["capabilities"]["75"]["software"]
    assert encode_message(m) == raw


OTHER_FAMILIES = sorted(
    p.name for p in VECTORS.iterdir() if p.name.startswith(("bgp-evpn", "bgp-flow", "bgp-ls", "bgp-sr", "vpnv4"))
)


@pytest.mark.parametrize("name", OTHER_FAMILIES)
def test_other_families_pass_through_opaquely(name: str) -> None:
    kind, raw, _ = load(name)
    if kind.startswith("nlri"):
        # A bare NLRI: carry it in an MP_REACH_NLRI of its family (BGP-LS: AFI 16388, SAFI 71).
        afi, safi = 16388, 71
        value = afi.to_bytes(2, "big") + bytes((safi, 4)) + bytes(4) + b"\x00" + raw
        attrs = (
            b"\x40\x01\x01\x00\x40\x02\x00\x40\x05\x04\x00\x00\x00\x64"
            + bytes((0x90, 14))
            + len(value).to_bytes(2, "big")
            + value
        )
        raw = b"\x00\x00" + len(attrs).to_bytes(2, "big") + attrs
    u = decode_vector(kind, raw)
    assert isinstance(u, Update)
    if any(p.type_code == C.ATTR_LOCAL_PREF for p in u.problems):
        # Some of these were captured from an eBGP peer (no LOCAL_PREF): decode them as such.
        u = decode_vector(kind, raw, CodecContext(asn4=True, ibgp=False))
        assert isinstance(u, Update)
    assert not u.problems, [p.describe() for p in u.problems]
    mps = [m for m in (u.mp_reach, u.mp_unreach) if m is not None]
    for mp in mps:
        assert (mp.afi, mp.safi) not in {(1, 1), (2, 1)}
    if mps:
        assert all(
            (m.nlri if hasattr(m, "nlri") else m.withdrawn) is None  # type: ignore[union-attr]
            for m in mps
        ), "a family APSV does not decode must stay opaque"
    # Unknown attributes (tunnel encapsulation, prefix SID, BGP-LS) are kept as raw bytes.
    known = set(C.ATTR_NAMES)
    assert u.attributes is not None
    for a in u.attributes:
        if a.type_code not in known:
            assert isinstance(a.value, bytes)
    body = encode_update(u, CTX)
    assert body == raw if raw[:16] == C.MARKER else body[C.HEADER_LEN :] == raw


def test_vectors_present() -> None:
    names = {p.name for p in Path(VECTORS).iterdir()}
    assert {"ipv4-unicast-1", "ipv4-unicast-2", "bgp-open-sofware-version"} <= names
    assert len(OTHER_FAMILIES) >= 15

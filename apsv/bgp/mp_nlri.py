"""MP_REACH_NLRI and MP_UNREACH_NLRI (RFC 4760): decoding with RFC 7606's handling, and the
exact encoding. Their NLRI are unique to each UPDATE, so they are kept beside the interned
attribute set, never inside it (only an MP_REACH route's next hop joins the set)."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import encode_attribute
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import update_error
from apsv.bgp.nlri import NlriError, split_prefixes

_unpack_from = struct.unpack_from

# Families whose NLRI APSV decodes; every other AFI/SAFI is carried as opaque bytes.
DECODED_FAMILIES: Final = frozenset({(1, 1), (1, 2), (2, 1), (2, 2)})


class MpReach(NamedTuple):
    """MP_REACH_NLRI (RFC 4760 §3). `nlri` is None for families carried opaquely (`raw_nlri`)."""

    afi: int
    safi: int
    next_hop: bytes
    reserved: int
    nlri: list[bytes] | None
    raw_nlri: bytes
    flags: int = C.FLAG_OPTIONAL | C.FLAG_EXTENDED_LENGTH
    path_ids: bool = False  # NLRI carry ADD-PATH identifiers


class MpUnreach(NamedTuple):
    """MP_UNREACH_NLRI (RFC 4760 §4)."""

    afi: int
    safi: int
    withdrawn: list[bytes] | None
    raw_withdrawn: bytes
    flags: int = C.FLAG_OPTIONAL | C.FLAG_EXTENDED_LENGTH
    path_ids: bool = False


def next_hop_ok(mp: MpReach) -> bool:
    n = len(mp.next_hop)
    if mp.afi == C.AFI_IPV6:
        return n in (16, 32)
    if mp.afi == C.AFI_IPV4:
        return n in (4, 16, 32)  # 16/32: IPv6 next hop for IPv4 NLRI (RFC 8950)
    return True


def decode_mp_reach(v: bytes, flags: int, ctx: CodecContext, tlv: bytes) -> MpReach:
    n = len(v)
    if ctx.rib_dump and n and v[0] == n - 1:
        # RFC 6396 §4.3.4: in a TABLE_DUMP_V2 RIB entry only the next hop is kept.
        return MpReach(C.AFI_IPV4 if v[0] == 4 else C.AFI_IPV6, C.SAFI_UNICAST, v[1:], 0, [], b"", flags)
    if n < 5:
        raise update_error(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_REACH_NLRI length {n} is shorter than 5")
    afi, safi, nhl = _unpack_from("!HBB", v, 0)
    if 4 + nhl + 1 > n:
        raise update_error(
            C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_REACH_NLRI next hop length {nhl} overruns the attribute"
        )
    nh = v[4 : 4 + nhl]
    reserved = v[4 + nhl]
    start = 5 + nhl
    ap = (afi, safi) in ctx.add_path
    if (afi, safi) not in DECODED_FAMILIES:
        return MpReach(afi, safi, nh, reserved, None, v[start:], flags, ap)
    try:
        nlri = split_prefixes(v, start, n, C.ADDRESS_BITS[afi], ap)
    except NlriError as e:
        # RFC 7606 §7.11 / §5.3: NLRI that cannot be parsed leave only a session reset.
        raise update_error(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_REACH_NLRI: {e}") from None
    return MpReach(afi, safi, nh, reserved, nlri, b"", flags, ap)


def decode_mp_unreach(v: bytes, flags: int, ctx: CodecContext, tlv: bytes) -> MpUnreach:
    n = len(v)
    if n < 3:
        raise update_error(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_UNREACH_NLRI length {n} is shorter than 3")
    afi, safi = _unpack_from("!HB", v, 0)
    ap = (afi, safi) in ctx.add_path
    if (afi, safi) not in DECODED_FAMILIES:
        return MpUnreach(afi, safi, None, v[3:], flags, ap)
    try:
        wd = split_prefixes(v, 3, n, C.ADDRESS_BITS[afi], ap)
    except NlriError as e:
        raise update_error(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_UNREACH_NLRI: {e}") from None
    return MpUnreach(afi, safi, wd, b"", flags, ap)


def encode_mp_reach(mp: MpReach) -> bytes:
    body = struct.pack("!HBB", mp.afi, mp.safi, len(mp.next_hop)) + mp.next_hop + bytes((mp.reserved,))
    body += b"".join(mp.nlri) if mp.nlri is not None else mp.raw_nlri
    return encode_attribute(mp.flags, C.ATTR_MP_REACH_NLRI, body)


def encode_mp_unreach(mp: MpUnreach) -> bytes:
    body = struct.pack("!HB", mp.afi, mp.safi)
    body += b"".join(mp.withdrawn) if mp.withdrawn is not None else mp.raw_withdrawn
    return encode_attribute(mp.flags, C.ATTR_MP_UNREACH_NLRI, body)

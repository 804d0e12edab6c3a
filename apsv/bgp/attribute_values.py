"""Typed path-attribute values: each recognised attribute's decoder with its RFC 7606 checks,
and the exact encoder that inverts it; the AS path arithmetic route selection needs.

A decoder gets one attribute's raw value and returns its typed form, or raises `MalformedValue`
with the action RFC 7606 §7 gives that attribute. The attribute-list decoder
(`apsv.bgp.attributes`) calls them; `PathAttributes` calls them again to rebuild a set's typed
values from its canonical bytes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from apsv.bgp import constants as C
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action

_inet_ntoa = socket.inet_ntoa
_unpack_from = struct.unpack_from
_from_bytes = int.from_bytes

# The next hop of an MP_REACH_NLRI route is kept inside its interned attribute set under this
# private type code. Codes on the wire are one octet (0-255), so 256 can never collide with a
# received attribute; it is never encoded. This makes a route's attributes one shared object,
# next hop included, whatever family it belongs to.
MP_NEXT_HOP: Final = 256


class Attribute(NamedTuple):
    """One path attribute: its flags, type code and typed value (bytes when not recognised)."""

    flags: int
    type_code: int
    value: Any


class MalformedValue(Exception):
    """An attribute value that fails its RFC 7606 §7 check: the action and the NOTIFICATION
    subcode to report it with."""

    def __init__(self, action: Action, subcode: int, reason: str) -> None:
        self.action = action
        self.subcode = subcode
        self.reason = reason


# RFC 7606 §7: the action for a malformed instance of each recognised attribute.
MALFORMED_ACTION: Final = {
    C.ATTR_ORIGIN: Action.TREAT_AS_WITHDRAW,
    C.ATTR_AS_PATH: Action.TREAT_AS_WITHDRAW,
    C.ATTR_NEXT_HOP: Action.TREAT_AS_WITHDRAW,
    C.ATTR_MED: Action.TREAT_AS_WITHDRAW,
    C.ATTR_LOCAL_PREF: Action.TREAT_AS_WITHDRAW,
    C.ATTR_ATOMIC_AGGREGATE: Action.ATTRIBUTE_DISCARD,
    C.ATTR_AGGREGATOR: Action.ATTRIBUTE_DISCARD,
    C.ATTR_COMMUNITIES: Action.TREAT_AS_WITHDRAW,
    C.ATTR_ORIGINATOR_ID: Action.TREAT_AS_WITHDRAW,
    C.ATTR_CLUSTER_LIST: Action.TREAT_AS_WITHDRAW,
    C.ATTR_MP_REACH_NLRI: Action.SESSION_RESET,
    C.ATTR_MP_UNREACH_NLRI: Action.SESSION_RESET,
    C.ATTR_EXTENDED_COMMUNITIES: Action.TREAT_AS_WITHDRAW,
    C.ATTR_AS4_PATH: Action.ATTRIBUTE_DISCARD,  # RFC 6793 §6
    C.ATTR_AS4_AGGREGATOR: Action.ATTRIBUTE_DISCARD,
    C.ATTR_LARGE_COMMUNITIES: Action.TREAT_AS_WITHDRAW,  # RFC 8092 §6
}


# ---------------------------------------------------------------------------------------------
# Typed value codecs. Each decoder gets the raw value and raises MalformedValue; each encoder is
# its exact inverse.


def _decode_origin(v: bytes, ctx: CodecContext) -> int:
    if len(v) != 1:
        raise MalformedValue(Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_ATTR_LENGTH, f"ORIGIN length {len(v)}, expected 1")
    if v[0] > 2:
        raise MalformedValue(Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_INVALID_ORIGIN, f"ORIGIN value {v[0]} undefined")
    return v[0]


def decode_as_path(v: bytes, asn4: bool) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """AS_PATH segments as ((segment type, (asn, ...)), ...); raises ValueError when malformed."""
    width = 4 if asn4 else 2
    ch = "I" if asn4 else "H"
    segs = []
    i, n = 0, len(v)
    while i < n:
        if i + 2 > n:
            raise ValueError(f"segment header truncated at offset {i}")
        st, cnt = v[i], v[i + 1]
        if st not in (1, 2, 3, 4):
            raise ValueError(f"segment type {st} undefined")
        if cnt == 0:
            raise ValueError("segment of length 0")
        end = i + 2 + cnt * width
        if end > n:
            raise ValueError(f"segment of {cnt} ASes overruns the attribute")
        segs.append((st, _unpack_from(f"!{cnt}{ch}", v, i + 2)))
        i = end
    return tuple(segs)


def encode_as_path(segments: Iterable[tuple[int, tuple[int, ...]]], asn4: bool) -> bytes:
    ch = "I" if asn4 else "H"
    return b"".join(struct.pack(f"!BB{len(a)}{ch}", st, len(a), *a) for st, a in segments)


def _decode_as_path(v: bytes, ctx: CodecContext) -> tuple[tuple[int, tuple[int, ...]], ...]:
    try:
        segs = decode_as_path(v, ctx.asn4)
    except ValueError as e:
        raise MalformedValue(Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_MALFORMED_AS_PATH, f"AS_PATH {e}") from None
    if not ctx.ibgp and any(st > 2 for st, _ in segs):
        # RFC 5065 §5: confederation segments must not reach a peer outside the confederation.
        raise MalformedValue(
            Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_MALFORMED_AS_PATH, "AS_PATH has confederation segments from eBGP"
        )
    return segs


def _decode_as4_path(v: bytes, ctx: CodecContext) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if len(v) < 6:
        raise MalformedValue(Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_OPTIONAL_ATTR, f"AS4_PATH length {len(v)} < 6")
    try:
        segs = decode_as_path(v, True)
    except ValueError as e:
        raise MalformedValue(Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_OPTIONAL_ATTR, f"AS4_PATH {e}") from None
    # RFC 6793 §6: confederation segments in AS4_PATH are dropped; the rest is kept.
    return tuple(seg for seg in segs if seg[0] <= 2)


def _fixed(length: int, name: str, action: Action = Action.TREAT_AS_WITHDRAW) -> Any:
    def check(v: bytes) -> None:
        if len(v) != length:
            raise MalformedValue(action, C.ERR_UPDATE_ATTR_LENGTH, f"{name} length {len(v)}, expected {length}")

    return check


_check4_nh = _fixed(4, "NEXT_HOP")
_check4_med = _fixed(4, "MULTI_EXIT_DISC")
_check4_lp = _fixed(4, "LOCAL_PREF")
_check4_oid = _fixed(4, "ORIGINATOR_ID")


_NEXT_HOPS: dict[bytes, str] = {}


def _decode_next_hop(v: bytes, ctx: CodecContext) -> str:
    """Next hop text, one shared string per address (routes share a few thousand next hops)."""
    _check4_nh(v)
    text = _NEXT_HOPS.get(v)
    if text is None:
        if len(_NEXT_HOPS) > 1_000_000:
            _NEXT_HOPS.clear()
        text = _NEXT_HOPS[v] = _inet_ntoa(v)
    return text


def _decode_med(v: bytes, ctx: CodecContext) -> int:
    _check4_med(v)
    return _from_bytes(v, "big")


def _decode_local_pref(v: bytes, ctx: CodecContext) -> int:
    _check4_lp(v)
    return _from_bytes(v, "big")


def _decode_atomic(v: bytes, ctx: CodecContext) -> bool:
    if v:
        raise MalformedValue(
            Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_ATTR_LENGTH, f"ATOMIC_AGGREGATE length {len(v)}, expected 0"
        )
    return True


def _decode_aggregator(v: bytes, ctx: CodecContext) -> tuple[int, str]:
    want = 8 if ctx.asn4 else 6
    if len(v) != want:
        raise MalformedValue(
            Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_ATTR_LENGTH, f"AGGREGATOR length {len(v)}, expected {want}"
        )
    return _from_bytes(v[: want - 4], "big"), _inet_ntoa(v[want - 4 :])


def _decode_as4_aggregator(v: bytes, ctx: CodecContext) -> tuple[int, str]:
    if len(v) != 8:
        raise MalformedValue(
            Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_ATTR_LENGTH, f"AS4_AGGREGATOR length {len(v)}, expected 8"
        )
    return _from_bytes(v[:4], "big"), _inet_ntoa(v[4:])


def _multiple(v: bytes, unit: int, name: str) -> int:
    n = len(v)
    if n == 0 or n % unit:
        raise MalformedValue(
            Action.TREAT_AS_WITHDRAW,
            C.ERR_UPDATE_OPTIONAL_ATTR,
            f"{name} length {n} is not a positive multiple of {unit}",
        )
    return n // unit


def _decode_communities(v: bytes, ctx: CodecContext) -> tuple[int, ...]:
    return _unpack_from(f"!{_multiple(v, 4, 'COMMUNITIES')}I", v)


def _decode_originator(v: bytes, ctx: CodecContext) -> str:
    _check4_oid(v)
    return _inet_ntoa(v)


def _decode_cluster_list(v: bytes, ctx: CodecContext) -> tuple[str, ...]:
    n = _multiple(v, 4, "CLUSTER_LIST")
    return tuple(_inet_ntoa(v[i * 4 : i * 4 + 4]) for i in range(n))


def _decode_ext_communities(v: bytes, ctx: CodecContext) -> tuple[int, ...]:
    return _unpack_from(f"!{_multiple(v, 8, 'EXTENDED_COMMUNITIES')}Q", v)


def _decode_large_communities(v: bytes, ctx: CodecContext) -> tuple[tuple[int, int, int], ...]:
    n = _multiple(v, 12, "LARGE_COMMUNITIES")
    flat = _unpack_from(f"!{3 * n}I", v)
    return tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * n, 3))


VALUE_DECODERS: Final[dict[int, Any]] = {
    C.ATTR_ORIGIN: _decode_origin,
    C.ATTR_AS_PATH: _decode_as_path,
    C.ATTR_NEXT_HOP: _decode_next_hop,
    C.ATTR_MED: _decode_med,
    C.ATTR_LOCAL_PREF: _decode_local_pref,
    C.ATTR_ATOMIC_AGGREGATE: _decode_atomic,
    C.ATTR_AGGREGATOR: _decode_aggregator,
    C.ATTR_COMMUNITIES: _decode_communities,
    C.ATTR_ORIGINATOR_ID: _decode_originator,
    C.ATTR_CLUSTER_LIST: _decode_cluster_list,
    C.ATTR_EXTENDED_COMMUNITIES: _decode_ext_communities,
    C.ATTR_AS4_PATH: _decode_as4_path,
    C.ATTR_AS4_AGGREGATOR: _decode_as4_aggregator,
    C.ATTR_LARGE_COMMUNITIES: _decode_large_communities,
}


def encode_value(type_code: int, value: Any, ctx: CodecContext) -> bytes:
    """Wire bytes of a typed attribute value (the inverse of the decoders above)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if type_code == C.ATTR_ORIGIN:
        return bytes((value,))
    if type_code == C.ATTR_AS_PATH:
        return encode_as_path(value, ctx.asn4)
    if type_code == C.ATTR_AS4_PATH:
        return encode_as_path(value, True)
    if type_code in (C.ATTR_NEXT_HOP, C.ATTR_ORIGINATOR_ID):
        return socket.inet_aton(value)
    if type_code in (C.ATTR_MED, C.ATTR_LOCAL_PREF):
        return int(value).to_bytes(4, "big")
    if type_code == C.ATTR_ATOMIC_AGGREGATE:
        return b""
    if type_code == C.ATTR_AGGREGATOR:
        return int(value[0]).to_bytes(4 if ctx.asn4 else 2, "big") + socket.inet_aton(value[1])
    if type_code == C.ATTR_AS4_AGGREGATOR:
        return int(value[0]).to_bytes(4, "big") + socket.inet_aton(value[1])
    if type_code == C.ATTR_COMMUNITIES:
        return struct.pack(f"!{len(value)}I", *value)
    if type_code == C.ATTR_CLUSTER_LIST:
        return b"".join(socket.inet_aton(x) for x in value)
    if type_code == C.ATTR_EXTENDED_COMMUNITIES:
        return struct.pack(f"!{len(value)}Q", *value)
    if type_code == C.ATTR_LARGE_COMMUNITIES:
        return b"".join(struct.pack("!III", *lc) for lc in value)
    raise TypeError(f"attribute {type_code}: cannot encode a {type(value).__name__} value")


def encode_attribute(flags: int, type_code: int, value: bytes) -> bytes:
    """One attribute TLV; the Extended Length bit is kept if set and forced when the value needs it."""
    n = len(value)
    if n > 255:
        flags |= C.FLAG_EXTENDED_LENGTH
    if flags & C.FLAG_EXTENDED_LENGTH:
        return struct.pack("!BBH", flags, type_code, n) + value
    return struct.pack("!BBB", flags, type_code, n) + value


# ---------------------------------------------------------------------------------------------
# AS path arithmetic.


def path_length(segments: Iterable[tuple[int, tuple[int, ...]]]) -> int:
    """AS_PATH length for route selection (RFC 4271 §9.1.2.2 a; RFC 5065 §5.3): a set counts 1."""
    n = 0
    for st, asns in segments:
        if st == C.AS_SEQUENCE:
            n += len(asns)
        elif st == C.AS_SET:
            n += 1
    return n


def merge_as4_path(
    as_path: tuple[tuple[int, tuple[int, ...]], ...], as4_path: tuple[tuple[int, tuple[int, ...]], ...]
) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """RFC 6793 §4.2.3: rebuild the true path from a 2-octet AS_PATH and the AS4_PATH."""
    n2, n4 = path_length(as_path), path_length(as4_path)
    if n2 < n4:
        return as_path  # AS4_PATH is longer: ignore it
    keep = n2 - n4
    head: list[tuple[int, tuple[int, ...]]] = []
    for st, asns in as_path:
        if keep <= 0:
            break
        if st == C.AS_SEQUENCE:
            take = asns[:keep]
            head.append((st, take))
            keep -= len(take)
        elif st == C.AS_SET:
            head.append((st, asns))
            keep -= 1
        else:
            head.append((st, asns))  # confederation segments count 0 and are kept in place
    return tuple(head) + as4_path

"""Path attributes: decoding with RFC 7606 revised error handling, exact re-encoding, interning.

Decoding happens in two passes. The first splits the attribute list into (flags, type,
value) slices and finds structural errors (RFC 7606 §4: overruns, truncated headers,
duplicates). The second gives each recognised attribute its typed value and checks it
(RFC 7606 §7). Everything except MP_REACH_NLRI / MP_UNREACH_NLRI - whose NLRI are unique
per UPDATE - forms a `PathAttributes` set that is interned: identical attribute bytes map to
one shared object, so a RIB stores a pointer per prefix rather than a copy of its attributes,
and an UPDATE whose attributes were seen before skips the second pass entirely.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Final, NamedTuple

from apsv.bgp import constants as C
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action, AttributeProblem, BgpError
from apsv.bgp.nlri import NlriError, split_prefixes

_inet_ntoa = socket.inet_ntoa
_unpack_from = struct.unpack_from
_from_bytes = int.from_bytes

# Families whose NLRI APSV decodes; every other AFI/SAFI is carried as opaque bytes.
DECODED_FAMILIES: Final = frozenset({(1, 1), (1, 2), (2, 1), (2, 2)})


# The next hop of an MP_REACH_NLRI route is kept inside its interned attribute set under this
# private type code. Codes on the wire are one octet (0-255), so 256 can never collide with a
# received attribute; it is never encoded. This makes a route's attributes one shared object,
# next hop included, whatever family it belongs to.
_MP_NEXT_HOP: Final = 256


class Attribute(NamedTuple):
    """One path attribute: its flags, type code and typed value (bytes when not recognised)."""

    flags: int
    type_code: int
    value: Any


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


class _Malformed(Exception):
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
# Typed value codecs. Each decoder gets the raw value and raises _Malformed; each encoder is
# its exact inverse.


def _decode_origin(v: bytes, ctx: CodecContext) -> int:
    if len(v) != 1:
        raise _Malformed(Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_ATTR_LENGTH, f"ORIGIN length {len(v)}, expected 1")
    if v[0] > 2:
        raise _Malformed(Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_INVALID_ORIGIN, f"ORIGIN value {v[0]} undefined")
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
        raise _Malformed(Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_MALFORMED_AS_PATH, f"AS_PATH {e}") from None
    if not ctx.ibgp and any(st > 2 for st, _ in segs):
        # RFC 5065 §5: confederation segments must not reach a peer outside the confederation.
        raise _Malformed(
            Action.TREAT_AS_WITHDRAW, C.ERR_UPDATE_MALFORMED_AS_PATH, "AS_PATH has confederation segments from eBGP"
        )
    return segs


def _decode_as4_path(v: bytes, ctx: CodecContext) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if len(v) < 6:
        raise _Malformed(Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_OPTIONAL_ATTR, f"AS4_PATH length {len(v)} < 6")
    try:
        segs = decode_as_path(v, True)
    except ValueError as e:
        raise _Malformed(Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_OPTIONAL_ATTR, f"AS4_PATH {e}") from None
    # RFC 6793 §6: confederation segments in AS4_PATH are dropped; the rest is kept.
    return tuple(seg for seg in segs if seg[0] <= 2)


def _fixed(length: int, name: str, action: Action = Action.TREAT_AS_WITHDRAW) -> Any:
    def check(v: bytes) -> None:
        if len(v) != length:
            raise _Malformed(action, C.ERR_UPDATE_ATTR_LENGTH, f"{name} length {len(v)}, expected {length}")

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
        raise _Malformed(
            Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_ATTR_LENGTH, f"ATOMIC_AGGREGATE length {len(v)}, expected 0"
        )
    return True


def _decode_aggregator(v: bytes, ctx: CodecContext) -> tuple[int, str]:
    want = 8 if ctx.asn4 else 6
    if len(v) != want:
        raise _Malformed(
            Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_ATTR_LENGTH, f"AGGREGATOR length {len(v)}, expected {want}"
        )
    return _from_bytes(v[: want - 4], "big"), _inet_ntoa(v[want - 4 :])


def _decode_as4_aggregator(v: bytes, ctx: CodecContext) -> tuple[int, str]:
    if len(v) != 8:
        raise _Malformed(
            Action.ATTRIBUTE_DISCARD, C.ERR_UPDATE_ATTR_LENGTH, f"AS4_AGGREGATOR length {len(v)}, expected 8"
        )
    return _from_bytes(v[:4], "big"), _inet_ntoa(v[4:])


def _multiple(v: bytes, unit: int, name: str) -> int:
    n = len(v)
    if n == 0 or n % unit:
        raise _Malformed(
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


_DECODERS: Final[dict[int, Any]] = {
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
# The interned attribute set.


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


_ASNS: dict[int, int] = {}


def _asn(v: int) -> int:
    """One shared int object per AS number: paths repeat the same few thousand ASes."""
    got = _ASNS.get(v)
    if got is None:
        if len(_ASNS) > 1_000_000:
            _ASNS.clear()
        got = _ASNS[v] = v
    return got


class PathAttributes:
    """An immutable, interned set of path attributes (everything but MP_REACH/MP_UNREACH).

    What the decision process and the FIB need - ORIGIN, the AS path, NEXT_HOP, MED,
    LOCAL_PREF, ORIGINATOR_ID, CLUSTER_LIST length - is kept as fields, computed once when the
    set is first seen. The full list of typed attributes is rebuilt from `wire` only when
    someone asks for it (`attrs`, `get`, JSON): a RIB of a million routes stores a few hundred
    bytes per distinct attribute set rather than a tree of tuples.
    """

    __slots__ = (
        "__weakref__",
        "_attrs",
        "_extra",
        "as_path",
        "as_path_len",
        "asn4",
        "cluster_len",
        "local_pref",
        "med",
        "missing",
        "neighbor_as",
        "next_hop",
        "origin",
        "originator_id",
        "rank",
        "wire",
    )

    def __init__(
        self,
        attrs: tuple[Attribute, ...],
        wire: bytes,
        asn4: bool = True,
        *,
        keep: bool = True,
        extra: Attribute | None = None,
    ) -> None:
        self.wire = wire  # canonical bytes of these attributes (their intern key)
        self.asn4 = asn4
        self._extra = extra  # an attribute that is not on the wire (the MP_REACH next hop)
        self._attrs: tuple[Attribute, ...] | None = attrs if keep else None
        origin = next_hop = med = local_pref = originator = agg = None
        path: tuple[tuple[int, tuple[int, ...]], ...] = ()
        as4: tuple[tuple[int, tuple[int, ...]], ...] | None = None
        has_as4_agg = False
        cluster_len = 0
        seen_origin = seen_path = seen_nh = False
        for _flags, t, v in attrs:
            if t == C.ATTR_AS_PATH:
                path, seen_path = v, True
            elif t == C.ATTR_ORIGIN:
                origin, seen_origin = v, True
            elif t == C.ATTR_NEXT_HOP:
                next_hop, seen_nh = v, True
            elif t == C.ATTR_MED:
                med = v
            elif t == C.ATTR_LOCAL_PREF:
                local_pref = v
            elif t == C.ATTR_AS4_PATH:
                as4 = v
            elif t == C.ATTR_AGGREGATOR:
                agg = v
            elif t == C.ATTR_AS4_AGGREGATOR:
                has_as4_agg = True
            elif t == C.ATTR_ORIGINATOR_ID:
                originator = v
            elif t == C.ATTR_CLUSTER_LIST:
                cluster_len = len(v)
        # RFC 6793 §4.2.3: an AGGREGATOR that is not AS_TRANS means AS4_PATH is stale.
        if not asn4 and as4 is not None and (agg is None or agg[0] == C.AS_TRANS or not has_as4_agg):
            path = merge_as4_path(path, as4)
        self.origin: int | None = origin
        self.as_path: tuple[tuple[int, tuple[int, ...]], ...] = tuple(
            (st, tuple([_asn(a) for a in asns])) for st, asns in path
        )
        self.as_path_len = path_length(path)
        neighbor: int | None = None
        for st, asns in path:
            if st == C.AS_SEQUENCE:
                neighbor = asns[0]
                break
            if st == C.AS_CONFED_SEQUENCE:
                break
        self.neighbor_as: int | None = neighbor
        # The next hop a route uses: MP_REACH_NLRI's (kept as `extra`) or NEXT_HOP.
        self.next_hop: str | None = extra[2] if extra is not None else next_hop
        self.med: int | None = med
        self.local_pref: int | None = local_pref
        self.originator_id: str | None = originator
        self.cluster_len = cluster_len
        # Well-known mandatory attributes absent (RFC 4271 §5; NEXT_HOP only matters for IPv4 NLRI).
        if seen_origin and seen_path and seen_nh:
            self.missing: tuple[int, ...] = ()
        else:
            self.missing = tuple(t for t, ok in ((1, seen_origin), (2, seen_path), (3, seen_nh)) if not ok)
        # The part of route selection that depends on the attributes alone (see rib.premed_key).
        self.rank = (min(self.as_path_len, 0xFFFFFFFF) << 8) | (2 if origin is None else origin)

    @property
    def attrs(self) -> tuple[Attribute, ...]:
        """The typed attributes, in wire order (plus the MP next hop, if any, last)."""
        base = self._attrs
        if base is None:
            base = _typed_from_wire(self.wire, self.asn4)
        return base if self._extra is None else (*base, self._extra)

    def with_extra(self, extra: Attribute) -> PathAttributes:
        """The same set plus an attribute that is not on the wire (the MP_REACH next hop)."""
        return PathAttributes(
            self._attrs or _typed_from_wire(self.wire, self.asn4),
            self.wire,
            self.asn4,
            keep=self._attrs is not None,
            extra=extra,
        )

    def get(self, type_code: int, default: Any = None) -> Any:
        if self._extra is not None and self._extra[1] == type_code:
            return self._extra[2]
        for a in self.attrs:
            if a[1] == type_code:
                return a[2]
        return default

    def __iter__(self) -> Iterator[Attribute]:
        return iter(self.attrs)

    def __len__(self) -> int:
        return len(self.attrs)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, PathAttributes) and self.wire == other.wire and self._extra == other._extra

    def __hash__(self) -> int:
        return hash(self.wire)

    def __repr__(self) -> str:
        inner = ", ".join(f"{C.ATTR_NAMES.get(a.type_code, a.type_code)}={a.value!r}" for a in self.attrs)
        return f"PathAttributes({inner})"

    def to_json(self) -> dict[str, Any]:
        return attributes_to_json(self.attrs)

    @classmethod
    def build(cls, attrs: Iterable[Attribute], ctx: CodecContext) -> PathAttributes:
        """Make a set from typed attributes (for routes APSV originates)."""
        items = tuple(attrs)
        wire = b"".join(encode_attribute(a.flags, a.type_code, encode_value(a.type_code, a.value, ctx)) for a in items)
        return interner_for(ctx).intern_built(items, wire, ctx)


def _typed_from_wire(wire: bytes, asn4: bool) -> tuple[Attribute, ...]:
    """Rebuild the typed attributes of a canonical wire form (already validated when interned)."""
    ctx = CodecContext(asn4=asn4, ibgp=True)
    out = []
    i, n = 0, len(wire)
    while i < n:
        flags, code = wire[i], wire[i + 1]
        if flags & C.FLAG_EXTENDED_LENGTH:
            vs, ve = i + 4, i + 4 + ((wire[i + 2] << 8) | wire[i + 3])
        else:
            vs, ve = i + 3, i + 3 + wire[i + 2]
        dec = _DECODERS.get(code)
        value: Any = dec(wire[vs:ve], ctx) if dec is not None else wire[vs:ve]
        out.append(Attribute(flags, code, value))
        i = ve
    return tuple(out)


def attributes_to_json(attrs: Iterable[Attribute]) -> dict[str, Any]:
    """Attributes in a JSON shape close to ExaBGP's (names, as-path segments, communities 'a:b')."""
    out: dict[str, Any] = {}
    for a in attrs:
        t, v = a.type_code, a.value
        if t == _MP_NEXT_HOP:  # the next hop of MP_REACH_NLRI routes, kept with their attributes
            out["next-hop"] = v
        elif t == C.ATTR_ORIGIN:
            out["origin"] = C.ORIGIN_NAMES[v]
        elif t in (C.ATTR_AS_PATH, C.ATTR_AS4_PATH):
            out["as-path" if t == 2 else "as4-path"] = [
                {"element": C.SEGMENT_NAMES[st], "value": list(asns)} for st, asns in v
            ]
        elif t == C.ATTR_NEXT_HOP:
            out["next-hop"] = v
        elif t == C.ATTR_MED:
            out["med"] = v
        elif t == C.ATTR_LOCAL_PREF:
            out["local-preference"] = v
        elif t == C.ATTR_ATOMIC_AGGREGATE:
            out["atomic-aggregate"] = True
        elif t in (C.ATTR_AGGREGATOR, C.ATTR_AS4_AGGREGATOR):
            out["aggregator" if t == 7 else "as4-aggregator"] = f"{v[0]}:{v[1]}"
        elif t == C.ATTR_COMMUNITIES:
            out["community"] = [[c >> 16, c & 0xFFFF] for c in v]
        elif t == C.ATTR_ORIGINATOR_ID:
            out["originator-id"] = v
        elif t == C.ATTR_CLUSTER_LIST:
            out["cluster-list"] = list(v)
        elif t == C.ATTR_EXTENDED_COMMUNITIES:
            out["extended-community"] = [f"0x{c:016x}" for c in v]
        elif t == C.ATTR_LARGE_COMMUNITIES:
            out["large-community"] = [list(x) for x in v]
        else:
            out[f"attribute-0x{t:02X}-0x{a.flags:02X}"] = "0x" + bytes(v).hex().upper()
    return out


class ParsedAttributes(NamedTuple):
    """The outcome of decoding one UPDATE's attribute list."""

    attributes: PathAttributes
    mp_reach: MpReach | None
    mp_unreach: MpUnreach | None
    problems: tuple[AttributeProblem, ...]
    action: Action
    order: tuple[int, int]  # positions of (MP_REACH, MP_UNREACH) among all attributes, -1 if absent


_NO_MP: Final = (-1, -1)


class Interner:
    """Maps canonical attribute bytes to one shared `PathAttributes` (and its parse outcome).

    A clean attribute list (no MP attributes, no RFC 7606 findings) maps straight to its
    PathAttributes; one with findings maps to the whole ParsedAttributes, so the findings are
    reported again each time the same bytes arrive. Bounded: when full, entries nothing else
    refers to are swept out (CPython reference counts tell which), then, if still full, the
    oldest half is dropped from the cache (the objects live on in whatever RIB holds them).
    """

    def __init__(self, ctx: CodecContext, max_entries: int = 200_000) -> None:
        self.ctx = ctx
        self.max_entries = max_entries
        self._by_wire: dict[bytes, PathAttributes | ParsedAttributes] = {}
        self._extra: dict[tuple[bytes, int, bytes], PathAttributes] = {}
        self.hits = 0
        self.misses = 0
        self.sweeps = 0

    def __len__(self) -> int:
        return len(self._by_wire)

    def lookup(self, wire: bytes) -> ParsedAttributes | None:
        v = self._by_wire.get(wire)
        if v is None or isinstance(v, ParsedAttributes):
            return v
        return _tuple_new(ParsedAttributes, (v, None, None, (), Action.NONE, _NO_MP))

    def store(self, wire: bytes, parsed: ParsedAttributes) -> None:
        if len(self._by_wire) >= self.max_entries:
            self._sweep()
        clean = parsed.mp_reach is None and parsed.mp_unreach is None and not parsed.problems
        self._by_wire[wire] = parsed.attributes if clean else parsed

    def intern_built(self, attrs: tuple[Attribute, ...], wire: bytes, ctx: CodecContext) -> PathAttributes:
        hit = self.lookup(wire)
        if hit is not None:
            return hit.attributes
        pa = PathAttributes(attrs, wire, ctx.asn4)
        self.store(wire, ParsedAttributes(pa, None, None, (), Action.NONE, _NO_MP))
        return pa

    def with_extra(self, pa: PathAttributes, extra: Attribute, tag: bytes) -> PathAttributes:
        """`pa` plus one attribute that is not on the wire (e.g. an MP_REACH next hop), interned."""
        key = (pa.wire, extra.type_code, tag)
        hit = self._extra.get(key)
        if hit is None:
            if len(self._extra) >= self.max_entries:
                self._extra.clear()
            hit = self._extra[key] = pa.with_extra(extra)
        return hit

    def _sweep(self) -> None:
        self.sweeps += 1
        getrc = sys.getrefcount

        def pa_of(v: PathAttributes | ParsedAttributes) -> PathAttributes:
            return v.attributes if isinstance(v, ParsedAttributes) else v

        # Each entry holds exactly one reference to its PathAttributes; any more means a RIB
        # (or a caller) still uses it. getrefcount adds one for its own argument.
        internal: dict[int, int] = {}
        for v in self._by_wire.values():
            internal[id(pa_of(v))] = internal.get(id(pa_of(v)), 0) + 1
        dead = [w for w, v in self._by_wire.items() if getrc(pa_of(v)) - 1 <= internal[id(pa_of(v))]]
        for w in dead:
            del self._by_wire[w]
        if len(self._by_wire) >= self.max_entries:
            for w in list(self._by_wire)[: len(self._by_wire) // 2]:
                del self._by_wire[w]


_INTERNERS: dict[CodecContext, Interner] = {}
_BY_ID: dict[int, tuple[CodecContext, Interner]] = {}


def reset_interners() -> None:
    """Forget every interned attribute set (RIBs keep theirs). For cold-cache measurements."""
    _INTERNERS.clear()
    _BY_ID.clear()


def interner_for(ctx: CodecContext) -> Interner:
    """The process-wide interner for one decoding context (shared by all sessions like it)."""
    hit = _BY_ID.get(id(ctx))
    if hit is not None and hit[0] is ctx:  # fast path: this very context object was seen
        return hit[1]
    # add-path and extended messages do not change what attribute bytes mean
    key = CodecContext(ctx.asn4, ctx.ibgp, rib_dump=ctx.rib_dump)
    it = _INTERNERS.get(key)
    if it is None:
        it = _INTERNERS[key] = Interner(key)
    if len(_BY_ID) > 10_000:
        _BY_ID.clear()
    _BY_ID[id(ctx)] = (ctx, it)  # holds ctx, so its id cannot be reused while cached
    return it


# ---------------------------------------------------------------------------------------------
# The attribute-list decoder.


def _reset(subcode: int, data: bytes, reason: str) -> BgpError:
    return BgpError(C.ERR_UPDATE, subcode, data, reason)


_tuple_new = tuple.__new__  # builds NamedTuple instances without their Python-level __new__
_MP_CODES: Final = (C.ATTR_MP_REACH_NLRI, C.ATTR_MP_UNREACH_NLRI)
_IBGP_ONLY: Final = (C.ATTR_LOCAL_PREF, C.ATTR_ORIGINATOR_ID, C.ATTR_CLUSTER_LIST)
_AS4_CODES: Final = (C.ATTR_AS4_PATH, C.ATTR_AS4_AGGREGATOR)
_EXPECTED = C.EXPECTED_FLAGS
_OT = C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE


class _Problems:
    """RFC 7606 findings of one attribute list, and the strongest action among them."""

    __slots__ = ("action", "items")

    def __init__(self) -> None:
        self.items: list[AttributeProblem] = []
        self.action = Action.NONE

    def add(self, act: Action, code: int, subcode: int, reason: str, tlv: bytes = b"") -> None:
        self.items.append(AttributeProblem(act, code, reason, C.ERR_UPDATE, subcode, tlv))
        if act.severity > self.action.severity:
            self.action = act


def decode_attributes(data: bytes, start: int, end: int, ctx: CodecContext, interner: Interner) -> ParsedAttributes:
    """Decode data[start:end], an UPDATE's Path Attributes field.

    Returns the parse outcome; raises BgpError only where RFC 7606 requires a session reset.
    """
    blob = data[start:end]
    cached = interner._by_wire.get(blob)
    if cached is not None:
        interner.hits += 1
        if isinstance(cached, ParsedAttributes):
            return cached
        return _tuple_new(ParsedAttributes, (cached, None, None, (), Action.NONE, _NO_MP))
    interner.misses += 1

    probs: _Problems | None = None
    attrs: list[Attribute] = []
    spans: list[tuple[int, int]] = []  # where each kept attribute's TLV lies, for the canonical wire
    seen: set[int] = set()
    mp_reach: MpReach | None = None
    mp_unreach: MpUnreach | None = None
    mp_pos = [-1, -1]
    ibgp, asn4 = ctx.ibgp, ctx.asn4
    count = 0
    i = start
    while i < end:
        # RFC 7606 §4: the attribute header and length must fit the Total Attribute Length.
        flags = data[i]
        if end - i < 3 or (flags & 0x10 and end - i < 4):
            probs = probs or _Problems()
            probs.add(
                Action.TREAT_AS_WITHDRAW,
                0,
                C.ERR_UPDATE_MALFORMED_ATTR_LIST,
                f"{end - i} trailing octets are too few for an attribute header",
            )
            break
        code = data[i + 1]
        if flags & 0x10:
            vs = i + 4
            ve = vs + ((data[i + 2] << 8) | data[i + 3])
        else:
            vs = i + 3
            ve = vs + data[i + 2]
        ts = i
        i = ve
        if ve > end:
            if code in _MP_CODES:
                raise _reset(
                    C.ERR_UPDATE_OPTIONAL_ATTR, data[ts:end], f"{C.ATTR_NAMES[code]} overruns the attribute list"
                )
            probs = probs or _Problems()
            probs.add(
                Action.TREAT_AS_WITHDRAW,
                code,
                C.ERR_UPDATE_ATTR_LENGTH,
                f"attribute {code} length overruns the attribute list by {ve - end} octets",
            )
            break
        if code in seen:
            if code in _MP_CODES:
                # RFC 7606 §3 g: MP_REACH or MP_UNREACH more than once resets the session.
                raise _reset(C.ERR_UPDATE_MALFORMED_ATTR_LIST, b"", f"{C.ATTR_NAMES[code]} appears more than once")
            probs = probs or _Problems()
            probs.add(Action.ATTRIBUTE_DISCARD, code, C.ERR_UPDATE_MALFORMED_ATTR_LIST, "repeated attribute discarded")
            continue
        seen.add(code)
        count += 1
        expected = _EXPECTED.get(code)
        if expected is None:
            if not flags & C.FLAG_OPTIONAL:
                # RFC 4271 §6.3: an unrecognized well-known attribute ends the session.
                raise _reset(
                    C.ERR_UPDATE_UNRECOGNIZED_WELL_KNOWN, data[ts:ve], f"unrecognized well-known attribute {code}"
                )
            attrs.append(_tuple_new(Attribute, (flags, code, data[vs:ve])))  # unknown optional: untouched
            spans.append((ts, ve))
            continue
        # RFC 7606 §3 c: only the Optional and Transitive bits are compared.
        bad_flags = (flags & _OT) != expected
        if code in _MP_CODES:
            if bad_flags:
                # RFC 7606 §5.3 / RFC 4760 §7: an MP attribute with the wrong flags is incorrect.
                raise _reset(C.ERR_UPDATE_OPTIONAL_ATTR, data[ts:ve], f"{C.ATTR_NAMES[code]} flags 0x{flags:02x}")
            if code == C.ATTR_MP_REACH_NLRI:
                mp_pos[0] = count - 1
                mp_reach = _decode_mp_reach(data[vs:ve], flags, ctx, data[ts:ve])
                if mp_reach.nlri is not None and not ctx.rib_dump and not _next_hop_ok(mp_reach):
                    # RFC 7606 §7.11: with a next hop of the wrong length the NLRI cannot be
                    # located reliably, so only a session reset (or AFI/SAFI disable) is safe.
                    raise _reset(
                        C.ERR_UPDATE_OPTIONAL_ATTR,
                        data[ts:ve],
                        f"MP_REACH_NLRI next hop length {len(mp_reach.next_hop)} invalid for AFI {mp_reach.afi}",
                    )
            else:
                mp_pos[1] = count - 1
                mp_unreach = _decode_mp_unreach(data[vs:ve], flags, ctx, data[ts:ve])
            continue
        if bad_flags:
            # RFC 7606 §3 c: conflicting flags make the attribute malformed (its own action).
            probs = probs or _Problems()
            name = C.ATTR_NAMES[code]
            probs.add(
                MALFORMED_ACTION[code], code, C.ERR_UPDATE_ATTR_FLAGS, f"{name} has flags 0x{flags:02x}", data[ts:ve]
            )
            continue
        if not ibgp and code in _IBGP_ONLY:
            # RFC 7606 §7.5, §7.9, §7.10: from an external peer these are discarded.
            probs = probs or _Problems()
            probs.add(Action.ATTRIBUTE_DISCARD, code, 0, f"{C.ATTR_NAMES[code]} from an external peer discarded")
            continue
        if asn4 and code in _AS4_CODES:
            # RFC 6793 §6: a NEW speaker discards AS4_* attributes received from a NEW speaker.
            probs = probs or _Problems()
            probs.add(Action.ATTRIBUTE_DISCARD, code, 0, f"{C.ATTR_NAMES[code]} on a 4-octet-AS session discarded")
            continue
        try:
            typed = _DECODERS[code](data[vs:ve], ctx)
        except _Malformed as m:
            probs = probs or _Problems()
            probs.add(m.action, code, m.subcode, m.reason, data[ts:ve])
            continue
        attrs.append(_tuple_new(Attribute, (flags, code, typed)))
        spans.append((ts, ve))

    clean = mp_reach is None and mp_unreach is None and probs is None
    wire = blob if clean else b"".join([data[a:b] for a, b in spans])
    pa: PathAttributes | None = None
    if not clean:
        # Share the set with UPDATEs that carried the same attributes without MP or errors.
        same = interner.lookup(wire)
        if same is not None:
            pa = same.attributes
    if pa is None:
        pa = PathAttributes(tuple(attrs), wire, asn4, keep=False)
        if not clean:
            interner.store(wire, ParsedAttributes(pa, None, None, (), Action.NONE, _NO_MP))
    if probs is None:
        parsed = _tuple_new(ParsedAttributes, (pa, mp_reach, mp_unreach, (), Action.NONE, (mp_pos[0], mp_pos[1])))
    else:
        parsed = ParsedAttributes(pa, mp_reach, mp_unreach, tuple(probs.items), probs.action, (mp_pos[0], mp_pos[1]))
    if mp_reach is None and mp_unreach is None:
        interner.store(blob, parsed)
    return parsed


def _next_hop_ok(mp: MpReach) -> bool:
    n = len(mp.next_hop)
    if mp.afi == C.AFI_IPV6:
        return n in (16, 32)
    if mp.afi == C.AFI_IPV4:
        return n in (4, 16, 32)  # 16/32: IPv6 next hop for IPv4 NLRI (RFC 8950)
    return True


def _decode_mp_reach(v: bytes, flags: int, ctx: CodecContext, tlv: bytes) -> MpReach:
    n = len(v)
    if ctx.rib_dump and n and v[0] == n - 1:
        # RFC 6396 §4.3.4: in a TABLE_DUMP_V2 RIB entry only the next hop is kept.
        return MpReach(C.AFI_IPV4 if v[0] == 4 else C.AFI_IPV6, C.SAFI_UNICAST, v[1:], 0, [], b"", flags)
    if n < 5:
        raise _reset(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_REACH_NLRI length {n} is shorter than 5")
    afi, safi, nhl = _unpack_from("!HBB", v, 0)
    if 4 + nhl + 1 > n:
        raise _reset(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_REACH_NLRI next hop length {nhl} overruns the attribute")
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
        raise _reset(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_REACH_NLRI: {e}") from None
    return MpReach(afi, safi, nh, reserved, nlri, b"", flags, ap)


def _decode_mp_unreach(v: bytes, flags: int, ctx: CodecContext, tlv: bytes) -> MpUnreach:
    n = len(v)
    if n < 3:
        raise _reset(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_UNREACH_NLRI length {n} is shorter than 3")
    afi, safi = _unpack_from("!HB", v, 0)
    ap = (afi, safi) in ctx.add_path
    if (afi, safi) not in DECODED_FAMILIES:
        return MpUnreach(afi, safi, None, v[3:], flags, ap)
    try:
        wd = split_prefixes(v, 3, n, C.ADDRESS_BITS[afi], ap)
    except NlriError as e:
        raise _reset(C.ERR_UPDATE_OPTIONAL_ATTR, tlv, f"MP_UNREACH_NLRI: {e}") from None
    return MpUnreach(afi, safi, wd, b"", flags, ap)


def encode_mp_reach(mp: MpReach) -> bytes:
    body = struct.pack("!HBB", mp.afi, mp.safi, len(mp.next_hop)) + mp.next_hop + bytes((mp.reserved,))
    body += b"".join(mp.nlri) if mp.nlri is not None else mp.raw_nlri
    return encode_attribute(mp.flags, C.ATTR_MP_REACH_NLRI, body)


def encode_mp_unreach(mp: MpUnreach) -> bytes:
    body = struct.pack("!HB", mp.afi, mp.safi)
    body += b"".join(mp.withdrawn) if mp.withdrawn is not None else mp.raw_withdrawn
    return encode_attribute(mp.flags, C.ATTR_MP_UNREACH_NLRI, body)


MP_NEXT_HOP: Final = _MP_NEXT_HOP


def with_mp_next_hop(pa: PathAttributes, nh: bytes, ctx: CodecContext) -> PathAttributes:
    """The interned attribute set `pa` plus the next hop an MP_REACH_NLRI carried."""
    if len(nh) in (16, 32):
        text = socket.inet_ntop(socket.AF_INET6, nh[:16])
    elif len(nh) == 4:
        text = socket.inet_ntoa(nh)
    else:
        text = "0x" + nh.hex()
    return interner_for(ctx).with_extra(pa, Attribute(0, MP_NEXT_HOP, text), nh)


def with_community(pa: PathAttributes, community: int, ctx: CodecContext) -> PathAttributes:
    """`pa` with one more RFC 1997 community (the set kept sorted, without repeats), interned."""
    have: tuple[int, ...] = tuple(pa.get(C.ATTR_COMMUNITIES) or ())
    if community in have:
        return pa
    base = [a for a in pa.attrs if a.type_code not in (MP_NEXT_HOP, C.ATTR_COMMUNITIES)]
    flags = C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE
    base.append(Attribute(flags, C.ATTR_COMMUNITIES, tuple(sorted({*have, community}))))
    out = PathAttributes.build(sorted(base, key=lambda a: a.type_code), ctx)
    extra = pa._extra
    if extra is None:
        return out
    return interner_for(ctx).with_extra(out, extra, str(extra.value).encode())

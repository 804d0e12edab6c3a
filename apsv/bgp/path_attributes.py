"""The interned attribute set: `PathAttributes` (everything but MP_REACH/MP_UNREACH), its
parse outcome, and the process-wide interners that map identical attribute bytes to one shared
object, so a RIB stores a pointer per prefix rather than a copy of its attributes."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Final, NamedTuple

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import (
    MP_NEXT_HOP,
    VALUE_DECODERS,
    Attribute,
    encode_attribute,
    encode_value,
    merge_as4_path,
    path_length,
)
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action, AttributeProblem
from apsv.bgp.mp_nlri import MpReach, MpUnreach

_tuple_new = tuple.__new__  # builds NamedTuple instances without their Python-level __new__


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
        dec = VALUE_DECODERS.get(code)
        value: Any = dec(wire[vs:ve], ctx) if dec is not None else wire[vs:ve]
        out.append(Attribute(flags, code, value))
        i = ve
    return tuple(out)


def attributes_to_json(attrs: Iterable[Attribute]) -> dict[str, Any]:
    """Attributes in a JSON shape close to ExaBGP's (names, as-path segments, communities 'a:b')."""
    out: dict[str, Any] = {}
    for a in attrs:
        t, v = a.type_code, a.value
        if t == MP_NEXT_HOP:  # the next hop of MP_REACH_NLRI routes, kept with their attributes
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


NO_MP: Final = (-1, -1)  # ParsedAttributes.order of a list without MP attributes


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
        # canonical bytes -> the set or its parse outcome; the decoder reads it directly (its cache hit
        # is one dict lookup per UPDATE)
        self.by_wire: dict[bytes, PathAttributes | ParsedAttributes] = {}
        self._extra: dict[tuple[bytes, int, bytes], PathAttributes] = {}
        self.hits = 0
        self.misses = 0
        self.sweeps = 0

    def __len__(self) -> int:
        return len(self.by_wire)

    def lookup(self, wire: bytes) -> ParsedAttributes | None:
        v = self.by_wire.get(wire)
        if v is None or isinstance(v, ParsedAttributes):
            return v
        return _tuple_new(ParsedAttributes, (v, None, None, (), Action.NONE, NO_MP))

    def store(self, wire: bytes, parsed: ParsedAttributes) -> None:
        if len(self.by_wire) >= self.max_entries:
            self._sweep()
        clean = parsed.mp_reach is None and parsed.mp_unreach is None and not parsed.problems
        self.by_wire[wire] = parsed.attributes if clean else parsed

    def intern_built(self, attrs: tuple[Attribute, ...], wire: bytes, ctx: CodecContext) -> PathAttributes:
        hit = self.lookup(wire)
        if hit is not None:
            return hit.attributes
        pa = PathAttributes(attrs, wire, ctx.asn4)
        self.store(wire, ParsedAttributes(pa, None, None, (), Action.NONE, NO_MP))
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
        for v in self.by_wire.values():
            internal[id(pa_of(v))] = internal.get(id(pa_of(v)), 0) + 1
        dead = [w for w, v in self.by_wire.items() if getrc(pa_of(v)) - 1 <= internal[id(pa_of(v))]]
        for w in dead:
            del self.by_wire[w]
        if len(self.by_wire) >= self.max_entries:
            for w in list(self.by_wire)[: len(self.by_wire) // 2]:
                del self.by_wire[w]


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

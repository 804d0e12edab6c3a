"""The attribute-list decoder: an UPDATE's Path Attributes field, with RFC 7606 revised error
handling, into an interned attribute set.

Decoding happens in two passes. The first splits the attribute list into (flags, type,
value) slices and finds structural errors (RFC 7606 §4: overruns, truncated headers,
duplicates). The second gives each recognised attribute its typed value and checks it
(RFC 7606 §7). Everything except MP_REACH_NLRI / MP_UNREACH_NLRI - whose NLRI are unique
per UPDATE - forms a `PathAttributes` set that is interned (`apsv.bgp.path_attributes`):
identical attribute bytes map to one shared object, so an UPDATE whose attributes were seen
before skips both passes. The typed values' codecs are in `apsv.bgp.attribute_values`, the MP
attributes' in `apsv.bgp.mp_nlri`.
"""

from __future__ import annotations

from typing import Final

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import MALFORMED_ACTION, VALUE_DECODERS, Attribute, MalformedValue
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action, AttributeProblem, update_error
from apsv.bgp.mp_nlri import MpReach, MpUnreach, decode_mp_reach, decode_mp_unreach, next_hop_ok
from apsv.bgp.path_attributes import NO_MP, Interner, ParsedAttributes, PathAttributes

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
    cached = interner.by_wire.get(blob)
    if cached is not None:
        interner.hits += 1
        if isinstance(cached, ParsedAttributes):
            return cached
        return _tuple_new(ParsedAttributes, (cached, None, None, (), Action.NONE, NO_MP))
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
                raise update_error(
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
                raise update_error(
                    C.ERR_UPDATE_MALFORMED_ATTR_LIST, b"", f"{C.ATTR_NAMES[code]} appears more than once"
                )
            probs = probs or _Problems()
            probs.add(Action.ATTRIBUTE_DISCARD, code, C.ERR_UPDATE_MALFORMED_ATTR_LIST, "repeated attribute discarded")
            continue
        seen.add(code)
        count += 1
        expected = _EXPECTED.get(code)
        if expected is None:
            if not flags & C.FLAG_OPTIONAL:
                # RFC 4271 §6.3: an unrecognized well-known attribute ends the session.
                raise update_error(
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
                raise update_error(C.ERR_UPDATE_OPTIONAL_ATTR, data[ts:ve], f"{C.ATTR_NAMES[code]} flags 0x{flags:02x}")
            if code == C.ATTR_MP_REACH_NLRI:
                mp_pos[0] = count - 1
                mp_reach = decode_mp_reach(data[vs:ve], flags, ctx, data[ts:ve])
                if mp_reach.nlri is not None and not ctx.rib_dump and not next_hop_ok(mp_reach):
                    # RFC 7606 §7.11: with a next hop of the wrong length the NLRI cannot be
                    # located reliably, so only a session reset (or AFI/SAFI disable) is safe.
                    raise update_error(
                        C.ERR_UPDATE_OPTIONAL_ATTR,
                        data[ts:ve],
                        f"MP_REACH_NLRI next hop length {len(mp_reach.next_hop)} invalid for AFI {mp_reach.afi}",
                    )
            else:
                mp_pos[1] = count - 1
                mp_unreach = decode_mp_unreach(data[vs:ve], flags, ctx, data[ts:ve])
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
            typed = VALUE_DECODERS[code](data[vs:ve], ctx)
        except MalformedValue as m:
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
            interner.store(wire, ParsedAttributes(pa, None, None, (), Action.NONE, NO_MP))
    if probs is None:
        parsed = _tuple_new(ParsedAttributes, (pa, mp_reach, mp_unreach, (), Action.NONE, (mp_pos[0], mp_pos[1])))
    else:
        parsed = ParsedAttributes(pa, mp_reach, mp_unreach, tuple(probs.items), probs.action, (mp_pos[0], mp_pos[1]))
    if mp_reach is None and mp_unreach is None:
        interner.store(blob, parsed)
    return parsed

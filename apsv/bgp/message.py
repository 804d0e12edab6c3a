"""BGP-4 messages: decoding and encoding (RFC 4271 §4 and extensions); the framing that cuts
a stream into messages is `apsv.bgp.framing`.

`decode_message(type, body, ctx)` and `encode_message(msg, ctx)` are exact inverses for
well-formed messages. Bad input raises `BgpError` (with the NOTIFICATION to send) or, for
UPDATE attribute errors that RFC 7606 handles without a reset, yields an `Update` whose
`action` and `problems` say what was wrong.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import encode_attribute, encode_value
from apsv.bgp.attributes import decode_attributes
from apsv.bgp.capabilities import Capability, parse_capability
from apsv.bgp.context import DEFAULT_CONTEXT, CodecContext
from apsv.bgp.errors import Action, AttributeProblem, BgpError
from apsv.bgp.framing import check_header
from apsv.bgp.mp_nlri import MpReach, MpUnreach, encode_mp_reach, encode_mp_unreach
from apsv.bgp.nlri import NlriError, count_nlri, prefix_str, split_prefixes
from apsv.bgp.path_attributes import NO_MP, Interner, ParsedAttributes, PathAttributes, attributes_to_json, interner_for

_from_bytes = int.from_bytes


# ---------------------------------------------------------------------------------------------
# Message types


@dataclass(slots=True)
class Open:
    asn: int  # the 2-octet My Autonomous System field (AS_TRANS when the real AS needs 4 octets)
    hold_time: int
    router_id: str
    capabilities: tuple[Capability, ...] = ()
    version: int = C.BGP_VERSION
    # Optional parameters exactly as received: (type, raw value). Type 2 holds capabilities.
    params: tuple[tuple[int, bytes], ...] | None = None
    extended_params: bool = False  # RFC 9072 encoding of the optional parameters

    type = C.MSG_OPEN

    @property
    def real_asn(self) -> int:
        """The speaker's AS: from the 4-octet AS capability if present (RFC 6793), else My AS."""
        for cap in self.capabilities:
            if cap.code == C.CAP_FOUR_OCTET_AS and len(cap.value) == 4:
                return _from_bytes(cap.value, "big")
        return self.asn

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        for cap in self.capabilities:
            try:
                parsed: object = parse_capability(cap.code, cap.value)
            except BgpError:
                parsed = cap.value.hex()
            caps[str(cap.code)] = repr(parsed)
        return {
            "version": self.version,
            "asn": self.real_asn,
            "hold_time": self.hold_time,
            "router_id": self.router_id,
            "capabilities": caps,
        }


@dataclass(slots=True)
class Update:
    withdrawn: list[bytes] = field(default_factory=list)  # IPv4 unicast withdrawn routes, wire form
    attributes: PathAttributes | None = None  # everything but MP_REACH/MP_UNREACH
    nlri: list[bytes] = field(default_factory=list)  # IPv4 unicast NLRI, wire form
    mp_reach: MpReach | None = None
    mp_unreach: MpUnreach | None = None
    action: Action = Action.NONE  # RFC 7606 outcome: NONE, ATTRIBUTE_DISCARD or TREAT_AS_WITHDRAW
    problems: tuple[AttributeProblem, ...] = ()
    order: tuple[int, int] = (-1, -1)  # where MP_REACH/MP_UNREACH stood among the attributes

    type = C.MSG_UPDATE

    @property
    def announced_count(self) -> int:
        """Prefixes announced, MP_REACH included (NLRI of opaque families counted where their framing is known)."""
        n = len(self.nlri)
        mp = self.mp_reach
        if mp is not None:
            if mp.nlri is not None:
                n += len(mp.nlri)
            else:
                n += count_nlri(mp.afi, mp.safi, mp.raw_nlri, mp.path_ids) or 0
        return n

    @property
    def withdrawn_count(self) -> int:
        n = len(self.withdrawn)
        mp = self.mp_unreach
        if mp is not None:
            if mp.withdrawn is not None:
                n += len(mp.withdrawn)
            else:
                n += count_nlri(mp.afi, mp.safi, mp.raw_withdrawn, mp.path_ids) or 0
        return n

    @property
    def is_end_of_rib(self) -> bool:
        """RFC 4724 §2: an empty UPDATE (IPv4) or one with only an empty MP_UNREACH."""
        if self.nlri or self.withdrawn or self.mp_reach is not None:
            return False
        if self.mp_unreach is None:
            return self.attributes is None or len(self.attributes) == 0
        return not self.mp_unreach.withdrawn and not self.mp_unreach.raw_withdrawn

    def to_json(self, ctx: CodecContext = DEFAULT_CONTEXT) -> dict[str, Any]:
        """An ExaBGP-like JSON view: attributes, announce {family: {next hop: [nlri]}}, withdraw."""
        out: dict[str, Any] = {}
        if self.attributes is not None and len(self.attributes):
            out["attribute"] = attributes_to_json(self.attributes)
        ann: dict[str, Any] = {}
        wd: dict[str, Any] = {}
        v4_ap = C.IPV4_UNICAST in ctx.add_path
        if self.nlri:
            nh = self.attributes.next_hop if self.attributes is not None else None
            ann["ipv4 unicast"] = {str(nh): [{"nlri": prefix_str(p, 1, v4_ap)} for p in self.nlri]}
        if self.withdrawn:
            wd["ipv4 unicast"] = [{"nlri": prefix_str(p, 1, v4_ap)} for p in self.withdrawn]
        if self.mp_reach is not None:
            fam = family_name(self.mp_reach.afi, self.mp_reach.safi)
            if self.mp_reach.nlri is not None:
                ap = (self.mp_reach.afi, self.mp_reach.safi) in ctx.add_path
                nh = next_hop_text(self.mp_reach.afi, self.mp_reach.next_hop)
                ann[fam] = {nh: [{"nlri": prefix_str(p, self.mp_reach.afi, ap)} for p in self.mp_reach.nlri]}
            else:
                ann[fam] = {"opaque": self.mp_reach.raw_nlri.hex()}
        if self.mp_unreach is not None:
            fam = family_name(self.mp_unreach.afi, self.mp_unreach.safi)
            if self.mp_unreach.withdrawn is not None:
                ap = (self.mp_unreach.afi, self.mp_unreach.safi) in ctx.add_path
                wd[fam] = [{"nlri": prefix_str(p, self.mp_unreach.afi, ap)} for p in self.mp_unreach.withdrawn]
            else:
                wd[fam] = {"opaque": self.mp_unreach.raw_withdrawn.hex()}
        if ann:
            out["announce"] = ann
        if wd:
            out["withdraw"] = wd
        if self.problems:
            out["errors"] = [p.describe() for p in self.problems]
        return out


@dataclass(slots=True)
class Notification:
    code: int
    subcode: int
    data: bytes = b""

    type = C.MSG_NOTIFICATION

    @property
    def name(self) -> str:
        return C.error_name(self.code, self.subcode)

    @property
    def shutdown_message(self) -> str | None:
        """RFC 9003 shutdown communication carried by Cease/Administrative Shutdown or Reset."""
        if self.code == C.ERR_CEASE and self.subcode in (C.CEASE_ADMIN_SHUTDOWN, C.CEASE_ADMIN_RESET) and self.data:
            n = self.data[0]
            if 0 < n <= len(self.data) - 1:
                return self.data[1 : 1 + n].decode("utf-8", "replace")
        return None

    @classmethod
    def from_error(cls, err: BgpError) -> Notification:
        return cls(err.code, err.subcode, err.data)

    @classmethod
    def shutdown(cls, message: str = "", subcode: int = C.CEASE_ADMIN_SHUTDOWN) -> Notification:
        raw = message.encode("utf-8")[:255]
        return cls(C.ERR_CEASE, subcode, bytes((len(raw),)) + raw if raw else b"")


@dataclass(slots=True)
class Keepalive:
    type = C.MSG_KEEPALIVE


@dataclass(slots=True)
class RouteRefresh:
    afi: int
    safi: int
    subtype: int = 0  # RFC 7313: 0 normal, 1 BoRR, 2 EoRR
    orf: bytes = b""  # RFC 5291 ORF entries, carried raw

    type = C.MSG_ROUTE_REFRESH


Message = Open | Update | Notification | Keepalive | RouteRefresh


def family_name(afi: int, safi: int) -> str:
    return f"{C.AFI_NAMES.get(afi, str(afi))} {C.SAFI_NAMES.get(safi, str(safi))}"


def next_hop_text(afi: int, nh: bytes) -> str:
    if len(nh) == 4:
        return socket.inet_ntoa(nh)
    if len(nh) in (16, 32):
        glob = socket.inet_ntop(socket.AF_INET6, nh[:16])
        return glob if len(nh) == 16 else f"{glob},{socket.inet_ntop(socket.AF_INET6, nh[16:])}"
    return "0x" + nh.hex()


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_message(
    mtype: int, body: bytes, ctx: CodecContext = DEFAULT_CONTEXT, interner: Interner | None = None
) -> Message:
    """Decode one message body (the octets after the 19-octet header)."""
    if mtype == C.MSG_UPDATE:
        return decode_update(body, ctx, interner)
    if mtype == C.MSG_KEEPALIVE:
        if body:
            raise BgpError(
                C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, (19 + len(body)).to_bytes(2, "big"), "KEEPALIVE with a body"
            )
        return Keepalive()
    if mtype == C.MSG_NOTIFICATION:
        if len(body) < 2:
            raise BgpError(
                C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, (19 + len(body)).to_bytes(2, "big"), "NOTIFICATION too short"
            )
        return Notification(body[0], body[1], body[2:])
    if mtype == C.MSG_OPEN:
        return decode_open(body)
    if mtype == C.MSG_ROUTE_REFRESH:
        return decode_route_refresh(body)
    raise BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_TYPE, bytes((mtype & 0xFF,)), f"message type {mtype} undefined")


def decode_bytes(data: bytes, ctx: CodecContext = DEFAULT_CONTEXT) -> Message:
    """Decode one whole message, header included."""
    if len(data) < C.HEADER_LEN:
        raise BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, b"", f"{len(data)} octets are shorter than a header")
    length, mtype = check_header(
        data[: C.HEADER_LEN], C.MAX_EXTENDED_MESSAGE_LEN if ctx.extended_message else C.MAX_MESSAGE_LEN
    )
    if length != len(data):
        raise BgpError(
            C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, data[16:18], f"header says {length} octets, message has {len(data)}"
        )
    return decode_message(mtype, data[C.HEADER_LEN :], ctx)


def _open_error(subcode: int, reason: str, data: bytes = b"") -> BgpError:
    return BgpError(C.ERR_OPEN, subcode, data, reason)


def decode_open(body: bytes) -> Open:
    n = len(body)
    if n < 10:
        raise BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, (19 + n).to_bytes(2, "big"), "OPEN too short")
    version = body[0]
    if version != C.BGP_VERSION:
        # RFC 4271 §6.2: data is the largest version we support, as 2 octets.
        raise _open_error(C.ERR_OPEN_UNSUPPORTED_VERSION, f"version {version}", C.BGP_VERSION.to_bytes(2, "big"))
    asn, hold = struct.unpack_from("!HH", body, 1)
    router_id = socket.inet_ntoa(body[5:9])
    opt_len = body[9]
    i = 10
    extended = False
    if opt_len == C.OPT_PARAM_EXTENDED_LENGTH and n > 10 and body[10] == C.OPT_PARAM_EXTENDED_LENGTH:
        # RFC 9072: Non-Ext OP Type 255, then a 2-octet Extended Opt. Parm. Length.
        if n < 13:
            raise _open_error(0, "extended optional parameters length truncated")
        extended = True
        opt_len = (body[11] << 8) | body[12]
        i = 13
    if i + opt_len != n:
        raise _open_error(0, f"optional parameters length {opt_len} disagrees with the {n - i} octets present")
    params: list[tuple[int, bytes]] = []
    caps: list[Capability] = []
    hl = 3 if extended else 2
    while i < n:
        if i + hl > n:
            raise _open_error(0, f"optional parameter header truncated at octet {i}")
        ptype = body[i]
        plen = ((body[i + 1] << 8) | body[i + 2]) if extended else body[i + 1]
        j = i + hl + plen
        if j > n:
            raise _open_error(0, f"optional parameter {ptype} overruns the OPEN by {j - n} octets")
        value = body[i + hl : j]
        params.append((ptype, value))
        if ptype == C.OPT_PARAM_CAPABILITIES:
            k = 0
            while k < len(value):
                if k + 2 > len(value):
                    raise _open_error(0, "capability header truncated")
                ccode, clen = value[k], value[k + 1]
                if k + 2 + clen > len(value):
                    raise _open_error(0, f"capability {ccode} overruns its parameter")
                caps.append(Capability(ccode, value[k + 2 : k + 2 + clen]))
                k += 2 + clen
        i = j
    return Open(asn, hold, router_id, tuple(caps), version, tuple(params), extended)


def decode_route_refresh(body: bytes) -> RouteRefresh:
    n = len(body)
    if n < 4:
        raise BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, (19 + n).to_bytes(2, "big"), "ROUTE-REFRESH too short")
    if n != 4 and body[2] in (1, 2):
        # RFC 7313 §5: the data is the complete ROUTE-REFRESH message.
        whole = C.MARKER + (19 + n).to_bytes(2, "big") + bytes((C.MSG_ROUTE_REFRESH,)) + body
        raise BgpError(
            C.ERR_ROUTE_REFRESH, C.ERR_ROUTE_REFRESH_INVALID_LENGTH, whole, f"ROUTE-REFRESH body of {n} octets"
        )
    afi, subtype, safi = struct.unpack_from("!HBB", body)
    return RouteRefresh(afi, safi, subtype, body[4:])


EMPTY_ATTRIBUTES = PathAttributes((), b"")
_EMPTY_PARSE = ParsedAttributes(EMPTY_ATTRIBUTES, None, None, (), Action.NONE, NO_MP)


def _bad_next_hop(nh: str) -> bool:
    """Not a unicast host address: 0.0.0.0, limited broadcast, or class D/E (RFC 4271 §6.3)."""
    return nh == "0.0.0.0" or int(nh.partition(".")[0]) >= 224


def decode_update(body: bytes, ctx: CodecContext = DEFAULT_CONTEXT, interner: Interner | None = None) -> Update:
    """Decode an UPDATE body with RFC 7606 error handling."""
    n = len(body)
    if n < 4:
        raise BgpError(C.ERR_UPDATE, C.ERR_UPDATE_MALFORMED_ATTR_LIST, b"", f"UPDATE body of {n} octets")
    wl = (body[0] << 8) | body[1]
    a0 = 2 + wl
    if a0 + 2 > n:
        raise BgpError(
            C.ERR_UPDATE, C.ERR_UPDATE_MALFORMED_ATTR_LIST, b"", f"withdrawn routes length {wl} overruns the UPDATE"
        )
    al = (body[a0] << 8) | body[a0 + 1]
    a1 = a0 + 2 + al
    if a1 > n:
        raise BgpError(
            C.ERR_UPDATE, C.ERR_UPDATE_MALFORMED_ATTR_LIST, b"", f"total attribute length {al} overruns the UPDATE"
        )
    v4_ap = C.IPV4_UNICAST in ctx.add_path
    try:
        withdrawn = split_prefixes(body, 2, a0, 32, v4_ap) if wl else []
        nlri = split_prefixes(body, a1, n, 32, v4_ap) if a1 < n else []
    except NlriError as e:
        # RFC 7606 §5.3: NLRI that cannot be parsed leave no choice but a session reset.
        raise BgpError(C.ERR_UPDATE, C.ERR_UPDATE_INVALID_NETWORK_FIELD, b"", str(e)) from None
    if al:
        parsed = decode_attributes(body, a0 + 2, a1, ctx, interner if interner is not None else interner_for(ctx))
    else:
        parsed = _EMPTY_PARSE
    pa = parsed.attributes
    action = parsed.action
    problems = parsed.problems
    mp_reach = parsed.mp_reach
    if nlri or (mp_reach is not None and (mp_reach.nlri or mp_reach.raw_nlri)):
        # RFC 7606 §3 d: a missing well-known mandatory attribute means treat-as-withdraw. One
        # present but malformed (and so dropped) already has its own finding: not "missing" too.
        malformed = {p.type_code for p in problems}
        missing = [t for t in pa.missing if (t != C.ATTR_NEXT_HOP or nlri) and t not in malformed]
        if ctx.ibgp and pa.local_pref is None:
            missing.append(C.ATTR_LOCAL_PREF)
        if missing:
            problems = problems + tuple(
                AttributeProblem(
                    Action.TREAT_AS_WITHDRAW,
                    t,
                    f"missing well-known attribute {C.ATTR_NAMES[t]}",
                    C.ERR_UPDATE,
                    C.ERR_UPDATE_MISSING_WELL_KNOWN,
                    bytes((t,)),
                )
                for t in missing
            )
            action = Action.TREAT_AS_WITHDRAW
        elif nlri and pa.next_hop is not None and _bad_next_hop(pa.next_hop):
            # RFC 4271 §6.3 semantic NEXT_HOP check; RFC 7606 §7.3 makes it treat-as-withdraw.
            problems = (
                *problems,
                AttributeProblem(
                    Action.TREAT_AS_WITHDRAW,
                    C.ATTR_NEXT_HOP,
                    f"NEXT_HOP {pa.next_hop} is not a usable unicast address",
                    C.ERR_UPDATE,
                    C.ERR_UPDATE_INVALID_NEXT_HOP,
                ),
            )
            action = Action.TREAT_AS_WITHDRAW
    elif action is Action.TREAT_AS_WITHDRAW and not nlri:
        # RFC 7606 §5.2: nothing reachable to withdraw, so an error worse than attribute
        # discard can only be handled by a session reset (with the underlying subcode).
        worst = next(p for p in problems if p.action is Action.TREAT_AS_WITHDRAW)
        raise BgpError(C.ERR_UPDATE, worst.subcode, worst.data, f"{worst.reason} (UPDATE without NLRI, RFC 7606 §5.2)")
    return Update(withdrawn, pa if al else None, nlri, mp_reach, parsed.mp_unreach, action, problems, parsed.order)


# ---------------------------------------------------------------------------------------------
# Encoding


def header(mtype: int, body_len: int) -> bytes:
    return C.MARKER + struct.pack("!HB", C.HEADER_LEN + body_len, mtype)


def encode_open(m: Open) -> bytes:
    if m.params is not None:
        params = m.params
    else:
        capbody = b"".join(bytes((c.code, len(c.value))) + c.value for c in m.capabilities)
        params = ((C.OPT_PARAM_CAPABILITIES, capbody),) if capbody else ()
    if m.extended_params:
        opt = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in params)
        optfield = bytes((255, 255)) + len(opt).to_bytes(2, "big") + opt
    else:
        opt = b"".join(bytes((t, len(v))) + v for t, v in params)
        if len(opt) > 255:
            raise ValueError(f"optional parameters of {len(opt)} octets need RFC 9072 extended encoding")
        optfield = bytes((len(opt),)) + opt
    body = struct.pack("!BHH", m.version, m.asn, m.hold_time) + socket.inet_aton(m.router_id) + optfield
    return header(C.MSG_OPEN, len(body)) + body


def encode_update_attributes(u: Update, ctx: CodecContext) -> bytes:
    pa = u.attributes
    mps: list[tuple[int, bytes]] = []
    if u.mp_reach is not None:
        mps.append((u.order[0], encode_mp_reach(u.mp_reach)))
    if u.mp_unreach is not None:
        mps.append((u.order[1], encode_mp_unreach(u.mp_unreach)))
    if not mps:
        return pa.wire if pa is not None else b""
    if pa is None or all(pos < 0 for pos, _ in mps) or len(pa) == 0:
        return b"".join(w for _, w in mps) + (pa.wire if pa is not None else b"")
    parts = [encode_attribute(a.flags, a.type_code, encode_value(a.type_code, a.value, ctx)) for a in pa.attrs]
    for pos, w in sorted(mps, key=lambda x: x[0]):
        parts.insert(pos if pos >= 0 else 0, w)
    return b"".join(parts)


def encode_update(u: Update, ctx: CodecContext = DEFAULT_CONTEXT) -> bytes:
    wd = b"".join(u.withdrawn)
    attrs = encode_update_attributes(u, ctx)
    body = len(wd).to_bytes(2, "big") + wd + len(attrs).to_bytes(2, "big") + attrs + b"".join(u.nlri)
    if C.HEADER_LEN + len(body) > ctx.max_message_len:
        raise ValueError(f"UPDATE of {C.HEADER_LEN + len(body)} octets exceeds {ctx.max_message_len}")
    return header(C.MSG_UPDATE, len(body)) + body


def encode_message(m: Message, ctx: CodecContext = DEFAULT_CONTEXT) -> bytes:
    if isinstance(m, Update):
        return encode_update(m, ctx)
    if isinstance(m, Keepalive):
        return KEEPALIVE_BYTES
    if isinstance(m, Notification):
        return header(C.MSG_NOTIFICATION, 2 + len(m.data)) + bytes((m.code, m.subcode)) + m.data
    if isinstance(m, Open):
        return encode_open(m)
    if isinstance(m, RouteRefresh):
        body = struct.pack("!HBB", m.afi, m.subtype, m.safi) + m.orf
        return header(C.MSG_ROUTE_REFRESH, len(body)) + body
    raise TypeError(f"not a BGP message: {m!r}")


KEEPALIVE_BYTES = header(C.MSG_KEEPALIVE, 0)

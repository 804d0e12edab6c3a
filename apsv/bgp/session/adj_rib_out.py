"""The Adj-RIB-Out: what this speaker announces, after export policy, and the UPDATEs that
carry it."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import MP_NEXT_HOP, Attribute
from apsv.bgp.config import Announcement
from apsv.bgp.fsm import Action, State
from apsv.bgp.message import (
    Update,
    encode_update,
)
from apsv.bgp.mp_nlri import MpReach, MpUnreach
from apsv.bgp.nlri import encode_prefix
from apsv.bgp.path_attributes import PathAttributes, with_mp_next_hop
from apsv.bgp.session.common import Family

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def outbound_attributes(s: BgpSession, a: Announcement, v6: bool) -> PathAttributes:
    cfg = s.config
    path = tuple(a.as_path) if cfg.ibgp else (cfg.local_as, *a.as_path)
    segs: tuple[tuple[int, tuple[int, ...]], ...] = ((C.AS_SEQUENCE, path),) if path else ()
    asn4 = s.ctx.asn4
    attrs = [Attribute(C.FLAG_TRANSITIVE, C.ATTR_ORIGIN, C.ORIGIN_IGP)]
    if asn4 or all(x <= 0xFFFF for x in path):
        attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_AS_PATH, segs))
        as4: list[Attribute] = []
    else:  # RFC 6793 §4.2.2: AS_TRANS in AS_PATH, the real path in AS4_PATH
        trans = tuple((st, tuple(x if x <= 0xFFFF else C.AS_TRANS for x in seg)) for st, seg in segs)
        attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_AS_PATH, trans))
        as4 = [Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, C.ATTR_AS4_PATH, segs)]
    if not v6:
        nh = a.next_hop or cfg.next_hop_self
        attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_NEXT_HOP, nh))
    if a.med is not None:
        attrs.append(Attribute(C.FLAG_OPTIONAL, C.ATTR_MED, a.med))
    if cfg.ibgp:
        attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_LOCAL_PREF, a.local_pref if a.local_pref is not None else 100))
    if a.communities:
        vals = tuple((int(x) << 16) | int(y) for x, y in (c.split(":") for c in a.communities))
        attrs.append(Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, C.ATTR_COMMUNITIES, vals))
    attrs.extend(as4)
    if a.large_communities:
        lcs = tuple(tuple(int(x) for x in c.split(":")) for c in a.large_communities)
        attrs.append(Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, C.ATTR_LARGE_COMMUNITIES, lcs))
    pa = PathAttributes.build(attrs, s.ctx)
    if v6:
        nh6 = a.next_hop or cfg.next_hop_self_v6
        assert nh6 is not None
        pa = with_mp_next_hop(pa, socket.inet_pton(socket.AF_INET6, nh6), s.ctx)
    return pa


def advertise(s: BgpSession, announcements: Iterable[Announcement]) -> None:
    groups: dict[tuple[Family, PathAttributes], list[bytes]] = {}
    for fam, pa, keys in exported(s, announcements):
        s.adj_out.setdefault(fam, {}).update(dict.fromkeys(keys, pa))
        groups.setdefault((fam, pa), []).extend(keys)
    if s.state is not State.ESTABLISHED:
        return  # sent when the session comes up
    n = s.negotiated
    for (fam, pa), keys in groups.items():
        if n is not None and fam in n.families:
            send_announcements(s, fam, pa, keys)


def exported(
    s: BgpSession, announcements: Iterable[Announcement]
) -> Iterator[tuple[Family, PathAttributes, list[bytes]]]:
    """(family, attributes, keys) of the announcements' prefixes that export lets out."""
    for a in announcements:
        for v6 in (False, True):
            ps = [p for p in a.prefixes if (":" in p) == v6]
            if ps:
                fam = C.IPV6_UNICAST if v6 else C.IPV4_UNICAST
                for pa, keys in export(s, fam, a, v6, [encode_prefix(p) for p in ps]).items():
                    yield fam, pa, keys


def export(
    s: BgpSession, fam: Family, a: Announcement, v6: bool, keys: list[bytes]
) -> dict[PathAttributes, list[bytes]]:
    """An announcement's prefixes through the export policy, grouped by their attributes."""
    pa = outbound_attributes(s, a, v6)
    rm = s.route_maps.get(("export", fam))
    if rm is None:
        if s._rfc8212:
            s.counters["policy_refused_out"] += len(keys)
            return {}
        return {pa: keys}
    own = a.next_hop or (s.config.next_hop_self_v6 if v6 else s.config.next_hop_self)
    ebgp = 0 if s.config.ibgp else 1
    refused, accepted = rm.apply(fam, keys, pa, s.ctx, self_next_hop=own, prepend_after=ebgp)
    s.counters["policy_refused_out"] += len(refused)
    return accepted


def readvertise(s: BgpSession, fam: Family) -> None:
    groups: dict[PathAttributes, list[bytes]] = {}
    for k, pa in s.adj_out.get(fam, {}).items():
        groups.setdefault(pa, []).append(k)
    for pa, keys in groups.items():
        send_announcements(s, fam, pa, keys)
    s._write(end_of_rib(fam))


def send_announcements(s: BgpSession, fam: Family, pa: PathAttributes, keys: list[bytes]) -> None:
    limit = s.ctx.max_message_len
    wire_attrs = [a for a in pa.attrs if a.type_code != MP_NEXT_HOP]
    base = PathAttributes.build(wire_attrs, s.ctx) if len(wire_attrs) != len(pa.attrs) else pa
    room = limit - C.HEADER_LEN - 4 - len(base.wire) - (64 if fam != C.IPV4_UNICAST else 0)
    for chunk in chunks(keys, room):
        if fam == C.IPV4_UNICAST:
            u = Update([], base, chunk)
        else:
            nh = pa.get(MP_NEXT_HOP)
            nh_bytes = socket.inet_pton(socket.AF_INET6, nh) if nh else b""
            mp = MpReach(fam[0], fam[1], nh_bytes, 0, chunk, b"")
            u = Update([], base, [], mp, None)
        s._write(encode_update(u, s.ctx))
        s.counters["updates_out"] += 1
        s.counters["prefixes_out"] += len(chunk)
    s._act(Action.KEEPALIVE_TIMER_RESTART, s.state)  # §8.2.2: an UPDATE sent counts as a KEEPALIVE


def send_withdrawals(s: BgpSession, fam: Family, keys: list[bytes]) -> None:
    room = s.ctx.max_message_len - C.HEADER_LEN - 4 - 16
    for chunk in chunks(keys, room):
        if fam == C.IPV4_UNICAST:
            u = Update(chunk, None, [])
        else:
            u = Update([], None, [], None, MpUnreach(fam[0], fam[1], chunk, b""))
        s._write(encode_update(u, s.ctx))
        s.counters["updates_out"] += 1
        s.counters["withdrawals_out"] += len(chunk)


def end_of_rib(fam: Family) -> bytes:
    """RFC 4724 §2 End-of-RIB marker."""
    if fam == C.IPV4_UNICAST:
        return encode_update(Update())
    return encode_update(Update([], None, [], None, MpUnreach(fam[0], fam[1], [], b"")))


def chunks(keys: list[bytes], room: int) -> Iterable[list[bytes]]:
    chunk: list[bytes] = []
    used = 0
    for k in keys:
        if used + len(k) > room and chunk:
            yield chunk
            chunk, used = [], 0
        chunk.append(k)
        used += len(k)
    if chunk:
        yield chunk

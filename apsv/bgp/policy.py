"""Routing policy: route maps over the lists of `policy_lists.py`, evaluated per route.

A session's configuration holds a `Policy` (named lists and route maps) and names a route map
per direction (`import_policy` / `export_policy`), for every family or per family. A route map
is FRR's: ordered entries; the first whose every `match` holds decides; `permit` applies its
`set` actions and accepts the route, `deny` refuses it; a route no entry matches is refused.
An entry without `match` matches every route.

Pure: a route map turns (keys, attributes) into the keys refused and the keys accepted, grouped
by their (possibly rewritten) attributes. Import applies it between the Adj-RIB-In and the
Loc-RIB's decision; export to what the session announces.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import MP_NEXT_HOP, Attribute
from apsv.bgp.context import CodecContext
from apsv.bgp.nlri import prefix_part
from apsv.bgp.path_attributes import PathAttributes, with_mp_next_hop
from apsv.bgp.policy_lists import (
    AsPathList,
    CommunityList,
    CompiledCommunityList,
    CompiledPrefixList,
    PrefixList,
    Verdict,
    _Strict,
    as_path_text,
    parse_community,
    parse_ext_community,
    parse_large_community,
)

Family = tuple[int, int]
U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
ORIGINS = {"igp": C.ORIGIN_IGP, "egp": C.ORIGIN_EGP, "incomplete": C.ORIGIN_INCOMPLETE}


class Match(_Strict):
    prefix_list: str | None = None
    as_path: str | None = None  # an AS-path list
    community: str | None = None  # a community list
    large_community: str | None = None
    ext_community: str | None = None
    next_hop: str | None = None  # a prefix list the next hop (as a host route) must pass
    origin: Literal["igp", "egp", "incomplete"] | None = None
    med: U32 | None = None


class SetActions(_Strict):
    local_preference: U32 | None = None
    med: U32 | None = None
    # an address; "self" (export: this speaker's next_hop_self) or "peer-address" (import: the peer's)
    next_hop: str | None = None
    as_path_prepend: list[U32] = Field(default_factory=list, max_length=16)
    # the communities: replaced (an empty list removes them all), or added with *_additive
    community: list[str] | None = None
    community_additive: bool = False
    community_delete: str | None = None  # remove those a community list permits
    large_community: list[str] | None = None
    large_community_additive: bool = False
    large_community_delete: str | None = None
    ext_community: list[str] | None = None
    ext_community_additive: bool = False

    @model_validator(mode="after")
    def _values(self) -> SetActions:
        for name, parse in (
            ("community", parse_community),
            ("large_community", parse_large_community),
            ("ext_community", parse_ext_community),
        ):
            for v in getattr(self, name) or ():
                parse(v)  # raises naming the value
        nh = self.next_hop
        if nh is not None and nh not in ("self", "peer-address"):
            try:
                ipaddress.ip_address(nh)
            except ValueError:
                raise ValueError(f"next_hop {nh!r}: an address, 'self' or 'peer-address'") from None
        return self

    def empty(self) -> bool:
        return self == SetActions()


class RouteMapEntry(_Strict):
    seq: int | None = Field(default=None, ge=1)
    action: Verdict
    match: Match = Field(default_factory=Match)
    set: SetActions = Field(default_factory=SetActions)

    @model_validator(mode="after")
    def _deny_sets_nothing(self) -> RouteMapEntry:
        if self.action == "deny" and not self.set.empty():
            raise ValueError("a deny entry refuses the route: its 'set' would never apply")
        return self


class RouteMap(_Strict):
    entries: list[RouteMapEntry] = Field(min_length=1)


class Policy(_Strict):
    prefix_lists: dict[str, PrefixList] = Field(default_factory=dict)
    as_path_lists: dict[str, AsPathList] = Field(default_factory=dict)
    community_lists: dict[str, CommunityList] = Field(default_factory=dict)
    large_community_lists: dict[str, CommunityList] = Field(default_factory=dict)
    ext_community_lists: dict[str, CommunityList] = Field(default_factory=dict)
    route_maps: dict[str, RouteMap] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Policy:
        for kind, lists in (
            ("standard", self.community_lists),
            ("large", self.large_community_lists),
            ("extended", self.ext_community_lists),
        ):
            for name, cl in lists.items():
                try:
                    CompiledCommunityList(cl, kind)
                except ValueError as err:
                    raise ValueError(f"{kind} community list {name!r}: {err}") from None
        for rm_name, rm in self.route_maps.items():
            for i, e in enumerate(rm.entries):
                refs = (
                    (e.match.prefix_list, self.prefix_lists, "prefix_lists"),
                    (e.match.next_hop, self.prefix_lists, "prefix_lists"),
                    (e.match.as_path, self.as_path_lists, "as_path_lists"),
                    (e.match.community, self.community_lists, "community_lists"),
                    (e.set.community_delete, self.community_lists, "community_lists"),
                    (e.match.large_community, self.large_community_lists, "large_community_lists"),
                    (e.set.large_community_delete, self.large_community_lists, "large_community_lists"),
                    (e.match.ext_community, self.ext_community_lists, "ext_community_lists"),
                )
                for ref, table, where in refs:
                    if ref is not None and ref not in table:
                        raise ValueError(f"route_maps.{rm_name}.entries[{i}]: no {where} entry named {ref!r}")
        return self


def _key_address(key: bytes, afi: int, add_path: bool) -> tuple[int, int, int]:
    """(IP version, address as an int, prefix length) of a wire key."""
    body = prefix_part(key, add_path)
    width = 4 if afi == C.AFI_IPV4 else 16
    return (4 if width == 4 else 6), int.from_bytes(body[1:].ljust(width, b"\x00"), "big"), body[0]


class RouteMapEngine:
    """One route map, compiled against its policy's lists."""

    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        rm = policy.route_maps[name]
        prefix = {n: pl.compiled() for n, pl in policy.prefix_lists.items()}
        paths = {n: al.compiled() for n, al in policy.as_path_lists.items()}
        comm = {n: CompiledCommunityList(cl, "standard") for n, cl in policy.community_lists.items()}
        large = {n: CompiledCommunityList(cl, "large") for n, cl in policy.large_community_lists.items()}
        ext = {n: CompiledCommunityList(cl, "extended") for n, cl in policy.ext_community_lists.items()}
        order = sorted(((e.seq if e.seq is not None else 10 * (i + 1)), i, e) for i, e in enumerate(rm.entries))
        self.entries: list[_Entry] = []
        for _seq, _i, e in order:
            m = e.match
            self.entries.append(
                _Entry(
                    permit=e.action == "permit",
                    sets=e.set,
                    prefix_list=prefix[m.prefix_list] if m.prefix_list else None,
                    next_hop=prefix[m.next_hop] if m.next_hop else None,
                    as_path=paths[m.as_path] if m.as_path else None,
                    community=comm[m.community] if m.community else None,
                    large=large[m.large_community] if m.large_community else None,
                    ext=ext[m.ext_community] if m.ext_community else None,
                    origin=ORIGINS[m.origin] if m.origin else None,
                    med=m.med,
                    delete_comm=comm[e.set.community_delete] if e.set.community_delete else None,
                    delete_large=large[e.set.large_community_delete] if e.set.large_community_delete else None,
                )
            )

    def apply(
        self,
        family: Family,
        keys: list[bytes],
        attrs: PathAttributes,
        ctx: CodecContext,
        *,
        add_path: bool = False,
        peer_address: str | None = None,
        self_next_hop: str | None = None,
        prepend_after: int = 0,
    ) -> tuple[list[bytes], dict[PathAttributes, list[bytes]]]:
        """(keys refused, accepted keys grouped by their attributes after the set actions).
        `prepend_after`: ASes an AS-path prepend goes behind (export to eBGP: our own, which
        the path already starts with, as FRR adds it after its outbound route map)."""
        afi = family[0]
        # what depends on the attributes alone, once per entry: None (fails), or True
        attr_ok = [e.attributes_match(attrs) for e in self.entries]
        rewritten: dict[int, PathAttributes] = {}
        denied: list[bytes] = []
        accepted: dict[PathAttributes, list[bytes]] = {}
        for key in keys:
            version, address, length = _key_address(key, afi, add_path)
            for i, e in enumerate(self.entries):
                if not attr_ok[i] or (
                    e.prefix_list is not None and not e.prefix_list.permits(version, address, length)
                ):
                    continue
                if not e.permit:
                    denied.append(key)
                    break
                pa = rewritten.get(i)
                if pa is None:
                    pa = rewritten[i] = e.rewrite(attrs, family, ctx, peer_address, self_next_hop, prepend_after)
                accepted.setdefault(pa, []).append(key)
                break
            else:
                denied.append(key)
        return denied, accepted


@dataclass(slots=True)
class _Entry:
    permit: bool
    sets: SetActions
    prefix_list: CompiledPrefixList | None
    next_hop: CompiledPrefixList | None
    as_path: list[tuple[re.Pattern[str], bool]] | None
    community: CompiledCommunityList | None
    large: CompiledCommunityList | None
    ext: CompiledCommunityList | None
    origin: int | None
    med: int | None
    delete_comm: CompiledCommunityList | None
    delete_large: CompiledCommunityList | None

    def attributes_match(self, pa: PathAttributes) -> bool:
        if self.origin is not None and pa.origin != self.origin:
            return False
        if self.med is not None and pa.med != self.med:
            return False
        if self.as_path is not None and not _as_path_permits(self.as_path, as_path_text(pa.as_path)):
            return False
        if self.community is not None and not self.community.permits(pa.get(C.ATTR_COMMUNITIES, ())):
            return False
        if self.large is not None and not self.large.permits(pa.get(C.ATTR_LARGE_COMMUNITIES, ())):
            return False
        if self.ext is not None and not self.ext.permits(pa.get(C.ATTR_EXTENDED_COMMUNITIES, ())):
            return False
        if self.next_hop is not None:
            nh = pa.get(MP_NEXT_HOP) or pa.next_hop
            if nh is None:
                return False
            ip = ipaddress.ip_address(nh)
            if not self.next_hop.permits(ip.version, int(ip), ip.max_prefixlen):
                return False
        return True

    def rewrite(
        self,
        pa: PathAttributes,
        family: Family,
        ctx: CodecContext,
        peer_address: str | None,
        self_next_hop: str | None,
        prepend_after: int = 0,
    ) -> PathAttributes:
        s: SetActions = self.sets
        if s.empty() and self.delete_comm is None and self.delete_large is None:
            return pa
        attrs = {a.type_code: a for a in pa.attrs if a.type_code != MP_NEXT_HOP}
        mp_nh: str | None = pa.get(MP_NEXT_HOP)
        if s.local_preference is not None:
            attrs[C.ATTR_LOCAL_PREF] = Attribute(C.FLAG_TRANSITIVE, C.ATTR_LOCAL_PREF, s.local_preference)
        if s.med is not None:
            attrs[C.ATTR_MED] = Attribute(C.FLAG_OPTIONAL, C.ATTR_MED, s.med)
        if s.next_hop is not None:
            nh = {"self": self_next_hop, "peer-address": peer_address}.get(s.next_hop, s.next_hop)
            if nh is not None:
                if family == C.IPV4_UNICAST and mp_nh is None:
                    attrs[C.ATTR_NEXT_HOP] = Attribute(C.FLAG_TRANSITIVE, C.ATTR_NEXT_HOP, nh)
                else:
                    mp_nh = nh
        if s.as_path_prepend:
            old = attrs.get(C.ATTR_AS_PATH)
            segs = tuple(old.value) if old is not None else ()
            pre = tuple(s.as_path_prepend)
            if segs and segs[0][0] == C.AS_SEQUENCE and len(segs[0][1]) + len(pre) <= 255:
                first = tuple(segs[0][1])
                k = min(prepend_after, len(first))
                segs = ((C.AS_SEQUENCE, first[:k] + pre + first[k:]), *segs[1:])
            else:
                segs = ((C.AS_SEQUENCE, pre), *segs)
            attrs[C.ATTR_AS_PATH] = Attribute(C.FLAG_TRANSITIVE, C.ATTR_AS_PATH, segs)
        _set_values(attrs, C.ATTR_COMMUNITIES, s.community, s.community_additive, self.delete_comm, parse_community)
        _set_values(
            attrs,
            C.ATTR_LARGE_COMMUNITIES,
            s.large_community,
            s.large_community_additive,
            self.delete_large,
            parse_large_community,
        )
        _set_values(
            attrs, C.ATTR_EXTENDED_COMMUNITIES, s.ext_community, s.ext_community_additive, None, parse_ext_community
        )
        out = PathAttributes.build(sorted(attrs.values(), key=lambda a: a.type_code), ctx)
        if mp_nh is not None:
            fam = socket.AF_INET6 if ":" in mp_nh else socket.AF_INET
            out = with_mp_next_hop(out, socket.inet_pton(fam, mp_nh), ctx)
        return out


def _as_path_permits(rows: list[tuple[re.Pattern[str], bool]], text: str) -> bool:
    for pattern, permit in rows:
        if pattern.search(text):
            return permit
    return False


def _set_values(
    attrs: dict[int, Attribute],
    code: int,
    values: list[str] | None,
    additive: bool,
    delete: CompiledCommunityList | None,
    parse: Any,
) -> None:
    """Replace, add to or delete from one community attribute (sorted, without repeats)."""
    if values is None and delete is None:
        return
    old = attrs.get(code)
    have: tuple[Any, ...] = tuple(old.value) if old is not None else ()
    if delete is not None:
        gone = delete.matching(have)
        have = tuple(v for v in have if v not in gone)
    if values is not None:
        new = tuple(parse(v) for v in values)
        have = have + new if additive else new
    result = tuple(sorted(set(have)))
    if result:
        attrs[code] = Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, code, result)
    else:
        attrs.pop(code, None)

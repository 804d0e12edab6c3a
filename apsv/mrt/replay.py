"""Loading real BGP data into Adj-RIB-Ins and a Loc-RIB: RIB dumps and update streams.

`load_rib_dump` builds a collector's view from a TABLE_DUMP / TABLE_DUMP_V2 file (one
Adj-RIB-In per peer, one Loc-RIB per family, each prefix decided once after all its paths
are in). `replay_updates` applies an update dump, message by message and in order, to the
same structure, which is what a speaker peering with every recorded peer would hold.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apsv.bgp import constants as C
from apsv.bgp.attributes import decode_attributes
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action, BgpError
from apsv.bgp.message import Update
from apsv.bgp.path_attributes import Interner, PathAttributes, interner_for, with_mp_next_hop
from apsv.bgp.rib import AdjRibIn, LocRib, Source
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord, MrtError, Peer, RibRecord
from apsv.mrt.sessions import RecordedSessions

Family = tuple[int, int]
DECIDED = frozenset({C.IPV4_UNICAST, C.IPV6_UNICAST, (1, 2), (2, 2)})
_ASN4_CTX = CodecContext(asn4=True)
_ASN2_CTX = CodecContext(asn4=False)


@dataclass
class CollectorView:
    """Adj-RIB-Ins per (peer, family) feeding one Loc-RIB per family."""

    local_as: int
    loc_rib: dict[Family, LocRib] = field(default_factory=dict)
    adj_in: dict[tuple[str, int, Family, bool], AdjRibIn] = field(default_factory=dict)
    sources: dict[tuple[str, int], Source] = field(default_factory=dict)
    paths: int = 0  # paths inserted (RIB entries, or announced prefixes)
    withdrawals: int = 0
    skipped: int = 0  # paths RFC 7606 made unusable (treat-as-withdraw) or of undecoded families
    errors: int = 0
    seconds: float = 0.0
    _ribs: dict[Source, dict[tuple[Family, bool], AdjRibIn]] = field(default_factory=dict, repr=False)

    def source(self, ip: str, asn: int, bgp_id: str = "0.0.0.0") -> Source:
        key = (ip, asn)
        src = self.sources.get(key)
        if src is None:
            src = self.sources[key] = Source(f"{ip}/AS{asn}", asn, self.local_as, bgp_id, ip)
        return src

    def rib(self, src: Source, fam: Family, add_path: bool = False) -> AdjRibIn:
        by_src = self._ribs.get(src)  # sources are unique objects: identity lookups are cheap
        if by_src is None:
            by_src = self._ribs[src] = {}
        rib = by_src.get((fam, add_path))
        if rib is None:
            rib = by_src[(fam, add_path)] = AdjRibIn(src, fam, add_path)
            self.adj_in[(src.peer_ip, src.peer_as, fam, add_path)] = rib
            loc = self.loc_rib.get(fam)
            if loc is None:
                loc = self.loc_rib[fam] = LocRib(fam)
            loc.add_source(rib)
        return rib

    def prefixes(self) -> int:
        return sum(len(r) for r in self.loc_rib.values())


def load_rib_dump(path: str | Path, *, local_as: int = 65535) -> CollectorView:
    """A collector's RIB dump as Adj-RIB-Ins and Loc-RIBs (RFC 4271 §9.1 best path per prefix)."""
    view = CollectorView(local_as)
    ctxs: dict[tuple[bool, bool], tuple[CodecContext, Interner]] = {}
    t0 = time.perf_counter()
    with MrtReader(path) as reader:
        for item in reader:
            if isinstance(item, MrtError):
                view.errors += 1
                continue
            if not isinstance(item, RibRecord):
                continue
            fam = (item.afi, item.safi)
            if item.generic or fam not in DECIDED:
                view.skipped += len(item.entries)
                continue
            paths: list[tuple[AdjRibIn, bytes, PathAttributes]] = []
            for e in item.entries:
                peer = e.peer or Peer("0.0.0.0", "0.0.0.0", 0)
                src = view.source(peer.ip, peer.asn, peer.bgp_id)
                ck = (item.asn4, src.ibgp)
                got = ctxs.get(ck)
                if got is None:
                    ctx = CodecContext(asn4=item.asn4, ibgp=src.ibgp, rib_dump=True)
                    got = ctxs[ck] = (ctx, interner_for(ctx))
                ctx, interner = got
                try:
                    parsed = decode_attributes(e.attributes, 0, len(e.attributes), ctx, interner)
                except BgpError:
                    view.errors += 1
                    continue
                if parsed.action is Action.TREAT_AS_WITHDRAW:
                    view.skipped += 1
                    continue
                pa = parsed.attributes
                nh = e.next_hop if e.next_hop is not None else (parsed.mp_reach.next_hop if parsed.mp_reach else None)
                if nh is not None and (fam[0] == C.AFI_IPV6 or pa.next_hop is None):
                    pa = with_mp_next_hop(pa, nh, ctx)
                key = item.prefix if e.path_id is None else e.path_id.to_bytes(4, "big") + item.prefix
                paths.append((view.rib(src, fam, e.path_id is not None), key, pa))
            if paths:
                view.paths += len(paths)
                view.loc_rib[fam].load(item.prefix, paths)
    view.seconds = time.perf_counter() - t0
    return view


def _recorded_updates(path: str | Path, errors: list[int]) -> Iterator[tuple[BgpMessageRecord, Update]]:
    """Every UPDATE a peer sent in a dump, decoded; undecodable records are counted in errors[0]."""
    sessions = RecordedSessions()
    with MrtReader(path) as reader:
        for item in reader:
            if isinstance(item, MrtError):
                errors[0] += 1
                continue
            if not isinstance(item, BgpMessageRecord) or item.msg_type != C.MSG_UPDATE or item.local:
                continue
            try:
                m = sessions.decode(item)
            except BgpError:
                errors[0] += 1
                continue
            assert isinstance(m, Update)
            yield item, m


def replay_updates(path: str | Path, *, local_as: int = 65535) -> CollectorView:
    """Apply every UPDATE of an update dump, in order, to one Adj-RIB-In per recorded peer."""
    view = CollectorView(local_as)
    errors = [0]
    t0 = time.perf_counter()
    for item, m in _recorded_updates(path, errors):
        apply_update(view, view.source(item.peer_ip, item.peer_as), m, item.asn4)
    view.errors = errors[0]
    view.seconds = time.perf_counter() - t0
    return view


def apply_update(view: CollectorView, src: Source, m: Update, asn4: bool = True) -> None:
    """RFC 4271 §9 processing of one decoded UPDATE from `src` (with RFC 7606 outcomes)."""
    withdraw_all = m.action is Action.TREAT_AS_WITHDRAW or m.attributes is None
    if m.withdrawn:
        view.withdrawals += len(m.withdrawn)
        rib = view.rib(src, C.IPV4_UNICAST)
        view.loc_rib[C.IPV4_UNICAST].withdraw(rib, m.withdrawn)
    if m.nlri:
        rib = view.rib(src, C.IPV4_UNICAST)
        if withdraw_all:
            view.skipped += len(m.nlri)
            view.loc_rib[C.IPV4_UNICAST].withdraw(rib, m.nlri)
        else:
            assert m.attributes is not None
            view.paths += len(m.nlri)
            view.loc_rib[C.IPV4_UNICAST].update(rib, m.nlri, m.attributes)
    mu = m.mp_unreach
    if mu is not None and mu.withdrawn:
        fam = (mu.afi, mu.safi)
        view.withdrawals += len(mu.withdrawn)
        rib = view.rib(src, fam)
        view.loc_rib[fam].withdraw(rib, mu.withdrawn)
    mr = m.mp_reach
    if mr is not None and mr.nlri:
        fam = (mr.afi, mr.safi)
        rib = view.rib(src, fam)
        if withdraw_all:
            view.skipped += len(mr.nlri)
            view.loc_rib[fam].withdraw(rib, mr.nlri)
        else:
            assert m.attributes is not None
            pa = with_mp_next_hop(m.attributes, mr.next_hop, _ASN4_CTX if asn4 else _ASN2_CTX)
            view.paths += len(mr.nlri)
            view.loc_rib[fam].update(rib, mr.nlri, pa)


def replay_updates_per_session(path: str | Path, *, local_as: int = 65535) -> dict[tuple[str, int], CollectorView]:
    """Like `replay_updates`, but each recorded peer gets its own Loc-RIB - one BGP session each,
    which is how APSV's stack instances hold them (a session's Loc-RIB is fed by that session)."""
    views: dict[tuple[str, int], CollectorView] = {}
    errors = [0]
    for item, m in _recorded_updates(path, errors):
        key = (item.peer_ip, item.peer_as)
        view = views.get(key)
        if view is None:
            view = views[key] = CollectorView(local_as)
        apply_update(view, view.source(item.peer_ip, item.peer_as), m, item.asn4)
    return views

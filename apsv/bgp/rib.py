"""Adj-RIB-In and Loc-RIB with the RFC 4271 §9.1 decision process.

Storage is lean on purpose: an Adj-RIB-In maps a prefix's wire key to the interned
`PathAttributes` it was learned with (a pointer, no per-route object); the Loc-RIB maps the
prefix to the Adj-RIB-In that currently holds the best path. Changes in the best path come out
as `BestPathChange` events: the FIB deltas a virtual router installs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from apsv.bgp.nlri import PATH_ID_LEN, prefix_str
from apsv.bgp.path_attributes import PathAttributes

Family = tuple[int, int]


@dataclass(slots=True, eq=False)
class Source:
    """Where paths come from: one BGP peer as the decision process sees it."""

    name: str
    peer_as: int
    local_as: int
    router_id: str = "0.0.0.0"
    peer_ip: str = "0.0.0.0"
    igp_cost: int = 0  # interior cost to this peer's next hops (9.1.2.2 e); APSV has no IGP
    default_local_pref: int = 100  # degree of preference for eBGP routes (9.1.1 local policy)
    # Comparison keys, computed once.
    router_id_key: int = 0
    peer_ip_key: tuple[int, int] = (0, 0)
    ibgp: bool = False
    pref_key: int = 0  # premed_key's preference part for routes without an honoured LOCAL_PREF
    tie_key: tuple[bool, int, int, int, tuple[int, int]] = (False, 0, 0, 0, (0, 0))  # 9.1.2.2 d-g

    def __post_init__(self) -> None:
        self.router_id_key = int(ipaddress.ip_address(self.router_id))
        ip = ipaddress.ip_address(self.peer_ip)
        self.peer_ip_key = (ip.version, int(ip))
        self.ibgp = self.peer_as == self.local_as
        self.pref_key = (0xFFFFFFFF - self.default_local_pref) << 40
        self.tie_key = (self.ibgp, self.igp_cost, 0, self.router_id_key, self.peer_ip_key)

    def set_router_id(self, router_id: str) -> None:
        self.router_id = router_id
        self.__post_init__()


class BestPathChange(NamedTuple):
    """The best path to a prefix changed; `attributes` is None when the prefix is gone."""

    afi: int
    safi: int
    prefix: bytes  # wire form without path id
    attributes: PathAttributes | None
    source: Source | None

    def describe(self) -> str:
        p = prefix_str(self.prefix, self.afi)
        if self.attributes is None:
            return f"withdraw {p}"
        return f"best {p} via {self.attributes.next_hop} from {self.source.name if self.source else '?'}"


class PrefixLimitExceeded(Exception):
    def __init__(self, limit: int, family: Family = (1, 1), received: int = 0) -> None:
        self.limit = limit
        self.family = family
        self.received = received  # what the table would have held
        super().__init__(f"{received} prefixes, more than {limit}")


class AdjRibIn:
    """Routes learned from one source for one family, keyed by wire prefix (path id first under ADD-PATH)."""

    __slots__ = ("add_path", "afi", "by_prefix", "max_prefixes", "routes", "safi", "source")

    def __init__(self, source: Source, family: Family, add_path: bool = False, max_prefixes: int | None = None):
        self.source = source
        self.afi, self.safi = family
        self.add_path = add_path
        self.routes: dict[bytes, PathAttributes] = {}
        # Under ADD-PATH several keys share a prefix: prefix -> {full key, ...}
        self.by_prefix: dict[bytes, set[bytes]] | None = {} if add_path else None
        self.max_prefixes = max_prefixes

    def __len__(self) -> int:
        return len(self.routes)

    def paths(self, prefix: bytes) -> Iterator[tuple[PathAttributes, int]]:
        """(attributes, path id) of every path to `prefix` held here."""
        if self.by_prefix is None:
            a = self.routes.get(prefix)
            if a is not None:
                yield a, 0
            return
        for key in self.by_prefix.get(prefix, ()):
            yield self.routes[key], int.from_bytes(key[:PATH_ID_LEN], "big")


# A candidate path: (attributes, the Adj-RIB-In holding it, ADD-PATH path id or 0). A plain
# tuple: the decision builds many of them.
Cand = tuple[PathAttributes, AdjRibIn, int]
_tuple_new = tuple.__new__


def premed_key(attrs: PathAttributes, src: Source) -> int:
    """The total-order part of the decision as one integer, lower is better: 9.1.1 degree of
    preference, then 9.1.2.2 a) AS_PATH length and b) ORIGIN (`attrs.rank` holds those two)."""
    lp = attrs.local_pref
    if lp is not None and src.ibgp:
        return ((0xFFFFFFFF - lp) << 40) | attrs.rank
    return src.pref_key | attrs.rank


def _neighbor_as(c: Cand) -> int:
    n = c[0].neighbor_as
    return c[1].source.local_as if n is None else n


def select_best(cands: list[Cand]) -> Cand:
    """RFC 4271 §9.1.2.2 (with RFC 4456 §9 for route reflection): eliminate, step by step."""
    if len(cands) == 1:
        return cands[0]
    # 9.1.1 degree of preference, a) fewest AS numbers (a set counts one), b) lowest ORIGIN.
    low = -1
    s: list[Cand] = []
    for c in cands:
        k = premed_key(c[0], c[1].source)
        if low < 0 or k < low:
            low = k
            s = [c]
        elif k == low:
            s.append(c)
    if len(s) == 1:
        return s[0]
    # c) lowest MED among routes from the same neighbouring AS (a missing MED counts as 0).
    has_med = False
    for c in s:
        if c[0].med:
            has_med = True
            break
    if has_med:
        best_med: dict[int, int] = {}
        for c in s:
            n = _neighbor_as(c)
            med = c[0].med or 0
            if n not in best_med or med < best_med[n]:
                best_med[n] = med
        s = [c for c in s if (c[0].med or 0) == best_med[_neighbor_as(c)]]
    # d) eBGP over iBGP; e) lowest interior cost; RFC 4456 §9 shortest CLUSTER_LIST;
    # f) lowest BGP Identifier (ORIGINATOR_ID in its place when present); g) lowest peer address;
    # then the lowest ADD-PATH path identifier. From here on every step is a total order.
    return min(s, key=_post_med_key)


def _post_med_key(c: Cand) -> tuple[bool, int, int, int, tuple[int, int], int]:
    a, rib, path_id = c
    src = rib.source
    if a.originator_id is None and not a.cluster_len:
        return (*src.tie_key, path_id)  # no route reflection attributes: all from the source
    rid = int(ipaddress.IPv4Address(a.originator_id)) if a.originator_id else src.router_id_key
    return (src.ibgp, src.igp_cost, a.cluster_len, rid, src.peer_ip_key, path_id)


class LocRib:
    """The best path per prefix of one family, across every Adj-RIB-In that feeds it.

    `best` maps a prefix to the Adj-RIB-In holding its best path (with the full key under
    ADD-PATH). With more than one source, `holders` lists, per prefix, the Adj-RIB-Ins that
    have a path to it, so a decision looks only at those. Most changes are settled without a
    full decision: a path strictly better than the best before MED comparison (9.1.2.2 c) wins
    outright, and one strictly worse - replacing a path that was strictly worse too - changes
    nothing; only ties there need the whole elimination, whose MED step is not transitive.
    """

    __slots__ = ("afi", "best", "changes", "holders", "safi", "sources")

    def __init__(self, family: Family):
        self.afi, self.safi = family
        self.sources: list[AdjRibIn] = []
        self.best: dict[bytes, AdjRibIn | tuple[AdjRibIn, bytes]] = {}
        self.holders: dict[bytes, list[AdjRibIn]] | None = None
        self.changes = 0

    def __len__(self) -> int:
        return len(self.best)

    # -- sources ---------------------------------------------------------------------------

    def add_source(self, rib: AdjRibIn) -> None:
        if (rib.afi, rib.safi) != (self.afi, self.safi):
            raise ValueError("Adj-RIB-In family differs from the Loc-RIB's")
        if rib in self.sources:
            return
        self.sources.append(rib)
        if len(self.sources) == 2 and self.holders is None:
            self.holders = {}
            first = self.sources[0]
            for p in _prefixes_of(first):
                self.holders[p] = [first]
        if self.holders is not None:
            for p in _prefixes_of(rib):
                self.holders.setdefault(p, []).append(rib)

    def remove_source(self, rib: AdjRibIn) -> list[BestPathChange]:
        """Forget a source (its session went down): the prefixes it held are decided again."""
        prefixes = list(_prefixes_of(rib))
        prevs = {p: self._best_attrs(p) for p in prefixes}
        self.sources.remove(rib)
        if self.holders is not None:
            for p in prefixes:
                hl = self.holders.get(p)
                if hl is not None and rib in hl:
                    hl.remove(rib)
                    if not hl:
                        del self.holders[p]
        if len(self.sources) <= 1:
            self.holders = None
        out = []
        for p in prefixes:
            ch = self._decide(p, prevs[p])
            if ch is not None:
                out.append(ch)
        return out

    # -- queries -----------------------------------------------------------------------------

    def _best_attrs(self, prefix: bytes) -> PathAttributes | None:
        b = self.best.get(prefix)
        if b is None:
            return None
        if isinstance(b, AdjRibIn):
            return b.routes.get(prefix)
        return b[0].routes.get(b[1])

    def best_path(self, prefix: bytes) -> tuple[PathAttributes, AdjRibIn] | None:
        b = self.best.get(prefix)
        if b is None:
            return None
        if isinstance(b, AdjRibIn):
            return b.routes[prefix], b
        return b[0].routes[b[1]], b[0]

    def items(self) -> Iterator[tuple[bytes, PathAttributes, AdjRibIn]]:
        for prefix in self.best:
            bp = self.best_path(prefix)
            assert bp is not None
            yield prefix, bp[0], bp[1]

    def table(self) -> list[tuple[str, str | None, str]]:
        """(prefix, next hop, source) rows, sorted: a comparable picture of the Loc-RIB."""
        return sorted((prefix_str(p, self.afi), a.next_hop, r.source.name) for p, a, r in self.items())

    # -- the decision ----------------------------------------------------------------------

    def _candidates(self, prefix: bytes) -> list[Cand]:
        cands: list[Cand] = []
        ribs = self.sources if self.holders is None else self.holders.get(prefix, ())
        for rib in ribs:
            if rib.by_prefix is None:
                a = rib.routes.get(prefix)
                if a is not None:
                    cands.append((a, rib, 0))
            else:
                for key in rib.by_prefix.get(prefix, ()):
                    cands.append((rib.routes[key], rib, int.from_bytes(key[:PATH_ID_LEN], "big")))
        return cands

    def _decide(self, prefix: bytes, prev: PathAttributes | None) -> BestPathChange | None:
        """Run the full decision for `prefix`; `prev` is the best path's attributes before the change."""
        # One pass over the holders keeps only the paths tied on the total-order part of the
        # decision (select_best's first step); usually one path is left and nothing else runs.
        low = -1
        best: Cand | None = None
        ties: list[Cand] | None = None
        ribs = self.sources if self.holders is None else self.holders.get(prefix, ())
        for rib in ribs:
            if rib.by_prefix is None:
                a = rib.routes.get(prefix)
                if a is None:
                    continue
                k = premed_key(a, rib.source)
                if low < 0 or k < low:
                    low, best, ties = k, (a, rib, 0), None
                elif k == low:
                    if ties is None:
                        assert best is not None
                        ties = [best]
                    ties.append((a, rib, 0))
            else:
                for key in rib.by_prefix.get(prefix, ()):
                    a = rib.routes[key]
                    c = (a, rib, int.from_bytes(key[:PATH_ID_LEN], "big"))
                    k = premed_key(a, rib.source)
                    if low < 0 or k < low:
                        low, best, ties = k, c, None
                    elif k == low:
                        if ties is None:
                            assert best is not None
                            ties = [best]
                        ties.append(c)
        old = self.best.get(prefix)
        if best is None:
            if old is None:
                return None
            del self.best[prefix]
            self.changes += 1
            return _tuple_new(BestPathChange, (self.afi, self.safi, prefix, None, None))
        w_attrs, w_rib, w_id = select_best(ties) if ties is not None else best
        new: AdjRibIn | tuple[AdjRibIn, bytes]
        new = w_rib if w_rib.by_prefix is None else (w_rib, w_id.to_bytes(PATH_ID_LEN, "big") + prefix)
        self.best[prefix] = new
        if old is not None and (old is new or old == new) and prev is w_attrs:
            return None
        self.changes += 1
        return _tuple_new(BestPathChange, (self.afi, self.safi, prefix, w_attrs, w_rib.source))

    def reselect(self, prefixes: Iterable[bytes]) -> list[BestPathChange]:
        out = []
        for p in prefixes:
            ch = self._decide(p, self._best_attrs(p))
            if ch is not None:
                out.append(ch)
        return out

    # -- changes -----------------------------------------------------------------------------

    def update(self, rib: AdjRibIn, keys: list[bytes], attrs: PathAttributes) -> list[BestPathChange]:
        """Learn `keys` (wire form) from `rib` with `attrs`; return the best-path changes."""
        routes = rib.routes
        limit = rib.max_prefixes
        if limit is not None and len(routes) + len(keys) > limit:
            would = len(routes) + sum(k not in routes for k in keys)
            if would > limit:
                raise PrefixLimitExceeded(limit, (rib.afi, rib.safi), would)
        if rib.by_prefix is not None:
            return self._update_add_path(rib, keys, attrs)
        out: list[BestPathChange] = []
        best = self.best
        holders = self.holders
        afi, safi, src = self.afi, self.safi, rib.source
        for k in keys:
            old = routes.get(k)
            if old is attrs:
                continue  # the same path again: nothing changes
            routes[k] = attrs
            if holders is None:
                best[k] = rib
                self.changes += 1
                out.append(_tuple_new(BestPathChange, (afi, safi, k, attrs, src)))
                continue
            hl = holders.get(k)
            if hl is None:
                holders[k] = [rib]
                best[k] = rib
                self.changes += 1
                out.append(_tuple_new(BestPathChange, (afi, safi, k, attrs, src)))
                continue
            if old is None:
                hl.append(rib)
            cur = best[k]
            nk = premed_key(attrs, src)
            if cur is rib:
                if nk < premed_key(old, src):  # type: ignore[arg-type]
                    self.changes += 1  # the best got strictly better: it stays best
                    out.append(_tuple_new(BestPathChange, (afi, safi, k, attrs, src)))
                    continue
                ch = self._decide(k, old)
            else:
                cur_rib = cur if isinstance(cur, AdjRibIn) else cur[0]
                cur_attrs = cur_rib.routes[k] if isinstance(cur, AdjRibIn) else cur[0].routes[cur[1]]
                bk = premed_key(cur_attrs, cur_rib.source)
                if nk > bk and (old is None or premed_key(old, src) > bk):
                    continue
                if nk < bk:
                    best[k] = rib
                    self.changes += 1
                    out.append(_tuple_new(BestPathChange, (afi, safi, k, attrs, src)))
                    continue
                ch = self._decide(k, cur_attrs)
            if ch is not None:
                out.append(ch)
        return out

    def withdraw(self, rib: AdjRibIn, keys: list[bytes]) -> list[BestPathChange]:
        """Forget `keys` learned from `rib`; withdrawing what was never announced is not an error."""
        if rib.by_prefix is not None:
            return self._withdraw_add_path(rib, keys)
        routes = rib.routes
        out: list[BestPathChange] = []
        best = self.best
        holders = self.holders
        for k in keys:
            old = routes.pop(k, None)
            if old is None:
                continue
            if holders is None:
                if best.pop(k, None) is not None:
                    self.changes += 1
                    out.append(_tuple_new(BestPathChange, (self.afi, self.safi, k, None, None)))
                continue
            hl = holders[k]
            hl.remove(rib)
            if not hl:
                del holders[k]
                del best[k]
                self.changes += 1
                out.append(_tuple_new(BestPathChange, (self.afi, self.safi, k, None, None)))
                continue
            cur = best[k]
            if cur is rib:
                ch = self._decide(k, old)
            else:
                cur_rib = cur if isinstance(cur, AdjRibIn) else cur[0]
                cur_attrs = cur_rib.routes[k] if isinstance(cur, AdjRibIn) else cur[0].routes[cur[1]]
                if premed_key(old, rib.source) > premed_key(cur_attrs, cur_rib.source):
                    continue
                ch = self._decide(k, cur_attrs)
            if ch is not None:
                out.append(ch)
        return out

    def _update_add_path(self, rib: AdjRibIn, keys: list[bytes], attrs: PathAttributes) -> list[BestPathChange]:
        out: list[BestPathChange] = []
        bp = rib.by_prefix
        assert bp is not None
        for k in keys:
            p = k[PATH_ID_LEN:]
            prev = self._best_attrs(p)
            rib.routes[k] = attrs
            s = bp.get(p)
            if s is None:
                bp[p] = {k}
                if self.holders is not None:
                    self.holders.setdefault(p, []).append(rib)
            else:
                s.add(k)
            ch = self._decide(p, prev)
            if ch is not None:
                out.append(ch)
        return out

    def _withdraw_add_path(self, rib: AdjRibIn, keys: list[bytes]) -> list[BestPathChange]:
        out: list[BestPathChange] = []
        bp = rib.by_prefix
        assert bp is not None
        for k in keys:
            p = k[PATH_ID_LEN:]
            prev = self._best_attrs(p)
            if rib.routes.pop(k, None) is None:
                continue
            s = bp.get(p)
            if s is not None:
                s.discard(k)
                if not s:
                    del bp[p]
                    if self.holders is not None:
                        hl = self.holders.get(p)
                        if hl is not None:
                            hl.remove(rib)
                            if not hl:
                                del self.holders[p]
            ch = self._decide(p, prev)
            if ch is not None:
                out.append(ch)
        return out

    def load(self, prefix: bytes, paths: Iterable[tuple[AdjRibIn, bytes, PathAttributes]]) -> BestPathChange | None:
        """Bulk insert every path to one prefix (a RIB dump record), then decide once."""
        prev = self._best_attrs(prefix)
        holders = self.holders
        for rib, key, attrs in paths:
            had = rib.routes.get(key) is not None if rib.by_prefix is None else prefix in rib.by_prefix
            rib.routes[key] = attrs
            if rib.by_prefix is not None:
                rib.by_prefix.setdefault(prefix, set()).add(key)
            if holders is not None and not had:
                holders.setdefault(prefix, []).append(rib)
        return self._decide(prefix, prev)


def _prefixes_of(rib: AdjRibIn) -> Iterable[bytes]:
    return rib.by_prefix.keys() if rib.by_prefix is not None else rib.routes.keys()

"""What the virtual router and the runtime read of a session: its Loc-RIB as rows, a digest of
its RIBs, and its statistics."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from apsv.bgp import constants as C
from apsv.bgp.events import next_hop_of
from apsv.bgp.nlri import prefix_str
from apsv.bgp.policy_lists import as_path_text, community_text, large_community_text
from apsv.bgp.session.common import Family

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def route_rows(s: BgpSession, family: Family) -> list[tuple[Any, ...]]:
    """The Loc-RIB with each route's attributes, sorted by prefix: (prefix, next hop, origin,
    AS path text, MED, local preference, communities, large communities, stale)."""
    rib = s.loc_rib.get(family)
    if rib is None:
        return []
    rows = []
    for key, a, src in rib.items():
        rows.append(
            (
                prefix_str(key, family[0], src.add_path),
                next_hop_of(a),
                C.ORIGIN_NAMES.get(a.origin, "") if a.origin is not None else "",
                as_path_text(a.as_path),
                a.med,
                a.local_pref,
                " ".join(community_text(c) for c in a.get(C.ATTR_COMMUNITIES, ())),
                " ".join(large_community_text(c) for c in a.get(C.ATTR_LARGE_COMMUNITIES, ())),
                s.stale.is_stale(family, key),
            )
        )
    return sorted(rows)


def rib_digest(s: BgpSession) -> str:
    """SHA-256 over every Loc-RIB row (prefix, next hop, AS path) and Adj-RIB-In attribute set:
    equal digests mean equal RIBs, which lets RIBs held in other processes be compared."""
    h = hashlib.sha256()
    for fam in sorted(s.loc_rib):
        loc = s.loc_rib[fam]
        for prefix in sorted(loc.best):
            bp = loc.best_path(prefix)
            assert bp is not None
            h.update(bytes((fam[0], fam[1], len(prefix))) + prefix + bp[0].wire)
            h.update((bp[0].next_hop or "").encode())
    return h.hexdigest()


def stats(s: BgpSession) -> dict[str, Any]:
    return {
        "protocol": s.protocol,
        "state": s.state.value,
        "peer": s.source.name,
        "peer_address": s.config.peer_address,
        "peer_as": s.config.peer_as,
        "local_as": s.config.local_as,
        "router_id": s.config.router_id,
        "established_at": s.established_at,
        "stale_routes": len(s.stale),
        # families held long-lived stale (RFC 9494) and when their routes go
        "long_lived_stale_until": {C.family_name(f): t for f, t in sorted(s.long_lived.until.items())},
        "prefixes_received": s.prefix_count(),
        "loc_rib": {f"{a}/{sf}": len(r) for (a, sf), r in s.loc_rib.items()},
        "prefixes_advertised": sum(len(v) for v in s.adj_out.values()),
        "connect_retry_counter": s.connect_retry_counter,
        "buffered_octets": s._reader.pending,
        **dict(s.counters),
    }

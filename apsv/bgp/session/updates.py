"""Received UPDATEs: checked (RFC 4271 / RFC 7606), imported through policy into the Adj-RIB-In
and the Loc-RIB, and routes deleted when the session goes down."""

from __future__ import annotations

import ipaddress
import math
import socket
from typing import TYPE_CHECKING

from apsv.bgp import constants as C
from apsv.bgp.errors import Action as ErrorAction
from apsv.bgp.events import (
    RoutesChanged,
)
from apsv.bgp.fsm import Event, State
from apsv.bgp.message import (
    Update,
)
from apsv.bgp.mp_nlri import MpReach, MpUnreach
from apsv.bgp.path_attributes import PathAttributes, with_mp_next_hop
from apsv.bgp.rib import AdjRibIn, BestPathChange, PrefixLimitExceeded
from apsv.bgp.session import restart
from apsv.bgp.session.common import Family
from apsv.stacks.interface import (
    ProtocolProblem,
)

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def process_update(s: BgpSession, u: Update) -> None:
    s.counters["updates_in"] += 1
    announced = len(u.nlri) + (len(u.mp_reach.nlri or ()) if u.mp_reach is not None else 0)
    if announced:
        s.counters["updates_announcing"] += 1
        s.counters["prefixes_announced"] += announced
    if s._xfer_open:
        # the initial transfer (establishment to End-of-RIB, or table_expect_s for a peer
        # that sends none): how this peer packs a table
        since = s.established_at if s.established_at is not None else s._now
        if u.is_end_of_rib or s._now - since > s.config.table_expect_s:
            s._xfer_open = False
        elif announced:
            s.counters["table_prefixes_in"] += announced
            s.counters["table_announcing_in"] += 1
    if s._table_expected > 0:
        if s.table_backlog(s._now) == 0:
            s._table_forget()  # expired: whatever comes now is not that transfer
        else:
            table_progress(s, u)
    if s.stale and u.is_end_of_rib:
        mu = u.mp_unreach
        fam = C.IPV4_UNICAST if mu is None else (mu.afi, mu.safi)
        if s.stale.count(fam):
            restart.drop_stale(s, [fam], "swept", f"End-of-RIB for {C.family_name(fam)}")
    for p in u.problems:
        s.counters[f"rfc7606_{p.action.value}"] += 1
        s._out.append(ProtocolProblem(p.action.value, p.describe()))
    withdraw_all = u.action is ErrorAction.TREAT_AS_WITHDRAW
    attrs = u.attributes
    withdraw_v4 = withdraw_mp = withdraw_all
    if not withdraw_all and attrs is not None and (u.nlri or u.mp_reach is not None):
        why = path_problem(s, attrs)
        if why is not None:
            ignore(s, why)
            withdraw_v4 = withdraw_mp = True
        else:
            if u.nlri and (why := next_hop_problem(s, attrs.next_hop)) is not None:
                ignore(s, why)
                withdraw_v4 = True
            mr = u.mp_reach
            if mr is not None and mr.nlri and (why := mp_next_hop_problem(s, mr.afi, mr.next_hop)) is not None:
                ignore(s, why)
                withdraw_mp = True
    changes: list[BestPathChange] = []
    try:
        apply(s, u, withdraw_v4, withdraw_mp, changes)
    except PrefixLimitExceeded as e:
        fam = e.family
        s._cease_subcode = C.CEASE_MAX_PREFIXES
        s._cease_data = fam[0].to_bytes(2, "big") + bytes((fam[1],)) + e.limit.to_bytes(4, "big")
        if changes:
            s._out.append(RoutesChanged(changes))
        s._out.append(s.prefix_limit.ceased(fam, e.received, e.limit))
        s._dispatch(Event.AUTOMATIC_STOP)
        # down until started again, or for the configured restart time (not the idle hold)
        s.timers.pop("idle_hold", None)
        if s.prefix_limit.restart_s is not None:
            s.timers["idle_hold"] = s._now + s.prefix_limit.restart_s
        s.counters["prefix_limit_ceased"] += 1
        return
    if changes:
        s._out.append(RoutesChanged(changes))
    if s.prefix_limit.limit is not None:
        for fam, rib in s.adj_in.items():
            s._out.extend(s.prefix_limit.check(fam, len(rib)))


def ignore(s: BgpSession, why: str) -> None:
    """A route the peer sent that this speaker must not use: handled as withdrawn."""
    s.counters["rfc7606_treat-as-withdraw"] += 1
    s._out.append(ProtocolProblem(ErrorAction.TREAT_AS_WITHDRAW.value, why))


def next_hop_problem(s: BgpSession, nh: str | None) -> str | None:
    if nh is not None and nh in s._own_addresses:
        return f"NEXT_HOP {nh} is this speaker's own address (RFC 4271 §6.3): route ignored"
    return None


def mp_next_hop_problem(s: BgpSession, afi: int, nh: bytes) -> str | None:
    """RFC 2545 §3 for IPv6: a global address first, a link-local one only after it."""
    if afi != C.AFI_IPV6 or len(nh) not in (16, 32):
        return next_hop_problem(s, socket.inet_ntoa(nh)) if len(nh) == 4 else None
    first = ipaddress.IPv6Address(nh[:16])
    if first.is_link_local:
        return f"MP_REACH_NLRI next hop {first} is link-local where RFC 2545 §3 needs a global address"
    return next_hop_problem(s, str(first))


def path_problem(s: BgpSession, attrs: PathAttributes) -> str | None:
    cfg = s.config
    if not cfg.ibgp and cfg.enforce_first_as and attrs.neighbor_as != cfg.peer_as:
        return f"AS_PATH does not start with the peer's AS {cfg.peer_as} (RFC 4271 §6.3)"
    for _st, asns in attrs.as_path:
        if cfg.local_as in asns:
            return f"AS_PATH contains our AS {cfg.local_as} (loop, RFC 4271 §9.1.2)"
    return None


def apply(s: BgpSession, u: Update, withdraw_v4: bool, withdraw_mp: bool, changes: list[BestPathChange]) -> None:
    if s.stale:
        refresh_stale(s, u)
    if s.received is not None:
        s.received.forget(C.IPV4_UNICAST, [*u.withdrawn, *(u.nlri if withdraw_v4 else ())])
        if u.mp_unreach is not None:
            s.received.forget((u.mp_unreach.afi, u.mp_unreach.safi), u.mp_unreach.withdrawn or ())
        if u.mp_reach is not None and withdraw_mp:
            s.received.forget((u.mp_reach.afi, u.mp_reach.safi), u.mp_reach.nlri or ())
    v4 = C.IPV4_UNICAST
    rib4 = s.adj_in.get(v4)
    if rib4 is not None:
        loc4 = s.loc_rib[v4]
        if u.withdrawn:
            changes += loc4.withdraw(rib4, u.withdrawn)
        if u.nlri:
            if withdraw_v4 or u.attributes is None:
                changes += loc4.withdraw(rib4, u.nlri)
            else:
                changes += import_routes(s, v4, rib4, u.nlri, u.attributes)
    elif u.nlri or u.withdrawn:
        s.counters["prefixes_ignored_family_not_negotiated"] += len(u.nlri) + len(u.withdrawn)
    mu: MpUnreach | None = u.mp_unreach
    if mu is not None and mu.withdrawn:
        fam = (mu.afi, mu.safi)
        rib = s.adj_in.get(fam)
        if rib is not None:
            changes += s.loc_rib[fam].withdraw(rib, mu.withdrawn)
        else:
            s.counters["prefixes_ignored_family_not_negotiated"] += len(mu.withdrawn)
    mr: MpReach | None = u.mp_reach
    if mr is not None and mr.nlri:
        fam = (mr.afi, mr.safi)
        rib = s.adj_in.get(fam)
        if rib is None:
            s.counters["prefixes_ignored_family_not_negotiated"] += len(mr.nlri)
        elif withdraw_mp or u.attributes is None:
            changes += s.loc_rib[fam].withdraw(rib, mr.nlri)
        else:
            attrs = with_mp_next_hop(u.attributes, mr.next_hop, s.ctx)
            changes += import_routes(s, fam, rib, mr.nlri, attrs)


def import_routes(
    s: BgpSession, fam: Family, rib: AdjRibIn, keys: list[bytes], attrs: PathAttributes
) -> list[BestPathChange]:
    """Routes received, through the import policy: what it refuses is handled as withdrawn
    (a route it refuses now may have been accepted before)."""
    loc = s.loc_rib[fam]
    if s.received is not None:
        held = s.received.learn(fam, keys, attrs)
        limit = s.prefix_limit.rib_limit
        if limit is not None and held > limit:
            # routes import refuses are kept too: the same bound holds for them
            raise PrefixLimitExceeded(limit, fam, held)
    rm = s.route_maps.get(("import", fam))
    if rm is None:
        if not s._rfc8212:
            return loc.update(rib, keys, attrs)
        s.counters["policy_refused_in"] += len(keys)
        return loc.withdraw(rib, keys)
    refused, accepted = rm.apply(fam, keys, attrs, s.ctx, add_path=rib.add_path, peer_address=s.config.peer_address)
    out = loc.withdraw(rib, refused) if refused else []
    s.counters["policy_refused_in"] += len(refused)
    for pa, ks in accepted.items():
        out += loc.update(rib, ks, pa)
    return out


def refresh_stale(s: BgpSession, u: Update) -> None:
    """Routes the restarted peer sends (or withdraws) again are no longer stale."""
    s.stale.refreshed(C.IPV4_UNICAST, [*u.withdrawn, *u.nlri])
    if u.mp_unreach is not None:
        s.stale.refreshed((u.mp_unreach.afi, u.mp_unreach.safi), u.mp_unreach.withdrawn or ())
    if u.mp_reach is not None:
        s.stale.refreshed((u.mp_reach.afi, u.mp_reach.safi), u.mp_reach.nlri or ())


def table_progress(s: BgpSession, u: Update) -> None:
    """One UPDATE of a table transfer: counted against what is expected; End-of-RIB for
    every family the session had ends it."""
    s.counters["table_updates_in"] += 1
    if u.is_end_of_rib:
        mu = u.mp_unreach
        s._table_eor.discard(C.IPV4_UNICAST if mu is None else (mu.afi, mu.safi))
        if not s._table_eor:
            s._table_expected = 0
    else:
        s._table_expected -= 1


def delete_routes(s: BgpSession, state: State) -> None:
    n = s.prefix_count()
    if n:
        # the table the peer will re-send when it is back, in UPDATEs as this peer packs a
        # table (measured over its initial transfers; churn UPDATEs carry fewer prefixes),
        # down again mid-transfer: all of it again, not only what it had got to
        c = s.counters
        if c["table_announcing_in"]:
            per_update = c["table_prefixes_in"] / c["table_announcing_in"]
        else:
            per_update = c["prefixes_announced"] / max(c["updates_announcing"], 1)
        size = math.ceil(n / max(per_update, 1.0))
        unfinished = s.table_backlog(s._now) > 0
        s._table_size = max(size, s._table_size) if unfinished else size
        s._table_expected = s._table_size
        s._table_since = s._now
        s._table_eor = set(s.adj_in)
    elif s.table_backlog(s._now) > 0:
        s._table_since = s._now  # down again before any of it came: still expected, from now
    if s._event is Event.TCP_CONNECTION_FAILS and restart.retain_stale(s, state):
        return
    changes: list[BestPathChange] = []
    for fam, rib in s.adj_in.items():
        keys = list(rib.routes)
        if keys:
            changes += s.loc_rib[fam].withdraw(rib, keys)
    s.adj_in.clear()
    s.loc_rib.clear()
    s.stale.clear()
    s.long_lived.clear()
    if s.received is not None:
        s.received.clear()
    s.timers.pop("gr_restart", None)
    s.timers.pop("gr_stale", None)
    s.timers.pop("llgr_stale", None)
    if changes:
        s._out.append(RoutesChanged(changes))

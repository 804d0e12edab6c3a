"""A session's snapshot and its restore: every field that makes the session, no pickle."""

from __future__ import annotations

import socket
from collections import Counter
from typing import TYPE_CHECKING, Any

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import MP_NEXT_HOP
from apsv.bgp.attributes import decode_attributes
from apsv.bgp.capabilities import Negotiated
from apsv.bgp.config import Announcement, BgpSessionConfig
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import BgpError
from apsv.bgp.fsm import State
from apsv.bgp.graceful_restart import LongLived, StaleRoutes
from apsv.bgp.message import (
    decode_open,
    encode_message,
)
from apsv.bgp.path_attributes import PathAttributes, interner_for, with_mp_next_hop
from apsv.bgp.rib import AdjRibIn, LocRib
from apsv.bgp.session import receive
from apsv.bgp.session.common import Family
from apsv.bgp.soft_reconfig import ReceivedRoutes
from apsv.errors import DecodeError
from apsv.snapshot import SnapshotReader, SnapshotWriter, decodes_snapshot

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def snapshot(s: BgpSession) -> bytes:
    w = SnapshotWriter(s.protocol)
    n = s.negotiated
    w.json(
        {
            "config": s.config.model_dump(mode="json"),
            "state": s.state.value,
            "connect_retry_counter": s.connect_retry_counter,
            "timers": s.timers,
            "long_lived": s.long_lived.to_json(),
            "idle_hold": s.idle_hold,
            "connected": s.connected,
            "hold_time": s.hold_time,
            "keepalive_time": s.keepalive_time,
            "established_at": s.established_at,
            "counters": dict(s.counters),
            "negotiated": None
            if n is None
            else {
                "asn4": n.asn4,
                "families": sorted(n.families),
                "add_path_receive": sorted(n.add_path_receive),
                "add_path_send": sorted(n.add_path_send),
                "extended_message": n.extended_message,
                "route_refresh": n.route_refresh,
                "enhanced_route_refresh": n.enhanced_route_refresh,
                "graceful_restart": n.graceful_restart,
                "peer_restart_time": n.peer_restart_time,
                "peer_gr_families": sorted(n.peer_gr_families),
                "peer_gr_forwarding": sorted(n.peer_gr_forwarding),
                "peer_capabilities": list(n.peer_capabilities),
                "long_lived": n.long_lived,
                "peer_llgr_times": [[*f, t] for f, t in n.peer_llgr_times],
                "peer_llgr_forwarding": sorted(n.peer_llgr_forwarding),
            },
            "peer_open": None if s.peer_open is None else encode_message(s.peer_open).hex(),
            # the context the Adj-RIB-In was decoded in (while down, routes kept stale keep it)
            "rib_context": {"asn4": s.ctx.asn4, "add_path": sorted(s.ctx.add_path)},
            "prefix_limit": [sorted(s.prefix_limit.warned), sorted(s.prefix_limit.exceeded)],
            "bfd": [s.bfd_down, s.bfd_downs],
            # the originated announcements, where the virtual router changed them
            "announcements": None
            if s.announcements == list(s.config.announce)
            else [a.model_dump(mode="json") for a in s.announcements],
            "router_id": s.source.router_id,
            "table": [
                s._table_expected,
                s._table_size,
                s._table_since,
                sorted(s._table_eor),
                s._xfer_open,
            ],
        }
    )
    w.blob(s._reader.pending_bytes())
    for table in (adj_in_tables(s), adj_out_tables(s)):
        w.u32(len(table))
        for fam, rows in table:
            write_rib(w, fam, rows)
    s.stale.write(w)
    received = s.received.tables() if s.received is not None else []
    w.u32(len(received) if s.received is not None else 0xFFFFFFFF)
    for fam, rows in received:
        write_rib(w, fam, rows)
    return w.getvalue()


def adj_in_tables(s: BgpSession) -> list[tuple[Family, dict[bytes, PathAttributes]]]:
    return [(fam, rib.routes) for fam, rib in sorted(s.adj_in.items())]


def adj_out_tables(s: BgpSession) -> list[tuple[Family, dict[bytes, PathAttributes]]]:
    return sorted(s.adj_out.items())


@decodes_snapshot
def restore(cls: type[BgpSession], blob: bytes) -> BgpSession:
    r = SnapshotReader(blob, cls.protocol)
    meta = r.json()
    try:
        s = cls(BgpSessionConfig.model_validate(meta["config"]))
        restore_state(s, meta)
        restore_connection(s, meta)
    except (KeyError, TypeError, ValueError, BgpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DecodeError(f"bgp snapshot: state is invalid: {first}") from None
    s._reader.feed(r.blob())
    read_adj_rib_in(r, s)
    for _ in range(r.u32()):
        fam, rows = read_rib(r, s.ctx)
        s.adj_out[fam] = rows
    s.stale = StaleRoutes.read(r)
    read_received(r, s)
    check_stale(s)
    r.done()
    return s


def restore_state(s: BgpSession, meta: dict[str, Any]) -> None:
    """The session's own fields: FSM state, timers, counters, what it originates, BFD, prefix
    limits and the table the peer is expected to re-send."""
    s.state = State(meta["state"])
    s.connect_retry_counter = int(meta["connect_retry_counter"])
    s.timers = {str(k): float(v) for k, v in meta["timers"].items()}
    s.long_lived = LongLived.from_json(meta.get("long_lived"))
    s.idle_hold = float(meta["idle_hold"])
    s.connected = bool(meta["connected"])
    s.hold_time = int(meta["hold_time"])
    s.keepalive_time = float(meta["keepalive_time"])
    s.established_at = meta["established_at"]
    s.counters = Counter(meta["counters"])
    s.source.set_router_id(meta["router_id"])
    if meta.get("announcements") is not None:
        s.announcements = [Announcement.model_validate(a) for a in meta["announcements"]]
    bfd_down, bfd_downs = meta.get("bfd", (False, []))
    s.bfd_down, s.bfd_downs = bool(bfd_down), [float(t) for t in bfd_downs]
    warned, exceeded = meta.get("prefix_limit", ([], []))
    s.prefix_limit.warned = {(int(a), int(b)) for a, b in warned}
    s.prefix_limit.exceeded = {(int(a), int(b)) for a, b in exceeded}
    if meta.get("table"):
        expected, size, since, eor, *more = meta["table"]
        s._table_expected, s._table_size = int(expected), int(size)
        s._xfer_open = bool(more[0]) if more else False
        s._table_since = None if since is None else float(since)
        s._table_eor = {(int(a), int(b)) for a, b in eor}


def restore_connection(s: BgpSession, meta: dict[str, Any]) -> None:
    """The peer's OPEN, what was negotiated with it, and the codec context: the negotiated one,
    or, while down, the one the Adj-RIB-In's routes kept stale were decoded in."""
    neg = meta["negotiated"]
    if meta["peer_open"]:
        s.peer_open = decode_open(bytes.fromhex(meta["peer_open"])[C.HEADER_LEN :])
    if neg is not None:
        s.negotiated = Negotiated(
            asn4=neg["asn4"],
            families=frozenset(tuple(f) for f in neg["families"]),
            add_path_receive=frozenset(tuple(f) for f in neg["add_path_receive"]),
            add_path_send=frozenset(tuple(f) for f in neg["add_path_send"]),
            extended_message=neg["extended_message"],
            route_refresh=neg["route_refresh"],
            enhanced_route_refresh=neg["enhanced_route_refresh"],
            graceful_restart=neg["graceful_restart"],
            peer_restart_time=neg["peer_restart_time"],
            peer_gr_families=frozenset(tuple(f) for f in neg["peer_gr_families"]),
            peer_gr_forwarding=frozenset(tuple(f) for f in neg["peer_gr_forwarding"]),
            peer_capabilities=tuple(neg["peer_capabilities"]),
            long_lived=bool(neg.get("long_lived", False)),
            peer_llgr_times=tuple(((int(a), int(sf)), int(t)) for a, sf, t in neg.get("peer_llgr_times", ())),
            peer_llgr_forwarding=frozenset(tuple(f) for f in neg.get("peer_llgr_forwarding", ())),
        )
        receive.set_context(s)
    elif meta.get("rib_context"):
        rc = meta["rib_context"]
        s.ctx = CodecContext(
            asn4=bool(rc["asn4"]), ibgp=s.config.ibgp, add_path=frozenset(tuple(f) for f in rc["add_path"])
        )


def read_adj_rib_in(r: SnapshotReader, s: BgpSession) -> None:
    """The Adj-RIB-In tables, each put through its family's Loc-RIB."""
    for i in range(r.u32()):
        fam, rows = read_rib(r, s.ctx)
        rib = s.adj_in.get(fam)
        if rib is None and s.negotiated is None and rows:
            # down, with routes kept stale: the table outlives the session
            rib = s.adj_in[fam] = AdjRibIn(s.source, fam, fam in s.ctx.add_path, s.prefix_limit.rib_limit)
            s.loc_rib[fam] = LocRib(fam)
            s.loc_rib[fam].add_source(rib)
        if rib is None:
            raise DecodeError(f"snapshot Adj-RIB-In #{i} is for family {fam}, which the session did not negotiate")
        # one Loc-RIB update per attribute set the snapshot shares among routes
        groups: dict[int, tuple[PathAttributes, list[bytes]]] = {}
        for key, pa in rows.items():
            groups.setdefault(id(pa), (pa, []))[1].append(key)
        for pa, keys in groups.values():
            s.loc_rib[fam].update(rib, keys, pa)


def read_received(r: SnapshotReader, s: BgpSession) -> None:
    """What the peer sent before import policy, when the session keeps it (soft_reconfig.py)."""
    n_received = r.u32()
    s.received = None if n_received == 0xFFFFFFFF else ReceivedRoutes()
    for _ in range(0 if n_received == 0xFFFFFFFF else n_received):
        fam, rows = read_rib(r, s.ctx)
        assert s.received is not None
        s.received.load(fam, rows)


def check_stale(s: BgpSession) -> None:
    """Refuse a snapshot that marks routes stale which its Adj-RIB-In lacks."""
    for fam in s.stale.families():
        rib = s.adj_in.get(fam)
        if rib is None or not s.stale.within(fam, rib.routes.keys()):
            raise DecodeError(f"snapshot marks routes of {C.family_name(fam)} stale that its Adj-RIB-In lacks")


def write_rib(w: SnapshotWriter, fam: Family, rows: dict[bytes, PathAttributes]) -> None:
    index: dict[int, int] = {}
    table: list[PathAttributes] = []
    refs: list[bytes] = []
    for key, pa in rows.items():
        i = index.get(id(pa))
        if i is None:
            i = index[id(pa)] = len(table)
            table.append(pa)
        refs.append(i.to_bytes(4, "big") + key)
    w.u32(fam[0])
    w.u32(fam[1])
    w.blobs([pa.wire for pa in table])
    w.blobs([mp_next_hop_bytes(pa) for pa in table])
    w.blobs(refs)


def mp_next_hop_bytes(pa: PathAttributes) -> bytes:
    nh = pa.get(MP_NEXT_HOP)
    return b"" if nh is None else socket.inet_pton(socket.AF_INET6 if ":" in nh else socket.AF_INET, nh)


def read_rib(r: SnapshotReader, ctx: CodecContext) -> tuple[Family, dict[bytes, PathAttributes]]:
    fam = (r.u32(), r.u32())
    interner = interner_for(ctx)
    wires, hops = r.blobs(), r.blobs()
    if len(wires) != len(hops):
        raise DecodeError("snapshot attribute table and next-hop table differ in length")
    table: list[PathAttributes] = []
    for wire, nh in zip(wires, hops, strict=True):
        try:
            pa = decode_attributes(wire, 0, len(wire), ctx, interner).attributes
        except BgpError as e:
            raise DecodeError(f"snapshot attribute set does not decode: {e}") from None
        table.append(with_mp_next_hop(pa, nh, ctx) if nh else pa)
    rows: dict[bytes, PathAttributes] = {}
    for ref in r.blobs():
        i = int.from_bytes(ref[:4], "big")
        if i >= len(table):
            raise DecodeError(f"snapshot route refers to attribute set {i} of {len(table)}")
        rows[ref[4:]] = table[i]
    return fam, rows

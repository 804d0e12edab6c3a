"""Received messages: each handed to the FSM as its event; an OPEN checked (RFC 4271 §6.2) and
accepted, the codec context set from what was negotiated."""

from __future__ import annotations

from typing import TYPE_CHECKING

from apsv.bgp import constants as C
from apsv.bgp.capabilities import negotiate
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import BgpError
from apsv.bgp.events import (
    PeerNotification,
)
from apsv.bgp.fsm import Event, State
from apsv.bgp.message import (
    Open,
    decode_open,
    decode_route_refresh,
    decode_update,
)
from apsv.bgp.rib import AdjRibIn, LocRib
from apsv.bgp.session import restart
from apsv.bgp.session.common import MESSAGES_IN_COUNTERS
from apsv.bgp.soft_reconfig import ReceivedRoutes

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def on_message(s: BgpSession, mtype: int, body: bytes) -> None:
    s.counters[MESSAGES_IN_COUNTERS.get(mtype) or f"messages_in_{mtype}"] += 1
    s._msg_type = mtype
    if mtype == C.MSG_UPDATE:
        if s.state is not State.ESTABLISHED:
            s._dispatch(Event.UPDATE_MSG)
            return
        try:
            u = decode_update(body, s.ctx)
        except BgpError as e:
            s._error = e
            s._dispatch(Event.UPDATE_MSG_ERR)
            return
        s._update = u
        s._dispatch(Event.UPDATE_MSG)
    elif mtype == C.MSG_KEEPALIVE:
        if body:
            s._error = BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, (19 + len(body)).to_bytes(2, "big"))
            s._dispatch(Event.BGP_HEADER_ERR)
            return
        s._dispatch(Event.KEEPALIVE_MSG)
    elif mtype == C.MSG_OPEN:
        try:
            m = decode_open(body)
            check_open(s, m)
        except BgpError as e:
            s._error = e
            s._dispatch(Event.BGP_OPEN_MSG_ERR)
            return
        if s.state is State.OPENSENT:
            accept_open(s, m)
        s._dispatch(Event.BGP_OPEN)
    elif mtype == C.MSG_NOTIFICATION:
        code = body[0] if body else 0
        sub = body[1] if len(body) > 1 else 0
        s.counters[f"notifications_received_{code}_{sub}"] += 1
        s._out.append(PeerNotification(code, sub, body[2:]))
        if code == C.ERR_OPEN and sub == C.ERR_OPEN_UNSUPPORTED_VERSION:
            s._dispatch(Event.NOTIF_MSG_VER_ERR)
        else:
            s._dispatch(Event.NOTIF_MSG)
        if code == C.ERR_CEASE and sub == C.CEASE_HARD_RESET and len(body) >= 4:
            sub = body[3] if body[2] == C.ERR_CEASE else 0  # RFC 8538: the NOTIFICATION it wraps
        if code == C.ERR_CEASE and sub in (C.CEASE_ADMIN_SHUTDOWN, C.CEASE_PEER_DECONFIGURED):
            s._table_forget()  # the peer shut the session down on purpose: not back soon
    elif mtype == C.MSG_ROUTE_REFRESH:
        try:
            s._refresh = decode_route_refresh(body)
        except BgpError as e:
            s._error = e
            s._dispatch(Event.UPDATE_MSG_ERR)
            return
        s._dispatch(Event.ROUTE_REFRESH_MSG)


def check_open(s: BgpSession, m: Open) -> None:
    """RFC 4271 §6.2 checks (syntax was checked by the decoder)."""
    cfg = s.config
    for ptype, _value in m.params or ():
        if ptype != C.OPT_PARAM_CAPABILITIES:
            raise BgpError(C.ERR_OPEN, C.ERR_OPEN_UNSUPPORTED_OPT_PARAM, b"", f"optional parameter type {ptype}")
    if m.hold_time in (1, 2):
        raise BgpError(
            C.ERR_OPEN, C.ERR_OPEN_UNACCEPTABLE_HOLD_TIME, b"", f"hold time {m.hold_time} (must be 0 or >= 3)"
        )
    if m.real_asn != cfg.peer_as:
        raise BgpError(
            C.ERR_OPEN,
            C.ERR_OPEN_BAD_PEER_AS,
            m.asn.to_bytes(2, "big"),
            f"peer AS {m.real_asn}, configured {cfg.peer_as}",
        )
    rid = m.router_id
    # RFC 6286 §2.2: any non-zero identifier, except our own on an internal session.
    if rid == "0.0.0.0" or (cfg.ibgp and rid == cfg.router_id):
        raise BgpError(C.ERR_OPEN, C.ERR_OPEN_BAD_BGP_ID, b"", f"BGP Identifier {rid}")
    # Capabilities must parse (negotiate raises on a malformed one).
    negotiate(s.local_capabilities, m.capabilities)


def accept_open(s: BgpSession, m: Open) -> None:
    s.peer_open = m
    s.negotiated = negotiate(s.local_capabilities, m.capabilities)
    set_context(s)
    hold = min(s.config.hold_time, m.hold_time)
    s.hold_time = hold
    s.keepalive_time = hold / 3.0
    s.source.set_router_id(m.router_id)


def set_context(s: BgpSession) -> None:
    n = s.negotiated
    assert n is not None
    old_asn4 = s.ctx.asn4
    s.ctx = CodecContext(
        asn4=n.asn4, ibgp=s.config.ibgp, add_path=n.add_path_receive, extended_message=n.extended_message
    )
    s._reader.max_len = s.ctx.max_message_len
    # a table kept over a restart whose keys or attributes no longer mean the same (ADD-PATH
    # or 4-octet ASes negotiated differently): its stale routes go
    restart.drop_families(
        s, [f for f, r in s.adj_in.items() if r.add_path != (f in n.add_path_receive) or n.asn4 != old_asn4]
    )
    keep = s.config.soft_reconfiguration_inbound or not n.route_refresh
    if keep and s.received is None:
        s.received = ReceivedRoutes()
    elif not keep:
        s.received = None
    for fam in n.families:
        if fam not in s.adj_in:
            rib = AdjRibIn(s.source, fam, fam in n.add_path_receive, s.prefix_limit.rib_limit)
            s.adj_in[fam] = rib
            loc = LocRib(fam)
            loc.add_source(rib)
            s.loc_rib[fam] = loc


def open_message(s: BgpSession) -> Open:
    cfg = s.config
    my_as = cfg.local_as if cfg.local_as <= 0xFFFF else C.AS_TRANS
    return Open(my_as, cfg.hold_time, cfg.router_id, s.local_capabilities)

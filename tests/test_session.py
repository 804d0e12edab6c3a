"""The BGP session: two speakers talking, errors on the wire, limits, and snapshot/restore mid-stream."""

from __future__ import annotations

from collections import defaultdict

import pytest

from apsv.bgp import constants as C
from apsv.bgp.config import Announcement, BgpSessionConfig
from apsv.bgp.events import NotificationSent, RoutesChanged
from apsv.bgp.framing import MessageReader
from apsv.bgp.fsm import State
from apsv.bgp.message import Notification, Update, decode_message
from apsv.bgp.prefix_limit import PrefixLimitEvent
from apsv.bgp.session import BgpSession
from apsv.errors import DecodeError
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord
from apsv.stacks.interface import ProtocolProblem, Send, StackEvent, load_stack
from tests.conftest import shared_data_dir


def wire(events: list[StackEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def pair(
    a_cfg: BgpSessionConfig, b_cfg: BgpSessionConfig, now: float = 0.0
) -> tuple[BgpSession, BgpSession, list[StackEvent], list[StackEvent]]:
    a, b = BgpSession(a_cfg), BgpSession(b_cfg)
    ea = a.start(now) + a.connection_made(now)
    eb = b.start(now) + b.connection_made(now)
    seen_a: list[StackEvent] = []
    seen_b: list[StackEvent] = []
    for _ in range(10):
        na = a.data_received(wire(eb), now) if wire(eb) else []
        nb = b.data_received(wire(ea), now) if wire(ea) else []
        seen_a += na
        seen_b += nb
        ea, eb = na, nb
        if not ea and not eb:
            break
    return a, b, seen_a, seen_b


A = BgpSessionConfig(
    local_as=65001,
    router_id="192.0.2.1",
    peer_as=65002,
    peer_address="127.0.0.2",
    families=["ipv4-unicast", "ipv6-unicast"],
    next_hop_self="198.51.100.1",
    next_hop_self_v6="2001:db8::1",
    announce=[
        Announcement(prefixes=[f"10.{i}.0.0/16" for i in range(200)], communities=["65001:7"], med=5),
        Announcement(prefixes=["2001:db8:100::/48", "2001:db8:200::/48"]),
    ],
)
B = BgpSessionConfig(
    local_as=65002,
    router_id="192.0.2.2",
    peer_as=65001,
    peer_address="127.0.0.1",
    passive=True,
    families=["ipv4-unicast", "ipv6-unicast"],
)


def test_two_speakers_establish_and_exchange_routes() -> None:
    a, b, _, seen_b = pair(A, B)
    assert a.state is b.state is State.ESTABLISHED
    v4 = b.loc_rib_table((1, 1))
    v6 = b.loc_rib_table((2, 1))
    assert len(v4) == 200 and len(v6) == 2
    assert {r[1] for r in v4} == {"198.51.100.1"} and {r[1] for r in v6} == {"2001:db8::1"}
    changes = [c for e in seen_b if isinstance(e, RoutesChanged) for c in e.changes]
    assert len(changes) == 202
    path = b.loc_rib[(1, 1)].best_path(next(iter(b.loc_rib[(1, 1)].best)))
    assert path is not None
    attrs, _ = path
    assert attrs.as_path == ((C.AS_SEQUENCE, (65001,)),) and attrs.med == 5
    assert attrs.get(C.ATTR_COMMUNITIES) == ((65001 << 16) | 7,)
    # Withdraw back
    out = a.withdraw_originated([f"10.{i}.0.0/16" for i in range(50)], 1.0)
    ev = b.data_received(wire(out), 1.0)
    assert len(b.loc_rib_table((1, 1))) == 150
    assert sum(len(e.changes) for e in ev if isinstance(e, RoutesChanged)) == 50


def test_bad_peer_as_is_refused_with_2_2() -> None:
    wrong = B.model_copy(update={"peer_as": 65099})
    a, b, seen_a, _ = pair(A, wrong)
    assert a.state is State.IDLE and b.state is State.IDLE
    sent = [e for e in seen_a if isinstance(e, NotificationSent)]
    assert not sent  # b refused a's OPEN; a received the NOTIFICATION


def test_malformed_update_gets_treat_as_withdraw_then_a_reset_with_the_right_code() -> None:
    _a, b, _, _ = pair(A, B)
    assert len(b.loc_rib_table((1, 1))) == 200
    # Re-announce 10.0.0.0/16 with ORIGIN value 9: RFC 7606 treat-as-withdraw, session stays up.
    bad_origin = (
        b"\x00\x00\x00\x14"
        + b"\x40\x01\x01\x09"
        + b"\x40\x02\x06\x02\x01\x00\x00\xfd\xe9"
        + b"\x40\x03\x04\xc6\x33\x64\x01"
        + b"\x10\x0a\x00"
    )
    msg = C.MARKER + (19 + len(bad_origin)).to_bytes(2, "big") + b"\x02" + bad_origin
    ev = b.data_received(msg, 2.0)
    assert b.state is State.ESTABLISHED and len(b.loc_rib_table((1, 1))) == 199
    # one accurate finding: the malformed ORIGIN, not also a "missing" ORIGIN
    found = [e.detail for e in ev if isinstance(e, ProtocolProblem)]
    assert len(found) == 1 and "ORIGIN" in found[0] and "missing" not in found[0], found
    assert any(isinstance(e, RoutesChanged) and e.changes[0].attributes is None for e in ev)
    # A NLRI prefix length of 33 cannot be parsed: session reset with 3/10 on the wire.
    broken = b"\x00\x00\x00\x00" + b"\x21\x0a\x00\x00\x00\x00"
    ev = b.data_received(C.MARKER + (19 + len(broken)).to_bytes(2, "big") + b"\x02" + broken, 3.0)
    assert b.state is State.IDLE
    r = MessageReader()
    r.feed(wire(ev))
    m = r.next_message()
    assert m is not None
    n = decode_message(*m)
    assert isinstance(n, Notification) and (n.code, n.subcode) == (3, 10)
    assert len(b.loc_rib_table((1, 1))) == 0  # routes of a dead session are gone


def test_routes_whose_next_hop_is_this_speaker_or_link_local_only_are_ignored() -> None:
    """RFC 4271 §6.3: a NEXT_HOP that is the receiving speaker's own address; RFC 2545 §3: an
    IPv6 next hop must be global (a link-local one only after it). The session stays up."""
    own = B.model_copy(update={"next_hop_self": "198.51.100.1"})  # A's IPv4 next hop
    _, b, _, seen_b = pair(A, own)
    assert b.state is State.ESTABLISHED
    assert b.loc_rib_table((1, 1)) == [] and len(b.loc_rib_table((2, 1))) == 2
    found = [e.detail for e in seen_b if isinstance(e, ProtocolProblem)]
    assert len(found) == 1 and "own address" in found[0]
    link_local = A.model_copy(update={"next_hop_self_v6": "fe80::1"})
    _, b, _, seen_b = pair(link_local, B)
    assert len(b.loc_rib_table((1, 1))) == 200 and b.loc_rib_table((2, 1)) == []
    found = [e.detail for e in seen_b if isinstance(e, ProtocolProblem)]
    assert len(found) == 1 and "link-local" in found[0]


def limit_events(events: list[StackEvent]) -> list[tuple[str, int, int]]:
    return [(e.kind, e.received, e.limit) for e in events if isinstance(e, PrefixLimitEvent)]


def test_prefix_limit_ends_the_session_with_cease_1_and_restarts_only_when_configured() -> None:
    limited = B.model_copy(update={"max_prefixes": 100})
    _, b, _, seen_b = pair(A, limited)
    assert b.state is State.IDLE
    (n,) = [e for e in seen_b if isinstance(e, NotificationSent)]
    assert (n.code, n.subcode) == (C.ERR_CEASE, C.CEASE_MAX_PREFIXES)
    assert limit_events(seen_b) == [("cease", 200, 100)]
    assert "idle_hold" not in b.timers  # down until started again (FRR's default)
    again = B.model_copy(update={"max_prefixes": 100, "max_prefixes_restart_s": 30.0})
    _, b, _, _ = pair(A, again)
    assert b.state is State.IDLE and b.timers["idle_hold"] == 30.0


def test_prefix_limit_warns_at_its_threshold_and_warning_only_keeps_the_session() -> None:
    _, b, _, seen_b = pair(A, B.model_copy(update={"max_prefixes": 250}))
    assert b.state is State.ESTABLISHED and limit_events(seen_b) == [("threshold", 200, 250)]
    warn = B.model_copy(update={"max_prefixes": 100, "max_prefixes_warning_only": True})
    a, b, _, seen_b = pair(A, warn)
    assert b.state is State.ESTABLISHED and len(b.loc_rib_table((1, 1))) == 200
    assert limit_events(seen_b) == [("threshold", 200, 100), ("exceeded", 200, 100)]
    # each warning once per crossing: a further UPDATE past the limit gives none
    ev = b.data_received(wire(a.originate(Announcement(prefixes=["10.250.0.0/16"]), 1.0)), 1.0)
    assert len(b.loc_rib_table((1, 1))) == 201 and limit_events(ev) == []
    assert BgpSession.restore(b.snapshot()).prefix_limit.exceeded == {(1, 1)}


def test_manual_stop_sends_shutdown_communication() -> None:
    a, b, _, _ = pair(A, B)
    out = a.stop(5.0, "maintenance window")
    ev = b.data_received(wire(out), 5.0)
    assert a.state is b.state is State.IDLE
    r = MessageReader()
    r.feed(wire(out))
    m = r.next_message()
    assert m is not None
    n = decode_message(*m)
    assert isinstance(n, Notification) and n.shutdown_message == "maintenance window"
    assert ev


def test_config_errors_name_the_field() -> None:
    stack = load_stack("bgp")
    with pytest.raises(Exception) as ei:
        stack.create_session({"local_as": 65001, "router_id": "192.0.2.1", "peer_as": 0})
    assert "peer_as" in str(ei.value)
    with pytest.raises(Exception) as ei:
        BgpSessionConfig.model_validate(
            {"local_as": 1, "router_id": "192.0.2.1", "peer_as": 2, "announce": [{"prefixes": ["10.0.0.0/8"]}]}
        )
    assert "next_hop_self" in str(ei.value)
    with pytest.raises(Exception) as ei:
        BgpSessionConfig(local_as=1, router_id="192.0.2.1", peer_as=2, hold_time=2)
    assert "hold_time" in str(ei.value)


def test_snapshot_mid_message_restores_exactly() -> None:
    a, b, _, _ = pair(A, B)
    out = a.withdraw_originated(["10.7.0.0/16"], 1.0)
    data = wire(out)
    b.data_received(data[:10], 1.0)  # half a message is in b's buffer
    c = BgpSession.restore(b.snapshot())
    assert c.state is State.ESTABLISHED and c.timers == b.timers
    for s in (b, c):
        s.data_received(data[10:], 1.0)
    assert c.loc_rib_table((1, 1)) == b.loc_rib_table((1, 1))
    assert len(c.loc_rib_table((1, 1))) == 199 and c.loc_rib_table((2, 1)) == b.loc_rib_table((2, 1))


def test_snapshot_rejects_garbage() -> None:
    with pytest.raises(DecodeError):
        BgpSession.restore(b"nonsense")
    blob = BgpSession(A).snapshot()
    with pytest.raises(DecodeError):
        BgpSession.restore(blob[:-3])


def _sessions_per_peer(path: str) -> dict[tuple[str, int], list[BgpMessageRecord]]:
    per: dict[tuple[str, int], list[BgpMessageRecord]] = defaultdict(list)
    with MrtReader(shared_data_dir() / path) as r:
        for item in r:
            if isinstance(item, BgpMessageRecord) and item.msg_type == C.MSG_UPDATE and item.raw_header:
                per[(item.peer_ip, item.peer_as)].append(item)
    return per


def _replay_session(recs: list[BgpMessageRecord]) -> BgpSession:
    first = recs[0]
    cfg = BgpSessionConfig(
        local_as=first.local_as or 65535,
        router_id="192.0.2.254",
        peer_as=first.peer_as,
        peer_address=first.peer_ip,
        families=["ipv4-unicast", "ipv6-unicast"],
        hold_time=0,
        enforce_first_as=False,
    )
    return BgpSession.established(cfg, asn4=first.asn4)


@pytest.mark.parametrize("path", ["bgpdump-testdata/updates.20070211.0141.gz", "ryu-mrt/updates.20161101.0000.bz2"])
def test_snapshot_restore_mid_dump_gives_the_same_rib(path: str) -> None:
    """Every peer of a real dump as one session: stop halfway, snapshot, restore, finish."""
    per_peer = _sessions_per_peer(f"mrt/{path}")
    assert len(per_peer) >= 4
    compared = 0
    for recs in per_peer.values():
        full = _replay_session(recs)
        part = _replay_session(recs)
        half = len(recs) // 2
        for i, rec in enumerate(recs):
            full.data_received(rec.raw_header + rec.body, rec.timestamp)
            if i < half:
                part.data_received(rec.raw_header + rec.body, rec.timestamp)
        restored = BgpSession.restore(part.snapshot())
        for rec in recs[half:]:
            restored.data_received(rec.raw_header + rec.body, rec.timestamp)
        for fam in ((1, 1), (2, 1)):
            assert restored.loc_rib_table(fam) == full.loc_rib_table(fam)
            assert {k: v.wire for k, v in restored.adj_in[fam].routes.items()} == {
                k: v.wire for k, v in full.adj_in[fam].routes.items()
            }
        assert full.state is restored.state is State.ESTABLISHED
        compared += len(full.loc_rib_table((1, 1))) + len(full.loc_rib_table((2, 1)))
    assert compared > 1000


def test_update_message_roundtrip_through_sessions_matches_rib() -> None:
    """What A advertises is exactly what B installs (prefix by prefix)."""
    _a, b, _, _ = pair(A, B)
    sent = sorted(
        str(__import__("ipaddress").ip_network(p)) for ann in A.announce for p in ann.prefixes if ":" not in p
    )
    assert [r[0] for r in b.loc_rib_table((1, 1))] == sorted(sent, key=lambda p: p)
    assert isinstance(Update(), Update)


def peer_returns(b: BgpSession, cfg: BgpSessionConfig, now: float, watch: list[int] | None = None) -> BgpSession:
    """A fresh speaker with `cfg` connects to `b` (already restarted) and they talk until quiet;
    `watch` gets b's table backlog after each of b's reads."""
    a2 = BgpSession(cfg)
    ea = a2.start(now) + a2.connection_made(now)
    eb = b.connection_made(now)
    for _ in range(10):
        nb = b.data_received(wire(ea), now) if wire(ea) else []
        if watch is not None:
            watch.append(b.table_backlog(now))
        ea, eb = (a2.data_received(wire(eb), now) if wire(eb) else []), nb
        if not ea and not eb:
            break
    return a2


def test_a_peer_that_went_down_is_expected_back_with_its_table() -> None:
    """The scaling signal a reset gives ahead of its storm: from the drop, the table the peer had
    (in UPDATEs as it packed them) is expected; once the peer is back its UPDATEs count against
    it and End-of-RIB for every family ends it; a peer that stays away is forgotten."""
    _, b, _, _ = pair(A, B)
    assert b.state is State.ESTABLISHED and b.table_backlog(1.0) == 0
    # A's 202 prefixes came in 2 UPDATEs (200 IPv4 in one, 2 IPv6 in the other)
    assert b.counters["prefixes_announced"] == 202 and b.counters["updates_announcing"] == 2
    b.connection_lost(10.0)
    assert b.state is not State.ESTABLISHED and b.prefix_count() == 0
    assert b.table_backlog(10.0) == 2 and b.table_backlog(129.0) == 2
    assert b.table_backlog(131.0) == 0  # table_expect_s (120 s) without the peer: not expected
    # the expectation moves with the session (snapshot / restore)
    assert BgpSession.restore(b.snapshot()).table_backlog(11.0) == 2
    # the peer comes back: B restarts after its idle hold, A' (a fresh speaker) connects
    now = b.next_deadline() or 15.0
    b.on_timer(now)
    assert b.table_backlog(now) == 2
    counted: list[int] = []
    peer_returns(b, A, now, counted)
    assert b.state is State.ESTABLISHED and b.prefix_count() == 202
    # both UPDATEs arrived: the transfer is over (the End-of-RIBs after them are not counted)
    assert b.table_backlog(now) == 0 and b.counters["table_updates_in"] == 2
    assert counted[0] == 2 and counted[-1] == 0


def test_end_of_rib_for_every_family_ends_a_smaller_transfer() -> None:
    _, b, _, _ = pair(A, B)
    b.connection_lost(10.0)
    now = b.next_deadline() or 15.0
    b.on_timer(now)
    peer_returns(b, A.model_copy(update={"announce": [A.announce[1]]}), now)  # came back with IPv6 only
    assert b.state is State.ESTABLISHED and b.prefix_count() == 2
    # one UPDATE (1 of 2 expected), then End-of-RIB for IPv4 and for IPv6: done
    assert b.table_backlog(now) == 0 and b.counters["table_updates_in"] == 3


def test_a_transfer_cut_short_expects_the_whole_table_again() -> None:
    """Down again mid-transfer, with part of the table in: the peer will re-send all of it."""
    from apsv.bgp.message import encode_message

    _, b, _, _ = pair(A, B)
    b.connection_lost(10.0)
    now = b.next_deadline() or 15.0
    b.on_timer(now)
    a2 = BgpSession(A)
    ea = a2.start(now) + a2.connection_made(now)
    eb = b.connection_made(now)
    held: list[Update] = []
    while b.state is not State.ESTABLISHED:
        nb = b.data_received(wire(ea), now) if wire(ea) else []
        out = a2.data_received(wire(eb), now) if wire(eb) else []
        r = MessageReader()
        r.feed(wire(out))
        ea = []
        while (m := r.next_message()) is not None:
            msg = decode_message(*m)
            if isinstance(msg, Update):
                held.append(msg)  # the table: held back
            else:
                ea.append(Send(encode_message(msg)))
        eb = nb
    assert b.table_backlog(now) == 2
    # only the IPv6 UPDATE (2 of the 202 prefixes) gets through, then the session drops again
    (v6,) = [u for u in held if u.mp_reach is not None and u.mp_reach.nlri]
    b.data_received(encode_message(v6), now)
    assert b.prefix_count() == 2 and b.table_backlog(now) == 1
    b.connection_lost(now + 1.0)
    assert b.table_backlog(now + 1.0) == 2  # the whole table again, not the 1 UPDATE 2 prefixes make
    # an administrative stop: nobody is coming back with a table
    b.stop(now + 2.0)
    assert b.table_backlog(now + 2.0) == 0


def test_a_peer_that_shuts_down_on_purpose_is_not_expected_back() -> None:
    from apsv.bgp.message import encode_message

    _, b, _, _ = pair(A, B)
    b.data_received(encode_message(Notification(C.ERR_CEASE, C.CEASE_ADMIN_SHUTDOWN, b"")), 5.0)
    assert b.state is not State.ESTABLISHED and b.prefix_count() == 0 and b.table_backlog(5.0) == 0
    _, b, _, _ = pair(A, B)
    b.data_received(encode_message(Notification(C.ERR_CEASE, C.CEASE_OTHER_CONFIG_CHANGE, b"")), 5.0)
    assert b.table_backlog(5.0) == 2  # a config change: it will be back
    _, b, _, _ = pair(A, B)
    hard = bytes((C.ERR_CEASE, C.CEASE_PEER_DECONFIGURED))  # RFC 8538 Hard Reset wrapping Cease 3
    b.data_received(encode_message(Notification(C.ERR_CEASE, C.CEASE_HARD_RESET, hard)), 5.0)
    assert b.prefix_count() == 0 and b.table_backlog(5.0) == 0


def test_an_expectation_past_table_expect_s_is_not_revived() -> None:
    _, b, _, _ = pair(A, B)
    b.connection_lost(10.0)
    assert b.table_backlog(10.0) == 2
    now = 10.0 + 200.0  # the peer comes back long after table_expect_s
    b.timers.pop("idle_hold", None)
    b.start(now)
    peer_returns(b, A, now)
    assert b.state is State.ESTABLISHED and b.table_backlog(now) == 0
    assert b.counters["table_updates_in"] == 0  # its UPDATEs were not counted as that transfer


def test_what_the_virtual_router_added_or_withdrew_holds_across_a_re_establishment() -> None:
    a, b, _, _ = pair(A, B)
    out = a.originate(Announcement(prefixes=["10.250.0.0/16"]), 1.0)
    out += a.withdraw_originated(["10.0.0.0/16"], 1.0)
    b.data_received(wire(out), 1.0)
    table = b.loc_rib_table((1, 1))
    assert len(table) == 200 and "10.250.0.0/16" in {r[0] for r in table}
    # the session resets and comes back: the same routes, not the configured ones again
    a.connection_lost(2.0)
    b.connection_lost(2.0)
    a.on_timer(a.next_deadline() or 10.0)
    b.on_timer(b.next_deadline() or 10.0)
    now = max(a.next_deadline() or 0.0, b.next_deadline() or 0.0, 10.0)
    ea = a.on_timer(now) + a.connection_made(now)
    eb = b.on_timer(now) + b.connection_made(now)
    for _ in range(10):
        na = a.data_received(wire(eb), now) if wire(eb) else []
        nb = b.data_received(wire(ea), now) if wire(ea) else []
        ea, eb = na, nb
    assert a.state is b.state is State.ESTABLISHED
    assert b.loc_rib_table((1, 1)) == table
    assert BgpSession.restore(a.snapshot()).announcements == a.announcements

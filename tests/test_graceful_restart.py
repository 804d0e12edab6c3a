"""Graceful restart, the receiving speaker (RFC 4724 §4.2): a restarting peer's routes are kept
stale, not withdrawn; what it sends again stays, what it does not is swept at its End-of-RIB or
when its restart time runs out; a peer without the capability is withdrawn at once."""

from __future__ import annotations

import struct

from apsv.bgp import constants as C
from apsv.bgp.capabilities import Capability, GracefulRestart
from apsv.bgp.config import Announcement, BgpSessionConfig
from apsv.bgp.events import RoutesChanged
from apsv.bgp.fsm import State
from apsv.bgp.graceful_restart import GracefulRestartEvent
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import StackEvent
from tests.test_session import A, B, wire

B_GR = B.model_copy(update={"graceful_restart_time": 120})
V4 = (1, 1)


def restarting_peer(cfg: BgpSessionConfig, restart_time: int = 60, forwarding: bool = True) -> BgpSession:
    """A speaker (A's config) whose graceful restart capability lists both families, with the
    forwarding-state bit when `forwarding`: what FRR or a router with a separate FIB announces."""
    s = BgpSession(cfg)
    flags = 0x80 if forwarding else 0
    body = struct.pack("!H", 0x8000 | restart_time) + b"".join(
        struct.pack("!HBB", afi, safi, flags) for afi, safi in cfg.family_codes
    )
    s.local_capabilities = (
        *(c for c in s.local_capabilities if c.code != C.CAP_GRACEFUL_RESTART),
        Capability(C.CAP_GRACEFUL_RESTART, body),
    )
    return s


def talk(a: BgpSession, b: BgpSession, now: float, first_a: bool = True) -> list[StackEvent]:
    """Connect a (fresh or restarted) and b and let them talk until quiet; b's events."""
    ea = (a.start(now) if a.state is State.IDLE else []) + a.connection_made(now)
    eb = b.connection_made(now)
    seen: list[StackEvent] = list(eb)
    for _ in range(10):
        nb = b.data_received(wire(ea), now) if wire(ea) else []
        seen += nb
        ea, eb = (a.data_received(wire(eb), now) if wire(eb) else []), nb
        if not ea and not eb:
            break
    return seen


def withdrawn(events: list[StackEvent]) -> int:
    return sum(1 for e in events if isinstance(e, RoutesChanged) for c in e.changes if c.attributes is None)


def gr_phases(events: list[StackEvent]) -> list[tuple[str, int]]:
    return [(e.phase, e.routes) for e in events if isinstance(e, GracefulRestartEvent)]


def established_pair(peer_cfg: BgpSessionConfig = A, b_cfg: BgpSessionConfig = B_GR) -> BgpSession:
    a = restarting_peer(peer_cfg)
    b = BgpSession(b_cfg)
    b.start(0.0)
    talk(a, b, 0.0)
    assert a.state is b.state is State.ESTABLISHED and b.prefix_count() == 202
    n = b.negotiated
    assert n is not None and n.peer_restart_time == 60 and n.peer_gr_forwarding == {(1, 1), (2, 1)}
    assert n.graceful_restart == (b_cfg.graceful_restart_time is not None)
    return b


def test_a_restarting_peers_routes_stay_stale_and_what_it_does_not_resend_is_swept_at_end_of_rib() -> None:
    b = established_pair()
    ev = b.connection_lost(10.0)
    # kept, not withdrawn: the virtual router goes on forwarding on them
    assert withdrawn(ev) == 0 and gr_phases(ev) == [("retained", 202)]
    assert b.prefix_count() == 202 and len(b.loc_rib_table(V4)) == 200 and len(b.stale) == 202
    assert b.timers["gr_restart"] == 70.0
    # the marks travel with the session
    restored = BgpSession.restore(b.snapshot())
    assert len(restored.stale) == 202 and restored.stale.is_stale(V4, next(iter(b.adj_in[V4].routes)))
    # the peer comes back (within its restart time) with 150 of its 200 IPv4 prefixes
    now = b.next_deadline() or 15.0
    assert now < 70.0
    b.on_timer(now)
    back = A.model_copy(
        update={
            "announce": [
                A.announce[0].model_copy(update={"prefixes": [f"10.{i}.0.0/16" for i in range(150)]}),
                A.announce[1],
            ]
        }
    )
    seen = talk(restarting_peer(back), b, now)
    assert b.state is State.ESTABLISHED
    # only the 50 it did not send again went, at its End-of-RIB for IPv4; nothing is stale now
    assert withdrawn(seen) == 50 and ("swept", 50) in gr_phases(seen)
    assert b.prefix_count() == 152 and not b.stale and "gr_restart" not in b.timers and "gr_stale" not in b.timers


def test_a_peer_not_back_within_its_restart_time_loses_its_stale_routes() -> None:
    b = established_pair()
    b.connection_lost(10.0)
    b.config = b.config.model_copy(update={"auto_restart": False})
    b.timers.pop("idle_hold", None)
    ev = b.on_timer(69.0)
    assert withdrawn(ev) == 0 and b.prefix_count() == 202
    ev = b.on_timer(70.0)
    assert withdrawn(ev) == 202 and gr_phases(ev) == [("expired", 202)] and b.prefix_count() == 0


def test_a_peer_back_without_forwarding_state_loses_its_stale_routes_at_once() -> None:
    b = established_pair()
    b.connection_lost(10.0)
    now = b.next_deadline() or 15.0
    b.on_timer(now)
    seen = talk(restarting_peer(A, forwarding=False), b, now)
    # flushed on re-establishment (§4.2), then the peer's table arrives afresh
    assert ("flushed", 202) in gr_phases(seen) and withdrawn(seen) == 202
    assert b.state is State.ESTABLISHED and b.prefix_count() == 202 and not b.stale


def test_without_graceful_restart_or_on_a_notification_routes_go_at_once() -> None:
    # APSV without the capability configured: nothing negotiated, withdrawn at the drop
    b = established_pair(b_cfg=B)
    ev = b.connection_lost(10.0)
    assert withdrawn(ev) == 202 and not gr_phases(ev) and b.prefix_count() == 0
    # negotiated, but the session ended by a NOTIFICATION (hold timer): not a restart
    b = established_pair()
    ev = b.on_timer(b.timers["hold"])
    assert withdrawn(ev) == 202 and not gr_phases(ev) and b.prefix_count() == 0 and not b.stale
    # and a stop while routes are stale drops them
    b = established_pair()
    b.connection_lost(10.0)
    ev = b.stop(11.0)
    assert withdrawn(ev) == 202 and ("flushed", 202) in gr_phases(ev)


def test_apsv_announces_itself_as_a_receiving_speaker_only() -> None:
    b = BgpSession(B_GR)
    gr = next(c.parsed() for c in b.local_capabilities if c.code == C.CAP_GRACEFUL_RESTART)
    assert isinstance(gr, GracefulRestart) and gr.restart_time == 120 and gr.families == ()
    assert not any(c.code == C.CAP_GRACEFUL_RESTART for c in BgpSession(B).local_capabilities)
    assert isinstance(Announcement(prefixes=["10.0.0.0/8"]), Announcement)

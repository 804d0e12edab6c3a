"""Long-lived graceful restart, the receiving speaker (RFC 9494): past the peer's restart time its
routes stay for its long-lived stale time (at most the session's `long_lived_stale_time`),
marked LLGR_STALE, and those carrying NO_LLGR go; coming back, the long-lived capability's own
forwarding bit decides, and End-of-RIB sweeps as in RFC 4724."""

from __future__ import annotations

import struct

import pytest
from pydantic import ValidationError

from apsv.bgp import constants as C
from apsv.bgp.capabilities import Capability, LongLivedGracefulRestart, negotiate, parse_capability
from apsv.bgp.config import Announcement, BgpSessionConfig
from apsv.bgp.errors import BgpError
from apsv.bgp.events import RoutesChanged
from apsv.bgp.fsm import State
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import StackEvent
from tests.test_graceful_restart import gr_phases, talk, withdrawn
from tests.test_session import A, B

V4, V6 = (1, 1), (2, 1)
B_LL = B.model_copy(update={"graceful_restart_time": 120, "long_lived_stale_time": 3600})
# the peer: 150 IPv4 routes that may be kept long-lived, 50 marked NO_LLGR, and 2 IPv6
PEER = A.model_copy(
    update={
        "announce": [
            Announcement(prefixes=[f"10.{i}.0.0/16" for i in range(150)], communities=["65001:7"]),
            Announcement(prefixes=[f"10.{i}.0.0/16" for i in range(150, 200)], communities=["65535:7"]),
            A.announce[1],
        ]
    }
)


def llgr_peer(
    cfg: BgpSessionConfig = PEER,
    restart_time: int = 60,
    llst: int = 1000,
    forwarding: bool = True,
    gr_families: tuple[tuple[int, int], ...] | None = None,
) -> BgpSession:
    """A speaker announcing graceful restart (its restart time, for `gr_families`, default all)
    and long-lived graceful restart (`llst` seconds for every family), with the forwarding bit
    when `forwarding`: as FRR does with `bgp long-lived-graceful-restart stale-time`."""
    s = BgpSession(cfg)
    flags = 0x80 if forwarding else 0
    fams = cfg.family_codes if gr_families is None else gr_families
    gr = struct.pack("!H", 0x8000 | restart_time) + b"".join(struct.pack("!HBB", a, sf, flags) for a, sf in fams)
    ll = b"".join(struct.pack("!HBB", a, sf, flags) + llst.to_bytes(3, "big") for a, sf in cfg.family_codes)
    s.local_capabilities = (
        *(c for c in s.local_capabilities if c.code not in (C.CAP_GRACEFUL_RESTART, C.CAP_LONG_LIVED_GR)),
        Capability(C.CAP_GRACEFUL_RESTART, gr),
        Capability(C.CAP_LONG_LIVED_GR, ll),
    )
    return s


def established(peer: BgpSession, cfg: BgpSessionConfig = B_LL) -> BgpSession:
    b = BgpSession(cfg)
    b.start(0.0)
    talk(peer, b, 0.0)
    assert b.state is State.ESTABLISHED and b.prefix_count() == 202
    return b


def down(b: BgpSession, at: float = 10.0) -> list[StackEvent]:
    """The peer's transport lost at `at`; the session stays down (no automatic restart)."""
    ev = b.connection_lost(at)
    b.config = b.config.model_copy(update={"auto_restart": False})
    b.timers.pop("idle_hold", None)
    return ev


def long_lived_then_back(back: BgpSession) -> tuple[BgpSession, list[StackEvent]]:
    """Down at 10 s, long-lived from 70 s (the peer's restart time), `back` at 500 s: the
    session and its events of the re-establishment."""
    b = established(llgr_peer())
    down(b)
    b.on_timer(70.0)
    b.config = b.config.model_copy(update={"auto_restart": True})
    b.start(500.0)
    return b, talk(back, b, 500.0)


def communities(b: BgpSession, fam: tuple[int, int]) -> list[tuple[int, ...]]:
    loc = b.loc_rib[fam]
    out = []
    for prefix in loc.best:
        path = loc.best_path(prefix)
        assert path is not None
        out.append(tuple(path[0].get(C.ATTR_COMMUNITIES) or ()))
    return out


def test_the_capability_is_parsed_negotiated_and_announced_with_no_family() -> None:
    value = struct.pack("!HBB", 1, 1, 0x80) + (86400).to_bytes(3, "big") + struct.pack("!HBB", 2, 1, 0) + b"\0\0\x10"
    assert parse_capability(C.CAP_LONG_LIVED_GR, value) == LongLivedGracefulRestart(
        ((1, 1, 0x80, 86400), (2, 1, 0, 16))
    )
    with pytest.raises(BgpError, match="expected 7\\*k"):
        parse_capability(C.CAP_LONG_LIVED_GR, value[:-1])
    ours = BgpSession(B_LL).local_capabilities
    assert [c.value for c in ours if c.code == C.CAP_LONG_LIVED_GR] == [b""]  # a receiving speaker only
    n = negotiate(ours, llgr_peer().local_capabilities)
    assert n.long_lived and n.llgr_stale_time(V4) == 1000 and n.peer_llgr_forwarding == {V4, V6}
    # not configured here: not announced, and the peer's is not in use
    plain = BgpSession(B.model_copy(update={"graceful_restart_time": 120})).local_capabilities
    assert not any(c.code == C.CAP_LONG_LIVED_GR for c in plain)
    assert not negotiate(plain, llgr_peer().local_capabilities).long_lived
    with pytest.raises(ValidationError, match="long_lived_stale_time needs graceful_restart_time"):
        BgpSessionConfig.model_validate({**B.model_dump(), "long_lived_stale_time": 60})


def test_past_the_restart_time_routes_stay_long_lived_marked_llgr_stale_and_no_llgr_routes_go() -> None:
    b = established(llgr_peer())
    ev = down(b)
    assert withdrawn(ev) == 0 and gr_phases(ev) == [("retained", 202)] and b.timers["gr_restart"] == 70.0
    ev = b.on_timer(70.0)
    # NO_LLGR routes deleted; the rest re-announced to the virtual router carrying LLGR_STALE
    assert withdrawn(ev) == 50 and sorted(gr_phases(ev)) == [("long-lived", 2), ("long-lived", 150)]
    changed = [c.attributes for e in ev if isinstance(e, RoutesChanged) for c in e.changes if c.attributes]
    assert len(changed) == 152
    assert all(C.COMMUNITY_LLGR_STALE in (pa.get(C.ATTR_COMMUNITIES) or ()) for pa in changed)
    assert b.prefix_count() == 152 and len(b.stale) == 152
    assert all(C.COMMUNITY_LLGR_STALE in cs and 65001 << 16 | 7 in cs for cs in communities(b, V4))
    assert b.timers["llgr_stale"] == 1070.0 and "gr_restart" not in b.timers
    assert b.stats()["long_lived_stale_until"] == {"ipv4-unicast": 1070.0, "ipv6-unicast": 1070.0}
    # the state travels with the session
    restored = BgpSession.restore(b.snapshot())
    assert restored.long_lived.until == b.long_lived.until and len(restored.stale) == 152
    assert restored.timers["llgr_stale"] == 1070.0
    for s in (b, restored):
        assert withdrawn(s.on_timer(1069.0)) == 0 and s.prefix_count() == 152
        ev = s.on_timer(1070.0)
        assert withdrawn(ev) == 152 and gr_phases(ev) == [("expired", 152)]
        assert s.prefix_count() == 0 and not s.stale and not s.long_lived and "llgr_stale" not in s.timers


def test_the_long_lived_stale_time_is_the_peers_capped_by_the_session() -> None:
    b = established(llgr_peer(llst=0xFFFFFF), B_LL.model_copy(update={"long_lived_stale_time": 300}))
    b.connection_lost(10.0)
    b.on_timer(70.0)
    assert b.timers["llgr_stale"] == 370.0


def test_a_peer_with_no_restart_time_or_a_family_only_long_lived_goes_long_lived_at_once() -> None:
    b = established(llgr_peer(restart_time=0))
    ev = b.connection_lost(10.0)
    assert ("retained", 202) in gr_phases(ev) and withdrawn(ev) == 50
    assert "gr_restart" not in b.timers and b.timers["llgr_stale"] == 1010.0
    # graceful restart for IPv4 only: IPv6 starts its long-lived time now, IPv4 after 60 s
    b = established(llgr_peer(gr_families=(V4,)))
    ev = down(b)
    assert gr_phases(ev) == [("retained", 202), ("long-lived", 2)] and withdrawn(ev) == 0
    assert b.long_lived.until == {V6: 1010.0} and b.timers["gr_restart"] == 70.0
    ev = b.on_timer(70.0)
    assert gr_phases(ev) == [("long-lived", 150)] and b.long_lived.until == {V6: 1010.0, V4: 1070.0}
    assert withdrawn(b.on_timer(1010.0)) == 2 and b.prefix_count() == 150 and b.timers["llgr_stale"] == 1070.0


def test_back_in_the_long_lived_phase_what_is_sent_again_is_fresh_and_end_of_rib_sweeps_the_rest() -> None:
    back = PEER.model_copy(update={"announce": [PEER.announce[0].model_copy(update={"prefixes": ["10.0.0.0/16"]})]})
    b, seen = long_lived_then_back(llgr_peer(back))
    assert b.state is State.ESTABLISHED and "llgr_stale" not in b.timers and not b.long_lived
    # the one route sent again lost its LLGR_STALE; End-of-RIB swept the other 149 and both IPv6
    assert ("swept", 149) in gr_phases(seen) and ("swept", 2) in gr_phases(seen)
    assert b.prefix_count() == 1 and not b.stale
    assert communities(b, V4) == [(65001 << 16 | 7,)]


def test_back_without_the_long_lived_forwarding_bit_the_stale_routes_go_at_once() -> None:
    b, seen = long_lived_then_back(llgr_peer(forwarding=False))
    assert ("flushed", 152) in gr_phases(seen)
    assert b.state is State.ESTABLISHED and b.prefix_count() == 202 and not b.stale
    assert all(C.COMMUNITY_LLGR_STALE not in cs for cs in communities(b, V4))


def test_without_long_lived_configured_here_the_routes_go_at_the_restart_time() -> None:
    b = established(llgr_peer(), B.model_copy(update={"graceful_restart_time": 120}))
    down(b)
    ev = b.on_timer(70.0)
    assert withdrawn(ev) == 202 and gr_phases(ev) == [("expired", 202)] and not b.long_lived

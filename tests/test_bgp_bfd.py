"""BFD as a BGP session's failure detector (RFC 5882), in the sans-I/O session: a BFD Down tears
the session down at once with Cease / BFD Down, holds it down until BFD is Up, and damps
re-establishment the more often BFD went down; AdminDown is not a failure."""

from __future__ import annotations

from apsv.bgp import constants as C
from apsv.bgp.events import BfdClientEvent, NotificationSent, RoutesChanged
from apsv.bgp.fsm import State
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import StateChanged
from tests.test_graceful_restart import B_GR, established_pair
from tests.test_session import B

DOWN = {
    "op": "bfd",
    "old": "UP",
    "new": "DOWN",
    "reason": "detection time expired (diag CONTROL_DETECTION_TIME_EXPIRED)",
}
UP = {"op": "bfd", "old": "INIT", "new": "UP", "reason": "peer is UP (diag NONE)"}


def test_bfd_down_tears_the_session_down_at_once_and_says_why() -> None:
    # graceful restart negotiated too: a BFD Down is a path failure, nothing is kept stale
    b = established_pair(b_cfg=B_GR)
    ev = b.control(DOWN, 20.0)
    assert b.state is State.IDLE and b.prefix_count() == 0 and not b.stale
    assert sum(1 for e in ev if isinstance(e, RoutesChanged) for c in e.changes if c.attributes is None) == 202
    (n,) = [e for e in ev if isinstance(e, NotificationSent)]
    assert (n.code, n.subcode) == (C.ERR_CEASE, C.CEASE_BFD_DOWN) and "BFD down" in n.reason
    (st,) = [e for e in ev if isinstance(e, StateChanged)]
    assert st.old == "Established" and "BFD down (detection time expired" in st.reason
    assert [e.state for e in ev if isinstance(e, BfdClientEvent)] == ["down"]
    # order: the NOTIFICATION and the withdrawals come with the teardown, before anything else
    kinds = [type(e).__name__ for e in ev]
    assert kinds.index("NotificationSent") < kinds.index("StateChanged")
    # held down until BFD is up again: no automatic restart
    assert "idle_hold" not in b.timers and b.on_timer(1000.0) == [] and b.state is State.IDLE
    assert BgpSession.restore(b.snapshot()).bfd_down


def test_re_establishment_after_bfd_up_is_damped_by_recent_downs() -> None:
    b = established_pair(b_cfg=B)
    base = b.config.idle_hold_time
    b.control(DOWN, 20.0)
    ev = b.control(UP, 21.0)
    assert [(e.state, e.hold_s) for e in ev if isinstance(e, BfdClientEvent)] == [("up", base)]
    assert b.timers["idle_hold"] == 21.0 + base
    b.control({**DOWN, "old": "UP"}, 30.0)  # (from Idle: counted, nothing to tear down)
    ev = b.control(UP, 31.0)
    assert b.timers["idle_hold"] == 31.0 + 2 * base
    b.control(DOWN, 40.0)
    b.control(UP, 41.0)
    assert b.timers["idle_hold"] == 41.0 + 4 * base
    # downs older than the flap window no longer count
    b.control(DOWN, 2000.0)
    b.control(UP, 2001.0)
    assert b.timers["idle_hold"] == 2001.0 + base


def test_admin_down_is_not_a_path_failure() -> None:
    b = established_pair(b_cfg=B)
    for reason in ("peer is ADMIN_DOWN (diag NEIGHBOR_SIGNALED_SESSION_DOWN)",):
        ev = b.control({"op": "bfd", "old": "UP", "new": "DOWN", "reason": reason}, 20.0)
        assert b.state is State.ESTABLISHED and ev == []
    ev = b.control({"op": "bfd", "old": "UP", "new": "ADMIN_DOWN", "reason": "administratively down"}, 21.0)
    assert b.state is State.ESTABLISHED and ev == [] and not b.bfd_down

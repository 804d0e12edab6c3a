"""Every RFC 4271 FSM event in every state, driven through a real BgpSession; timers on a fake clock.

The expectations below are written out from RFC 4271 §8.2.2 (with RFC 6608 subcodes), not
derived from apsv.bgp.fsm, so the test checks the table rather than restating it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from apsv.bgp import constants as C
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.events import NotificationSent
from apsv.bgp.framing import MessageReader
from apsv.bgp.fsm import TRANSITIONS, Action, Event, State
from apsv.bgp.message import (
    Keepalive,
    Message,
    Notification,
    Open,
    Update,
    decode_message,
    encode_message,
)
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import CloseTransport, OpenTransport, Send

S, E = State, Event
IGNORE = "ignore"
STARTS = {1, 3, 4, 5, 6, 7}

# (state, event) -> (next state, NOTIFICATION sent or None, ConnectRetryCounter: "+1", "0" or "=")
# NOTIFICATION: "cease" (6/x), "hold" (4/0), "fsm" (5/x, RFC 6608 subcode by state), "error" (the event's own).


Outcome = tuple[State, str | None, str]


def expected(state: State, ev: int) -> Outcome:
    if state is S.IDLE:
        if ev in (1, 3, 6):
            return S.CONNECT, None, "0"
        if ev in (4, 5, 7):
            return S.ACTIVE, None, "0"
        return S.IDLE, None, "="
    if ev in STARTS:
        return state, None, "="
    if state in (S.CONNECT, S.ACTIVE):
        if ev == 2:
            return S.IDLE, None, "0"
        if ev == 9:
            return S.CONNECT, None, "="
        if ev in (12, 16, 17):
            return S.OPENSENT, None, "="
        if ev in (14, 15):
            return state, None, "="
        if ev == 20:
            return S.OPENCONFIRM, None, "="
        if ev == 18:
            return S.IDLE, None, "=" if state is S.CONNECT else "+1"
        return S.IDLE, None, "+1"  # 21, 22, 24 and every other event
    if state is S.OPENSENT:
        table: dict[int, Outcome] = {2: (S.IDLE, "cease", "0"), 8: (S.IDLE, "cease", "+1"), 10: (S.IDLE, "hold", "+1")}
        table.update({14: (state, None, "="), 15: (state, None, "="), 16: (state, None, "="), 17: (state, None, "=")})
        table.update({18: (S.ACTIVE, None, "="), 19: (S.OPENCONFIRM, None, "="), 21: (S.IDLE, "error", "+1")})
        table.update({22: (S.IDLE, "error", "+1"), 23: (S.IDLE, "cease", "+1"), 24: (S.IDLE, None, "=")})
        return table.get(ev, (S.IDLE, "fsm", "+1"))
    if state is S.OPENCONFIRM:
        table = {2: (S.IDLE, "cease", "0"), 8: (S.IDLE, "cease", "+1"), 10: (S.IDLE, "hold", "+1")}
        table.update({11: (state, None, "="), 14: (state, None, "="), 15: (state, None, "="), 16: (state, None, "=")})
        table.update({17: (state, None, "="), 18: (S.IDLE, None, "+1"), 25: (S.IDLE, None, "+1")})
        table.update({24: (S.IDLE, None, "="), 21: (S.IDLE, "error", "+1"), 22: (S.IDLE, "error", "+1")})
        table.update({23: (S.IDLE, "cease", "+1"), 26: (S.ESTABLISHED, None, "=")})
        return table.get(ev, (S.IDLE, "fsm", "+1"))
    # Established (21/22: the §6 error code, see apsv.bgp.fsm)
    table = {2: (S.IDLE, "cease", "0"), 8: (S.IDLE, "cease", "+1"), 10: (S.IDLE, "hold", "+1")}
    table.update({11: (state, None, "="), 14: (state, None, "="), 15: (state, None, "="), 16: (state, None, "=")})
    table.update({17: (state, None, "="), 18: (S.IDLE, None, "+1"), 24: (S.IDLE, None, "+1"), 25: (S.IDLE, None, "+1")})
    table.update({23: (S.IDLE, "cease", "+1"), 26: (state, None, "="), 27: (state, None, "="), 29: (state, None, "=")})
    table.update({28: (S.IDLE, "error", "+1"), 21: (S.IDLE, "error", "+1"), 22: (S.IDLE, "error", "+1")})
    return table.get(ev, (S.IDLE, "fsm", "+1"))


CFG = BgpSessionConfig(
    local_as=65001, router_id="192.0.2.1", peer_as=65002, peer_address="198.51.100.2", hold_time=90, auto_restart=False
)


def session_in(state: State) -> BgpSession:
    s = BgpSession(CFG)
    if state is not S.IDLE:
        s.start(0.0)
        if state is S.ACTIVE:
            s = BgpSession(CFG.model_copy(update={"passive": True}))
            s.start(0.0)
        if state in (S.OPENSENT, S.OPENCONFIRM, S.ESTABLISHED):
            s.connection_made(0.0)
        if state in (S.OPENCONFIRM, S.ESTABLISHED):
            peer_open = Open(65002, 90, "198.51.100.2", ())
            s.data_received(encode_message(peer_open), 0.0)
        if state is S.ESTABLISHED:
            s.data_received(encode_message(Keepalive()), 0.0)
    assert s.state is state
    s.connect_retry_counter = 5
    return s


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("ev", list(range(1, 30)))
def test_every_event_in_every_state(state: State, ev: int) -> None:
    s = session_in(state)
    if ev in (21, 22, 28):  # these events carry the error that caused them
        s._error = __import__("apsv.bgp.errors", fromlist=["BgpError"]).BgpError(3, 1, b"", "test")
    out = s.handle_event(1.0, Event(ev))
    nxt, notify, counter = expected(state, ev)
    assert s.state is nxt, f"{state.value} + event {ev}"
    sent = [e for e in out if isinstance(e, NotificationSent)]
    if notify is None:
        assert not sent
    else:
        (n,) = sent
        want = {
            "cease": (6, None),
            "hold": (4, 0),
            "fsm": (5, {S.OPENSENT: 1, S.OPENCONFIRM: 2, S.ESTABLISHED: 3}.get(state)),
            "error": (3, 1),
        }[notify]
        assert n.code == want[0] and (want[1] is None or n.subcode == want[1])
    assert s.connect_retry_counter == {"+1": 6, "0": 0, "=": 5}[counter]
    if nxt is S.IDLE and state is not S.IDLE:
        assert any(isinstance(e, CloseTransport) for e in out) or state is S.ACTIVE or not s.connected


def test_table_reaches_every_state_and_every_way_down_releases_the_connection() -> None:
    """Properties the table is written to have, which a wrong row breaks: every state is
    reachable from Idle; every action is used somewhere (none is dead); a ManualStop returns
    every state to Idle; and every row that leaves an open connection (OpenSent, OpenConfirm,
    Established) for Idle drops it and releases its resources, in one step."""
    seen, frontier = {State.IDLE}, [State.IDLE]
    while frontier:
        s = frontier.pop()
        for ev in Event:
            nxt = TRANSITIONS[(s, ev)][1]
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(State)
    used = {a for actions, _ in TRANSITIONS.values() for a in actions}
    assert used == set(Action), set(Action) - used
    assert all(TRANSITIONS[(s, Event.MANUAL_STOP)][1] is State.IDLE for s in State)
    for s in (State.OPENSENT, State.OPENCONFIRM, State.ESTABLISHED):
        for ev in Event:
            actions, nxt = TRANSITIONS[(s, ev)]
            if nxt is State.IDLE:
                assert {Action.DROP_TCP, Action.RELEASE_RESOURCES} <= set(actions), (s, ev)


# ------------------------------------------------------------------------------------------------
# Timers on a fake clock


def messages(events: Sequence[object]) -> list[Message]:
    r = MessageReader()
    for e in events:
        if isinstance(e, Send):
            r.feed(e.data)
    out: list[Message] = []
    while (m := r.next_message()) is not None:
        out.append(decode_message(*m))
    return out


def test_keepalives_every_third_of_the_hold_time_and_hold_expiry() -> None:
    s = session_in(S.ESTABLISHED)
    assert s.hold_time == 90 and s.keepalive_time == 30
    ka = [t for t in range(1, 90) if any(isinstance(m, Keepalive) for m in messages(s.on_timer(float(t))))]
    assert ka == [30, 60]
    out = s.on_timer(90.0)  # nothing heard from the peer for a hold time
    assert s.state is S.IDLE
    (n,) = [m for m in messages(out) if isinstance(m, Notification)]
    assert (n.code, n.subcode) == (C.ERR_HOLD_TIMER_EXPIRED, 0)


def test_receiving_resets_the_hold_timer() -> None:
    s = session_in(S.ESTABLISHED)
    for t in range(10, 400, 10):
        s.on_timer(float(t))
        s.data_received(encode_message(Keepalive()), float(t))
    assert s.state is S.ESTABLISHED


def test_connect_retry_and_large_hold_timer() -> None:
    s = BgpSession(CFG)
    out = s.start(0.0)
    assert any(isinstance(e, OpenTransport) for e in out) and s.next_deadline() == 120.0
    out = s.on_timer(120.0)  # ConnectRetryTimer: try again
    assert s.state is S.CONNECT and any(isinstance(e, OpenTransport) for e in out)
    s.connection_made(130.0)
    assert s.state is S.OPENSENT and s.timers["hold"] == 130.0 + 240.0  # "a large value"
    s.on_timer(370.0)
    assert s.state is S.IDLE


def test_automatic_restart_backs_off() -> None:
    s = BgpSession(CFG.model_copy(update={"auto_restart": True, "idle_hold_time": 1.0}))
    s.start(0.0)
    restarts = []
    now = 0.0
    for _ in range(4):
        s.connection_lost(now)  # Connect -> Idle, IdleHoldTimer
        assert s.state is S.IDLE
        now = s.next_deadline() or 0.0
        restarts.append(now)
        s.on_timer(now)
        assert s.state is S.CONNECT
    gaps = [b - a for a, b in itertools.pairwise(restarts)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]


def test_hold_time_zero_means_no_keepalives() -> None:
    s = BgpSession(CFG.model_copy(update={"hold_time": 0}))
    s.start(0.0)
    s.connection_made(0.0)
    s.data_received(encode_message(Open(65002, 0, "198.51.100.2", ())) + encode_message(Keepalive()), 0.0)
    assert s.state is S.ESTABLISHED and s.next_deadline() is None


def test_unexpected_update_in_opensent_is_fsm_error_with_type() -> None:
    s = session_in(S.OPENSENT)
    out = s.data_received(encode_message(Update()), 1.0)
    (n,) = [m for m in messages(out) if isinstance(m, Notification)]
    assert (n.code, n.subcode, n.data) == (5, 1, bytes((C.MSG_UPDATE,)))

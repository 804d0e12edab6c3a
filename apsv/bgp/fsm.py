"""The RFC 4271 §8 finite state machine as one table: (state, event) -> (actions, next state).

Every one of the 28 events has an entry in every one of the 6 states, written out from
§8.2.2 (including each state's "any other event" rule), so `TRANSITIONS` is total and a
lookup never falls through. The session (`apsv.bgp.session`) performs the actions; this module
only says which, in which order. Optional session attributes APSV does not implement
(DelayOpen, DampPeerOscillations, SendNOTIFICATIONwithoutOPEN, CollisionDetectEstablishedState,
TrackTcpState) are FALSE, which is what selects the rows below.

Two deliberate choices: in Established, Events 21/22 send the header/OPEN error of §6.1/§6.2
rather than §8.2.2's FSM Error; and Events 12 and 20, which need a DelayOpenTimer APSV never
starts, still have the RFC's rows.

Event 29 (RouteRefreshMsg) is APSV's addition: RFC 2918 gives ROUTE-REFRESH no FSM event; it
is handled in Established and, elsewhere, exactly like an UpdateMsg arriving in that state.
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.Enum):
    IDLE = "Idle"
    CONNECT = "Connect"
    ACTIVE = "Active"
    OPENSENT = "OpenSent"
    OPENCONFIRM = "OpenConfirm"
    ESTABLISHED = "Established"


class Event(enum.IntEnum):
    MANUAL_START = 1
    MANUAL_STOP = 2
    AUTOMATIC_START = 3
    MANUAL_START_PASSIVE = 4
    AUTOMATIC_START_PASSIVE = 5
    AUTOMATIC_START_DAMP = 6
    AUTOMATIC_START_DAMP_PASSIVE = 7
    AUTOMATIC_STOP = 8
    CONNECT_RETRY_TIMER_EXPIRES = 9
    HOLD_TIMER_EXPIRES = 10
    KEEPALIVE_TIMER_EXPIRES = 11
    DELAY_OPEN_TIMER_EXPIRES = 12
    IDLE_HOLD_TIMER_EXPIRES = 13
    TCP_CONNECTION_VALID = 14
    TCP_CR_INVALID = 15
    TCP_CR_ACKED = 16
    TCP_CONNECTION_CONFIRMED = 17
    TCP_CONNECTION_FAILS = 18
    BGP_OPEN = 19
    BGP_OPEN_DELAY_OPEN = 20
    BGP_HEADER_ERR = 21
    BGP_OPEN_MSG_ERR = 22
    OPEN_COLLISION_DUMP = 23
    NOTIF_MSG_VER_ERR = 24
    NOTIF_MSG = 25
    KEEPALIVE_MSG = 26
    UPDATE_MSG = 27
    UPDATE_MSG_ERR = 28
    ROUTE_REFRESH_MSG = 29  # APSV: see the module docstring


class Action(enum.Enum):
    INIT_RESOURCES = "initialize resources"
    RELEASE_RESOURCES = "release resources"
    DELETE_ROUTES = "delete routes learned on the connection"
    COUNTER_RESET = "ConnectRetryCounter := 0"
    COUNTER_INCR = "ConnectRetryCounter += 1"
    CONNECT_RETRY_START = "(re)start ConnectRetryTimer"
    CONNECT_RETRY_STOP = "stop ConnectRetryTimer, set to 0"
    INITIATE_TCP = "initiate a TCP connection to the peer"
    LISTEN = "listen for a connection from the peer"
    DROP_TCP = "drop the TCP connection"
    SEND_OPEN = "send OPEN"
    SEND_KEEPALIVE = "send KEEPALIVE"
    NOTIFY_CEASE = "send NOTIFICATION Cease"
    NOTIFY_HOLD_EXPIRED = "send NOTIFICATION Hold Timer Expired"
    NOTIFY_FSM_ERROR = "send NOTIFICATION Finite State Machine Error"
    NOTIFY_ERROR = "send NOTIFICATION with the error that raised the event"
    HOLD_TIMER_LARGE = "set HoldTimer to a large value (4 minutes)"
    NEGOTIATED_TIMERS = "set HoldTimer and KeepaliveTimer to the negotiated values"
    HOLD_TIMER_RESTART = "restart HoldTimer (if the negotiated hold time is not 0)"
    KEEPALIVE_TIMER_RESTART = "restart KeepaliveTimer"
    PROCESS_UPDATE = "process the UPDATE"
    PROCESS_ROUTE_REFRESH = "re-advertise the Adj-RIB-Out"
    ESTABLISHED = "session established: advertise routes"
    IDLE_HOLD_START = "start IdleHoldTimer for an automatic restart"


S = State
E = Event
A = Action

_STARTS = (E.MANUAL_START, E.AUTOMATIC_START, E.AUTOMATIC_START_DAMP)
_PASSIVE_STARTS = (E.MANUAL_START_PASSIVE, E.AUTOMATIC_START_PASSIVE, E.AUTOMATIC_START_DAMP_PASSIVE)
_ALL_STARTS = _STARTS + _PASSIVE_STARTS

Row = tuple[tuple[Action, ...], State]


def _idle() -> dict[Event, Row]:
    rows: dict[Event, Row] = {}
    active = (A.INIT_RESOURCES, A.COUNTER_RESET, A.CONNECT_RETRY_START, A.INITIATE_TCP, A.LISTEN)
    passive = (A.INIT_RESOURCES, A.COUNTER_RESET, A.CONNECT_RETRY_START, A.LISTEN)
    for ev in _STARTS:
        rows[ev] = (active, S.CONNECT)
    for ev in _PASSIVE_STARTS:
        rows[ev] = (passive, S.ACTIVE)
    # IdleHoldTimer expiry is the automatic restart after an error (DampPeerOscillations-like
    # back-off); the session turns it into Event 3 or 5 according to its passive setting.
    # §8.2.2 Idle "refuses all incoming BGP connections for this peer": a connection that
    # arrives anyway (the transport is outside the FSM) is dropped, so the peer retries later.
    for ev in (E.TCP_CR_ACKED, E.TCP_CONNECTION_CONFIRMED):
        rows[ev] = ((A.DROP_TCP,), S.IDLE)
    for ev in Event:
        rows.setdefault(ev, ((), S.IDLE))  # §8.2.2 Idle: every other event is ignored
    return rows


# §8.2.2 Connect/Active, Event 20: the peer's OPEN arrived while our OPEN was being delayed.
_OPEN_WHILE_DELAYED: Row = (
    (Action.CONNECT_RETRY_STOP, Action.SEND_OPEN, Action.SEND_KEEPALIVE, Action.NEGOTIATED_TIMERS),
    State.OPENCONFIRM,
)

# "Release, drop, count, go Idle" - the shape most error rows share.
_TO_IDLE = (A.CONNECT_RETRY_STOP, A.RELEASE_RESOURCES, A.DROP_TCP, A.COUNTER_INCR, A.IDLE_HOLD_START)


def _connect() -> dict[Event, Row]:
    rows: dict[Event, Row] = {ev: ((), S.CONNECT) for ev in _ALL_STARTS}
    rows[E.MANUAL_STOP] = ((A.DROP_TCP, A.RELEASE_RESOURCES, A.COUNTER_RESET, A.CONNECT_RETRY_STOP), S.IDLE)
    rows[E.CONNECT_RETRY_TIMER_EXPIRES] = ((A.DROP_TCP, A.CONNECT_RETRY_START, A.INITIATE_TCP), S.CONNECT)
    rows[E.TCP_CONNECTION_VALID] = ((), S.CONNECT)
    rows[E.TCP_CR_INVALID] = ((), S.CONNECT)
    for ev in (E.TCP_CR_ACKED, E.TCP_CONNECTION_CONFIRMED, E.DELAY_OPEN_TIMER_EXPIRES):
        rows[ev] = ((A.CONNECT_RETRY_STOP, A.SEND_OPEN, A.HOLD_TIMER_LARGE), S.OPENSENT)
    rows[E.BGP_OPEN_DELAY_OPEN] = _OPEN_WHILE_DELAYED
    # DelayOpenTimer is never running, so a failed connection goes to Idle.
    rows[E.TCP_CONNECTION_FAILS] = ((A.CONNECT_RETRY_STOP, A.DROP_TCP, A.RELEASE_RESOURCES, A.IDLE_HOLD_START), S.IDLE)
    for ev in (E.BGP_HEADER_ERR, E.BGP_OPEN_MSG_ERR):
        rows[ev] = (_TO_IDLE, S.IDLE)
    rows[E.NOTIF_MSG_VER_ERR] = (_TO_IDLE, S.IDLE)
    for ev in Event:
        rows.setdefault(ev, (_TO_IDLE, S.IDLE))  # any other event
    return rows


def _active() -> dict[Event, Row]:
    rows: dict[Event, Row] = {ev: ((), S.ACTIVE) for ev in _ALL_STARTS}
    rows[E.MANUAL_STOP] = ((A.RELEASE_RESOURCES, A.DROP_TCP, A.COUNTER_RESET, A.CONNECT_RETRY_STOP), S.IDLE)
    rows[E.CONNECT_RETRY_TIMER_EXPIRES] = ((A.CONNECT_RETRY_START, A.INITIATE_TCP), S.CONNECT)
    rows[E.TCP_CONNECTION_VALID] = ((), S.ACTIVE)
    rows[E.TCP_CR_INVALID] = ((), S.ACTIVE)
    for ev in (E.TCP_CR_ACKED, E.TCP_CONNECTION_CONFIRMED, E.DELAY_OPEN_TIMER_EXPIRES):
        rows[ev] = ((A.CONNECT_RETRY_STOP, A.SEND_OPEN, A.HOLD_TIMER_LARGE), S.OPENSENT)
    rows[E.BGP_OPEN_DELAY_OPEN] = _OPEN_WHILE_DELAYED
    rows[E.TCP_CONNECTION_FAILS] = (
        (A.CONNECT_RETRY_START, A.RELEASE_RESOURCES, A.COUNTER_INCR, A.IDLE_HOLD_START),
        S.IDLE,
    )
    for ev in (E.BGP_HEADER_ERR, E.BGP_OPEN_MSG_ERR):
        rows[ev] = (_TO_IDLE, S.IDLE)
    rows[E.NOTIF_MSG_VER_ERR] = (_TO_IDLE, S.IDLE)
    for ev in Event:
        rows.setdefault(ev, (_TO_IDLE, S.IDLE))
    return rows


def _opensent() -> dict[Event, Row]:
    rows: dict[Event, Row] = {ev: ((), S.OPENSENT) for ev in _ALL_STARTS}
    rows[E.MANUAL_STOP] = (
        (A.NOTIFY_CEASE, A.CONNECT_RETRY_STOP, A.RELEASE_RESOURCES, A.DROP_TCP, A.COUNTER_RESET),
        S.IDLE,
    )
    rows[E.AUTOMATIC_STOP] = ((A.NOTIFY_CEASE, *_TO_IDLE), S.IDLE)
    rows[E.HOLD_TIMER_EXPIRES] = ((A.NOTIFY_HOLD_EXPIRED, *_TO_IDLE), S.IDLE)
    for ev in (E.TCP_CONNECTION_VALID, E.TCP_CR_ACKED, E.TCP_CONNECTION_CONFIRMED, E.TCP_CR_INVALID):
        rows[ev] = ((), S.OPENSENT)  # a second connection: collision tracking
    rows[E.TCP_CONNECTION_FAILS] = ((A.DROP_TCP, A.CONNECT_RETRY_START, A.LISTEN), S.ACTIVE)
    rows[E.BGP_OPEN] = ((A.CONNECT_RETRY_STOP, A.SEND_KEEPALIVE, A.NEGOTIATED_TIMERS), S.OPENCONFIRM)
    for ev in (E.BGP_HEADER_ERR, E.BGP_OPEN_MSG_ERR):
        rows[ev] = ((A.NOTIFY_ERROR, *_TO_IDLE), S.IDLE)
    rows[E.OPEN_COLLISION_DUMP] = ((A.NOTIFY_CEASE, *_TO_IDLE), S.IDLE)
    rows[E.NOTIF_MSG_VER_ERR] = ((A.CONNECT_RETRY_STOP, A.RELEASE_RESOURCES, A.DROP_TCP, A.IDLE_HOLD_START), S.IDLE)
    for ev in Event:
        rows.setdefault(ev, ((A.NOTIFY_FSM_ERROR, *_TO_IDLE), S.IDLE))
    return rows


def _openconfirm() -> dict[Event, Row]:
    rows: dict[Event, Row] = {ev: ((), S.OPENCONFIRM) for ev in _ALL_STARTS}
    rows[E.MANUAL_STOP] = (
        (A.NOTIFY_CEASE, A.RELEASE_RESOURCES, A.DROP_TCP, A.COUNTER_RESET, A.CONNECT_RETRY_STOP),
        S.IDLE,
    )
    rows[E.AUTOMATIC_STOP] = ((A.NOTIFY_CEASE, *_TO_IDLE), S.IDLE)
    rows[E.HOLD_TIMER_EXPIRES] = ((A.NOTIFY_HOLD_EXPIRED, *_TO_IDLE), S.IDLE)
    rows[E.KEEPALIVE_TIMER_EXPIRES] = ((A.SEND_KEEPALIVE, A.KEEPALIVE_TIMER_RESTART), S.OPENCONFIRM)
    for ev in (E.TCP_CONNECTION_VALID, E.TCP_CR_ACKED, E.TCP_CONNECTION_CONFIRMED, E.TCP_CR_INVALID):
        rows[ev] = ((), S.OPENCONFIRM)
    for ev in (E.TCP_CONNECTION_FAILS, E.NOTIF_MSG):
        rows[ev] = (_TO_IDLE, S.IDLE)
    rows[E.NOTIF_MSG_VER_ERR] = ((A.CONNECT_RETRY_STOP, A.RELEASE_RESOURCES, A.DROP_TCP, A.IDLE_HOLD_START), S.IDLE)
    for ev in (E.BGP_HEADER_ERR, E.BGP_OPEN_MSG_ERR):
        rows[ev] = ((A.NOTIFY_ERROR, *_TO_IDLE), S.IDLE)
    rows[E.OPEN_COLLISION_DUMP] = ((A.NOTIFY_CEASE, *_TO_IDLE), S.IDLE)
    rows[E.KEEPALIVE_MSG] = ((A.HOLD_TIMER_RESTART, A.ESTABLISHED), S.ESTABLISHED)
    for ev in Event:
        rows.setdefault(ev, ((A.NOTIFY_FSM_ERROR, *_TO_IDLE), S.IDLE))
    return rows


def _established() -> dict[Event, Row]:
    down = (A.CONNECT_RETRY_STOP, A.DELETE_ROUTES, A.RELEASE_RESOURCES, A.DROP_TCP, A.COUNTER_INCR, A.IDLE_HOLD_START)
    rows: dict[Event, Row] = {ev: ((), S.ESTABLISHED) for ev in _ALL_STARTS}
    rows[E.MANUAL_STOP] = (
        (
            A.NOTIFY_CEASE,
            A.CONNECT_RETRY_STOP,
            A.DELETE_ROUTES,
            A.RELEASE_RESOURCES,
            A.DROP_TCP,
            A.COUNTER_RESET,
        ),
        S.IDLE,
    )
    rows[E.AUTOMATIC_STOP] = ((A.NOTIFY_CEASE, *down), S.IDLE)
    rows[E.HOLD_TIMER_EXPIRES] = ((A.NOTIFY_HOLD_EXPIRED, *down), S.IDLE)
    rows[E.KEEPALIVE_TIMER_EXPIRES] = ((A.SEND_KEEPALIVE, A.KEEPALIVE_TIMER_RESTART), S.ESTABLISHED)
    for ev in (E.TCP_CONNECTION_VALID, E.TCP_CR_ACKED, E.TCP_CONNECTION_CONFIRMED, E.TCP_CR_INVALID):
        rows[ev] = ((), S.ESTABLISHED)
    for ev in (E.TCP_CONNECTION_FAILS, E.NOTIF_MSG_VER_ERR, E.NOTIF_MSG):
        rows[ev] = (down, S.IDLE)
    rows[E.OPEN_COLLISION_DUMP] = ((A.NOTIFY_CEASE, *down), S.IDLE)
    rows[E.KEEPALIVE_MSG] = ((A.HOLD_TIMER_RESTART,), S.ESTABLISHED)
    rows[E.UPDATE_MSG] = ((A.PROCESS_UPDATE, A.HOLD_TIMER_RESTART), S.ESTABLISHED)
    rows[E.ROUTE_REFRESH_MSG] = ((A.PROCESS_ROUTE_REFRESH, A.HOLD_TIMER_RESTART), S.ESTABLISHED)
    rows[E.UPDATE_MSG_ERR] = ((A.NOTIFY_ERROR, *down), S.IDLE)
    # §8.2.2 lists Events 21 and 22 among Established's "other events" (FSM Error), but §6.1
    # and §6.2 name the NOTIFICATION for the error itself; APSV sends that, the more useful code.
    rows[E.BGP_HEADER_ERR] = ((A.NOTIFY_ERROR, *down), S.IDLE)
    rows[E.BGP_OPEN_MSG_ERR] = ((A.NOTIFY_ERROR, *down), S.IDLE)
    for ev in Event:
        rows.setdefault(ev, ((A.NOTIFY_FSM_ERROR, *down), S.IDLE))
    return rows


TRANSITIONS: Final[dict[tuple[State, Event], Row]] = {
    (state, ev): row
    for state, table in (
        (S.IDLE, _idle()),
        (S.CONNECT, _connect()),
        (S.ACTIVE, _active()),
        (S.OPENSENT, _opensent()),
        (S.OPENCONFIRM, _openconfirm()),
        (S.ESTABLISHED, _established()),
    )
    for ev, row in table.items()
}


def transition(state: State, event: Event) -> Row:
    """(actions, next state) for `event` in `state`. Total over State x Event."""
    return TRANSITIONS[(state, event)]


# RFC 6608 subcodes of the FSM error NOTIFICATION, by the state the unexpected event hit.
FSM_ERROR_SUBCODE: Final = {S.OPENSENT: 1, S.OPENCONFIRM: 2, S.ESTABLISHED: 3}

"""The FSM's actions (RFC 4271 §8), performed on a session: one handler per `Action`, and
`PERFORM`, the one table from action to handler. Each handler takes the session and the state
the event found it in."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from apsv.bgp import constants as C
from apsv.bgp.events import NotificationSent
from apsv.bgp.framing import MessageReader
from apsv.bgp.fsm import FSM_ERROR_SUBCODE, Action, State
from apsv.bgp.message import KEEPALIVE_BYTES, Notification, encode_message
from apsv.bgp.session import adj_rib_out, receive, updates
from apsv.bgp.session.common import LARGE_HOLD_TIME
from apsv.stacks.interface import CloseTransport, OpenTransport

if TYPE_CHECKING:
    from apsv.bgp.session.core import BgpSession


def process_update(s: BgpSession, state: State) -> None:
    u, s._update = s._update, None
    if u is not None:
        updates.process_update(s, u)


def restart_hold_timer(s: BgpSession, state: State) -> None:
    if s.hold_time:
        s.timers["hold"] = s._now + s.hold_time


def restart_keepalive_timer(s: BgpSession, state: State) -> None:
    if s.keepalive_time:
        s.timers["keepalive"] = s._now + s.keepalive_time


def reset_connection(s: BgpSession, state: State) -> None:
    """Forget the connection: its partial message, what was negotiated, its timers."""
    s._reader = MessageReader(C.MAX_MESSAGE_LEN)
    s.negotiated = None
    s.peer_open = None
    s.hold_time = 0
    s.keepalive_time = 0.0
    s.timers.pop("hold", None)
    s.timers.pop("keepalive", None)


def reset_connect_retry_counter(s: BgpSession, state: State) -> None:
    s.connect_retry_counter = 0


def count_connect_retry(s: BgpSession, state: State) -> None:
    s.connect_retry_counter += 1


def start_connect_retry_timer(s: BgpSession, state: State) -> None:
    s.timers["connect_retry"] = s._now + s.config.connect_retry_time


def stop_connect_retry_timer(s: BgpSession, state: State) -> None:
    s.timers.pop("connect_retry", None)


def open_transport(s: BgpSession, state: State) -> None:
    if not s.config.passive:
        s._out_flush_writes()
        s._out.append(OpenTransport())


def close_transport(s: BgpSession, state: State) -> None:
    s._out_flush_writes()
    if s.connected:
        s._out.append(CloseTransport(f"BGP FSM in {state.value}"))
    s.connected = False


def send_open(s: BgpSession, state: State) -> None:
    s._write(encode_message(receive.open_message(s)))
    s.counters["opens_sent"] += 1


def send_keepalive(s: BgpSession, state: State) -> None:
    s._write(KEEPALIVE_BYTES)
    s.counters["keepalives_sent"] += 1


def notify(s: BgpSession, code: int, subcode: int, data: bytes, reason: str) -> None:
    """Send a NOTIFICATION, after what was written before it, and tell the runtime why."""
    s.counters[f"notifications_sent_{code}_{subcode}"] += 1
    s._write(encode_message(Notification(code, subcode, data)))
    s._out_flush_writes()
    s._out.append(NotificationSent(code, subcode, reason))


def notify_cease(s: BgpSession, state: State) -> None:
    notify(s, C.ERR_CEASE, s._cease_subcode, s._cease_data, s._why or "cease")
    s._cease_subcode, s._cease_data = C.CEASE_ADMIN_SHUTDOWN, b""


def notify_hold_expired(s: BgpSession, state: State) -> None:
    notify(s, C.ERR_HOLD_TIMER_EXPIRED, 0, b"", "hold timer expired")


def notify_fsm_error(s: BgpSession, state: State) -> None:
    # RFC 6608: the data is the type of the unexpected message, when a message caused it.
    mt, s._msg_type = s._msg_type, 0
    notify(
        s,
        C.ERR_FSM,
        FSM_ERROR_SUBCODE.get(state, 0),
        bytes((mt,)) if mt else b"",
        f"unexpected {C.MESSAGE_NAMES.get(mt, 'event')} in {state.value}",
    )


def notify_error(s: BgpSession, state: State) -> None:
    err = s._error
    if err is not None:
        notify(s, err.code, err.subcode, err.data, err.reason)
        s._error = None


def set_large_hold_timer(s: BgpSession, state: State) -> None:
    s.timers["hold"] = s._now + LARGE_HOLD_TIME


def set_negotiated_timers(s: BgpSession, state: State) -> None:
    if s.hold_time:
        s.timers["hold"] = s._now + s.hold_time
        s.timers["keepalive"] = s._now + s.keepalive_time
    else:
        s.timers.pop("hold", None)
        s.timers.pop("keepalive", None)


def process_route_refresh(s: BgpSession, state: State) -> None:
    rr, s._refresh = s._refresh, None
    n = s.negotiated
    # RFC 2918: refresh a family we negotiated; RFC 7313: BoRR/EoRR and unknown
    # subtypes from the peer ask nothing of us.
    if rr is not None and rr.subtype == 0 and n is not None and (rr.afi, rr.safi) in n.families:
        adj_rib_out.readvertise(s, (rr.afi, rr.safi))
    elif rr is not None:
        s.counters["route_refresh_ignored"] += 1


def start_idle_hold_timer(s: BgpSession, state: State) -> None:
    if s.config.auto_restart:
        s.timers["idle_hold"] = s._now + s.idle_hold
        s.idle_hold = min(max(s.idle_hold * 2, 1.0), s.config.max_idle_hold_time)


def nothing(s: BgpSession, state: State) -> None:
    pass


PERFORM: dict[Action, Callable[[BgpSession, State], None]] = {
    Action.INIT_RESOURCES: reset_connection,
    Action.RELEASE_RESOURCES: reset_connection,
    Action.DELETE_ROUTES: updates.delete_routes,
    Action.COUNTER_RESET: reset_connect_retry_counter,
    Action.COUNTER_INCR: count_connect_retry,
    Action.CONNECT_RETRY_START: start_connect_retry_timer,
    Action.CONNECT_RETRY_STOP: stop_connect_retry_timer,
    Action.INITIATE_TCP: open_transport,
    Action.LISTEN: nothing,  # the agent accepts connections from the peer's address on our behalf
    Action.DROP_TCP: close_transport,
    Action.SEND_OPEN: send_open,
    Action.SEND_KEEPALIVE: send_keepalive,
    Action.NOTIFY_CEASE: notify_cease,
    Action.NOTIFY_HOLD_EXPIRED: notify_hold_expired,
    Action.NOTIFY_FSM_ERROR: notify_fsm_error,
    Action.NOTIFY_ERROR: notify_error,
    Action.HOLD_TIMER_LARGE: set_large_hold_timer,
    Action.NEGOTIATED_TIMERS: set_negotiated_timers,
    Action.HOLD_TIMER_RESTART: restart_hold_timer,
    Action.KEEPALIVE_TIMER_RESTART: restart_keepalive_timer,
    Action.PROCESS_UPDATE: process_update,
    Action.PROCESS_ROUTE_REFRESH: process_route_refresh,
    Action.ESTABLISHED: nothing,  # done once the state has changed (BgpSession._on_established)
    Action.IDLE_HOLD_START: start_idle_hold_timer,
}
# every action a transition can name has its handler: a missing one would fail mid-event
assert PERFORM.keys() == set(Action), set(Action) - PERFORM.keys()

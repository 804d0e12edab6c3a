"""`BgpSession`: one BGP-4 session as a sans-I/O state machine - its state, the runtime's inputs
and the FSM's event dispatch. The parts it hands work to are the modules beside it (the
package's docstring lists them); each is functions of the session."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from apsv.bgp import constants as C
from apsv.bgp.capabilities import Capability, Negotiated, build_capabilities
from apsv.bgp.config import FAMILY_CODES, Announcement, BgpSessionConfig
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import BgpError
from apsv.bgp.framing import MessageReader
from apsv.bgp.fsm import Action, Event, State, transition
from apsv.bgp.graceful_restart import LongLived, StaleRoutes
from apsv.bgp.message import Open, RouteRefresh, Update
from apsv.bgp.nlri import encode_prefix
from apsv.bgp.path_attributes import PathAttributes
from apsv.bgp.policy import RouteMapEngine
from apsv.bgp.prefix_limit import PrefixLimit
from apsv.bgp.rib import AdjRibIn, LocRib, Source
from apsv.bgp.session import actions, adj_rib_out, bfd_client, inspection, persist, receive, restart, route_maps
from apsv.bgp.session.common import FSM_EVENT_COUNTERS, Family
from apsv.bgp.soft_reconfig import ReceivedRoutes
from apsv.snapshot import decodes_snapshot
from apsv.stacks.interface import Send, StackEvent, StateChanged


class BgpSession:
    """An RFC 4271 BGP speaker's side of one peering."""

    protocol: ClassVar[str] = "bgp"

    def __init__(self, config: BgpSessionConfig) -> None:
        self.config = config
        self.state = State.IDLE
        self.connect_retry_counter = 0
        self.timers: dict[str, float] = {}
        self.idle_hold = config.idle_hold_time
        self.connected = False
        self.hold_time = 0  # negotiated
        self.keepalive_time = 0.0
        self.negotiated: Negotiated | None = None
        self.peer_open: Open | None = None
        self.ctx = CodecContext(asn4=True, ibgp=config.ibgp)
        self.local_capabilities: tuple[Capability, ...] = build_capabilities(
            asn=config.local_as,
            families=config.family_codes,
            route_refresh=config.route_refresh,
            extended_message=config.extended_message,
            add_path=tuple((*FAMILY_CODES[f], C.ADD_PATH_RECEIVE) for f in config.add_path_receive),
            graceful_restart_time=config.graceful_restart_time,
            long_lived_graceful_restart=config.long_lived_stale_time is not None,
        )
        self._reader = MessageReader(C.MAX_MESSAGE_LEN)
        self.source = Source(
            name=f"{config.peer_address}/AS{config.peer_as}",
            peer_as=config.peer_as,
            local_as=config.local_as,
            peer_ip=config.peer_address,
        )
        self.adj_in: dict[Family, AdjRibIn] = {}
        self.loc_rib: dict[Family, LocRib] = {}
        self.adj_out: dict[Family, dict[bytes, PathAttributes]] = {}
        # what the session originates, before export policy: the configured announcements and
        # those the virtual router added (a policy change re-exports them)
        self.announcements: list[Announcement] = list(config.announce)
        self.counters: Counter[str] = Counter()
        self.established_at: float | None = None
        self._out: list[StackEvent] = []
        self._wbuf: list[bytes] = []
        self._error: BgpError | None = None
        self._cease_subcode = C.CEASE_ADMIN_SHUTDOWN
        self._cease_data = b""
        self._update: Update | None = None
        self._refresh: RouteRefresh | None = None
        self._msg_type = 0  # type of the message being handled (for FSM error data)
        self._now = 0.0
        # The table this peer will re-send (`table_backlog`): UPDATEs still expected, since when
        # (the drop, then the re-establishment), the families whose End-of-RIB is still to come.
        self._table_expected = 0
        self._table_size = 0  # the whole table, in UPDATEs, when the session last went down
        self._table_since: float | None = None
        self._table_eor: set[Family] = set()
        self._xfer_open = False  # within an initial transfer (establishment to End-of-RIB)
        self.stale = StaleRoutes()  # a restarting peer's routes kept (graceful_restart.py)
        self.long_lived = LongLived()  # and for how long, past its restart time (RFC 9494)
        # what the peer sent before import policy, when kept (soft_reconfig.py)
        self.received: ReceivedRoutes | None = None
        # route maps by (direction, family); RFC 8212 refuses what an eBGP direction without one carries
        self.route_maps: dict[tuple[str, Family], RouteMapEngine] = {}
        self._rfc8212 = False
        route_maps.load_policy(self, config)
        self.prefix_limit = PrefixLimit(
            config.max_prefixes,
            config.max_prefixes_threshold_pct,
            config.max_prefixes_warning_only,
            config.max_prefixes_restart_s,
        )
        # this speaker's own addresses: a route with one as its next hop is ignored (§6.3)
        self._own_addresses = frozenset(
            str(ipaddress.ip_address(a))
            for a in (config.local_address, config.next_hop_self, config.next_hop_self_v6)
            if a is not None and not ipaddress.ip_address(a).is_unspecified
        )
        self._event: Event | None = None  # the FSM event being handled
        self._why = ""  # why the FSM event came, when more is known than its name
        self.bfd_down = False  # the session's BFD session went down from Up (RFC 5882)
        self.bfd_downs: list[float] = []  # when, the last BFD_FLAPS_KEPT times

    # ------------------------------------------------------------------------------------------
    # Construction for replay: a session already Established with a known context.

    @classmethod
    def established(
        cls,
        config: BgpSessionConfig,
        *,
        asn4: bool = True,
        add_path: Iterable[Family] = (),
        now: float = 0.0,
    ) -> BgpSession:
        """A session that is already Established (no OPEN exchange, no timers): for replaying
        recorded UPDATEs, as an MRT dump holds them, into a live Adj-RIB-In and Loc-RIB."""
        s = cls(config)
        fams = frozenset(config.family_codes)
        s.negotiated = Negotiated(asn4=asn4, families=fams, add_path_receive=frozenset(add_path))
        receive.set_context(s)
        s.state = State.ESTABLISHED
        s.connected = True
        s.established_at = now
        s._reader.max_len = C.MAX_EXTENDED_MESSAGE_LEN
        return s

    # ------------------------------------------------------------------------------------------
    # The stack interface

    def start(self, now: float) -> list[StackEvent]:
        ev = Event.MANUAL_START_PASSIVE if self.config.passive else Event.MANUAL_START
        return self._run(now, ev)

    def stop(self, now: float, reason: str = "") -> list[StackEvent]:
        self._cease_subcode = C.CEASE_ADMIN_SHUTDOWN
        raw = reason.encode("utf-8")[:255]
        self._cease_data = bytes((len(raw),)) + raw if raw else b""  # RFC 9003 shutdown communication
        self.timers.pop("idle_hold", None)
        out = self._run(now, Event.MANUAL_STOP)
        self._table_forget()  # stopped here: no peer is coming back with a table
        if self.stale:
            restart.drop_stale(self, list(self.stale.families()), "flushed", "the session was stopped")
            out += self._flush()
        return out

    def connection_made(self, now: float) -> list[StackEvent]:
        self.connected = True
        return self._run(now, Event.TCP_CONNECTION_CONFIRMED)

    def connection_lost(self, now: float, reason: str = "") -> list[StackEvent]:
        self.connected = False
        return self._run(now, Event.TCP_CONNECTION_FAILS)

    def data_received(self, data: bytes | memoryview, now: float) -> list[StackEvent]:
        self._now = now
        self.counters["octets_in"] += len(data)
        if not self.connected or self.state is State.IDLE:
            self.counters["octets_dropped_not_connected"] += len(data)
            return []
        self._reader.feed(data)
        while self._receiving():
            try:
                m = self._reader.next_message()
            except BgpError as e:
                self._error = e
                self._dispatch(Event.BGP_HEADER_ERR)
                break
            if m is None:
                break
            receive.on_message(self, *m)
        if self._reader.pending > self.config.max_receive_buffer:
            # Cannot happen with a correct reader (it holds at most one partial message), but a
            # bound is a bound: refuse to grow without limit.
            self._cease_subcode = C.CEASE_OUT_OF_RESOURCES
            self._cease_data = b""
            self._dispatch(Event.AUTOMATIC_STOP)
        return self._flush()

    def _receiving(self) -> bool:
        return self.connected and self.state is not State.IDLE

    def next_deadline(self) -> float | None:
        return min(self.timers.values()) if self.timers else None

    def on_timer(self, now: float) -> list[StackEvent]:
        self._now = now
        for _ in range(16):  # a bounded number of expiries per call
            due = [(t, name) for name, t in self.timers.items() if t <= now]
            if not due:
                break
            _, name = min(due)
            del self.timers[name]
            if name == "connect_retry":
                self._dispatch(Event.CONNECT_RETRY_TIMER_EXPIRES)
            elif name == "hold":
                self._dispatch(Event.HOLD_TIMER_EXPIRES)
            elif name == "keepalive":
                self._dispatch(Event.KEEPALIVE_TIMER_EXPIRES)
            elif name == "gr_restart":
                restart.restart_time_passed(self)
            elif name == "llgr_stale":
                restart.long_lived_passed(self, now)
            elif name == "gr_stale":
                restart.drop_stale(self, list(self.stale.families()), "swept", "no End-of-RIB within stale_routes_time")
            elif name == "idle_hold":
                self.counters["automatic_restarts"] += 1
                self._dispatch(Event.AUTOMATIC_START_PASSIVE if self.config.passive else Event.AUTOMATIC_START)
        return self._flush()

    def handle_event(self, now: float, event: Event) -> list[StackEvent]:
        """Feed an RFC 4271 event directly (tests, and the runtime's administrative events)."""
        return self._run(now, event)

    # ------------------------------------------------------------------------------------------
    # Routes this speaker originates

    def originate(self, announcement: Announcement, now: float) -> list[StackEvent]:
        self._now = now
        self.announcements.append(announcement)
        adj_rib_out.advertise(self, [announcement])
        return self._flush()

    def withdraw_originated(self, prefixes: Iterable[str], now: float) -> list[StackEvent]:
        self._now = now
        by_fam: dict[Family, list[bytes]] = {}
        prefixes = list(prefixes)
        gone = set(prefixes)
        self.announcements = [
            a.model_copy(update={"prefixes": [p for p in a.prefixes if p not in gone]})
            for a in self.announcements
            if any(p not in gone for p in a.prefixes)
        ]
        for p in prefixes:
            key = encode_prefix(p)
            fam = C.IPV6_UNICAST if ":" in p else C.IPV4_UNICAST
            if self.adj_out.get(fam, {}).pop(key, None) is not None:
                by_fam.setdefault(fam, []).append(key)
        if self.state is State.ESTABLISHED:
            for fam, keys in by_fam.items():
                adj_rib_out.send_withdrawals(self, fam, keys)
        return self._flush()

    def control(self, command: Mapping[str, Any], now: float) -> list[StackEvent]:
        """A command from the virtual router (a CONTROL frame):

        ``{"op": "announce", "announcement": {...Announcement...}}``,
        ``{"op": "withdraw", "prefixes": [...]}``, ``{"op": "stop", "reason": "..."}`` (Cease /
        Administrative Shutdown with the reason as RFC 9003 shutdown communication),
        ``{"op": "start"}``. Anything else is refused with a ValueError naming what is wrong.
        """
        op = command.get("op") if isinstance(command, Mapping) else None
        if op == "announce":
            return self.originate(Announcement.model_validate(command.get("announcement")), now)
        if op == "withdraw":
            prefixes = command.get("prefixes")
            if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
                raise ValueError("withdraw: 'prefixes' must be a list of prefix strings")
            return self.withdraw_originated([str(ipaddress.ip_network(p)) for p in prefixes], now)
        if op == "stop":
            return self.stop(now, str(command.get("reason", "")))
        if op == "start":
            return self.start(now)
        if op == "policy":
            return route_maps.set_policy(self, command, now)
        if op == "bfd":
            return self.bfd_changed(
                str(command.get("old", "")), str(command.get("new", "")), str(command.get("reason", "")), now
            )
        raise ValueError(f"unknown command op {op!r} (announce, withdraw, stop, start, bfd, policy)")

    # ------------------------------------------------------------------------------------------
    # A policy change, without a reset

    def set_policy(self, change: Mapping[str, Any], now: float) -> list[StackEvent]:
        return route_maps.set_policy(self, change, now)

    # ------------------------------------------------------------------------------------------
    # BFD as this session's failure detector (RFC 5882)

    def bfd_changed(self, old: str, new: str, reason: str, now: float) -> list[StackEvent]:
        """The session's BFD session went from `old` to `new` (RFC 5880 state names). Up -> Down
        tears the session down at once, Cease / BFD Down (RFC 9384), and holds it down until BFD
        is Up again; then it may re-establish after a hold that doubles with each recent down
        (§3.2 dampening). A Down the peer signalled as AdminDown, or our own AdminDown, is not a
        path failure (§3.2) and changes nothing."""
        bfd_client.bfd_changed(self, old, new, reason, now)
        return self._flush()

    # ------------------------------------------------------------------------------------------
    # Inspection

    def loc_rib_table(self, family: Family = C.IPV4_UNICAST) -> list[tuple[str, str | None, str]]:
        rib = self.loc_rib.get(family)
        return [] if rib is None else rib.table()

    def route_rows(self, family: Family = C.IPV4_UNICAST) -> list[tuple[Any, ...]]:
        """The Loc-RIB with each route's attributes, sorted by prefix (inspection.route_rows)."""
        return inspection.route_rows(self, family)

    def rib_digest(self) -> str:
        """SHA-256 over the RIBs: equal digests mean equal RIBs (inspection.rib_digest)."""
        return inspection.rib_digest(self)

    def prefix_count(self) -> int:
        return sum(len(r) for r in self.adj_in.values())

    def table_backlog(self, now: float) -> int:
        """UPDATEs this peer is expected to (re-)send: a leading indicator for scaling.

        A session that goes down with routes will get them back as a whole table when the peer
        reconnects - within seconds, as fast as the receiver takes it. From the drop the session
        expects that table's UPDATEs (its prefixes over the prefixes per UPDATE this peer has
        packed); once Established again each UPDATE counts against it, and End-of-RIB (RFC 4724)
        for every family it had ends it. A peer not back, or a transfer not done, within
        `table_expect_s` is no longer expected."""
        if self._table_expected <= 0 or self._table_since is None:
            return 0
        if now - self._table_since > self.config.table_expect_s:
            return 0
        return self._table_expected

    def _table_forget(self) -> None:
        self._table_expected = 0
        self._table_since = None
        self._table_eor = set()

    def stats(self) -> dict[str, Any]:
        return inspection.stats(self)

    # ------------------------------------------------------------------------------------------
    # FSM plumbing

    def _run(self, now: float, ev: Event) -> list[StackEvent]:
        self._now = now
        self._dispatch(ev)
        return self._flush()

    def _dispatch(self, ev: Event) -> None:
        todo, nxt = transition(self.state, ev)
        self._event = ev
        old = self.state
        self.counters[FSM_EVENT_COUNTERS[ev]] += 1
        perform = actions.PERFORM  # looked up once: this loop runs for every message
        for a in todo:
            perform[a](self, old)
        if nxt is not old:
            self.state = nxt
            self._out_flush_writes()
            self._out.append(StateChanged(old.value, nxt.value, f"{ev.name}: {self._why}" if self._why else ev.name))
            if nxt is State.ESTABLISHED:
                self._on_established()
            elif old is State.ESTABLISHED:
                self.established_at = None

    def _flush(self) -> list[StackEvent]:
        self._out_flush_writes()
        out, self._out = self._out, []
        return out

    def _out_flush_writes(self) -> None:
        if self._wbuf:
            data = b"".join(self._wbuf)
            self._wbuf = []
            self.counters["octets_out"] += len(data)
            self._out.append(Send(data))

    def _write(self, data: bytes) -> None:
        self._wbuf.append(data)

    def _act(self, a: Action, state: State) -> None:
        """Perform one FSM action outside an event (an UPDATE sent restarts the keepalive timer)."""
        actions.PERFORM[a](self, state)

    def _on_established(self) -> None:
        self.idle_hold = self.config.idle_hold_time
        self.established_at = self._now
        self.counters["established"] += 1
        self._xfer_open = True
        restart.gr_reestablished(self)
        if self.table_backlog(self._now) > 0:
            self._table_since = self._now  # the transfer's own time starts
        else:
            self._table_forget()  # back after table_expect_s: no longer that transfer
        # what the session originates now: the configured announcements, with the virtual
        # router's additions and withdrawals
        adj_rib_out.advertise(self, self.announcements)
        n = self.negotiated
        for fam in sorted(n.families if n is not None else ()):
            self._write(adj_rib_out.end_of_rib(fam))

    # ------------------------------------------------------------------------------------------
    # Snapshot / restore (persist.py)

    def snapshot(self) -> bytes:
        return persist.snapshot(self)

    @classmethod
    @decodes_snapshot
    def restore(cls, blob: bytes) -> BgpSession:
        return persist.restore(cls, blob)

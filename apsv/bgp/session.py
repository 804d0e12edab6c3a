"""One BGP-4 session as a sans-I/O state machine.

`BgpSession` turns what the runtime tells it (the transport came up or went down, bytes
arrived, time passed) into what must happen (bytes to send, a transport to open or close,
state changes, best-path changes for the virtual router's FIB). The FSM rows come from
`apsv.bgp.fsm.TRANSITIONS`; this module performs their actions. Time is always passed in.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import socket
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

from pydantic import ValidationError

from apsv.bgp import constants as C
from apsv.bgp.attributes import (
    MP_NEXT_HOP,
    Attribute,
    MpReach,
    MpUnreach,
    PathAttributes,
    decode_attributes,
    interner_for,
    with_mp_next_hop,
)
from apsv.bgp.capabilities import Capability, Negotiated, build_capabilities, negotiate
from apsv.bgp.config import FAMILY_CODES, Announcement, BgpSessionConfig
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action as ErrorAction
from apsv.bgp.errors import BgpError
from apsv.bgp.events import (
    BfdClientEvent,
    NotificationSent,
    PeerNotification,
    PolicyChanged,
    RoutesChanged,
    next_hop_of,
)
from apsv.bgp.fsm import FSM_ERROR_SUBCODE, Action, Event, State, transition
from apsv.bgp.graceful_restart import GracefulRestartEvent, LongLived, StaleRoutes, mark_long_lived
from apsv.bgp.message import (
    KEEPALIVE_BYTES,
    MessageReader,
    Notification,
    Open,
    RouteRefresh,
    Update,
    decode_open,
    decode_route_refresh,
    decode_update,
    encode_message,
    encode_update,
)
from apsv.bgp.nlri import encode_prefix, prefix_str
from apsv.bgp.policy import RouteMapEngine
from apsv.bgp.policy_lists import as_path_text, community_text, large_community_text
from apsv.bgp.prefix_limit import PrefixLimit
from apsv.bgp.rib import AdjRibIn, BestPathChange, LocRib, PrefixLimitExceeded, Source
from apsv.bgp.soft_reconfig import ReceivedRoutes
from apsv.errors import DecodeError, field_path
from apsv.snapshot import SnapshotReader, SnapshotWriter, decodes_snapshot
from apsv.stack import (
    CloseTransport,
    OpenTransport,
    ProtocolProblem,
    Send,
    StackEvent,
    StateChanged,
)

Family = tuple[int, int]
LARGE_HOLD_TIME = 240.0  # RFC 4271 §8.2.2: "a large value", suggested 4 minutes
BFD_FLAP_WINDOW_S = 600.0  # BFD downs within this long damp re-establishment (RFC 5882 §3.2)
BFD_FLAPS_KEPT = 16
# Counter names built once, not per message
FSM_EVENT_COUNTERS: dict[Event, str] = {ev: f"fsm_event_{int(ev)}" for ev in Event}
MESSAGES_IN_COUNTERS: dict[int, str] = {t: f"messages_in_{name}" for t, name in C.MESSAGE_NAMES.items()}


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
        self._load_policy(config)
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
        s._set_context()
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
            self._drop_stale(list(self.stale.families()), "flushed", "the session was stopped")
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
            self._on_message(*m)
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
                self._restart_time_passed()
            elif name == "llgr_stale":
                self._long_lived_passed(now)
            elif name == "gr_stale":
                self._drop_stale(list(self.stale.families()), "swept", "no End-of-RIB within stale_routes_time")
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
        self._advertise([announcement])
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
                self._send_withdrawals(fam, keys)
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
            return self.set_policy(command, now)
        if op == "bfd":
            return self.bfd_changed(
                str(command.get("old", "")), str(command.get("new", "")), str(command.get("reason", "")), now
            )
        raise ValueError(f"unknown command op {op!r} (announce, withdraw, stop, start, bfd, policy)")

    # ------------------------------------------------------------------------------------------
    # A policy change, without a reset

    def set_policy(self, change: Mapping[str, Any], now: float) -> list[StackEvent]:
        """`{"op": "policy", "policy": {...}, "import_policy": ..., "export_policy": ...,
        "ebgp_requires_policy": ...}` (the keys given replace the configuration's). Import
        applies to routes received from now on, so each family's routes are asked for again
        with ROUTE-REFRESH (RFC 2918) where the peer supports it; export is re-applied to what
        the session originates at once. Raises ValueError (naming the field) on a bad policy."""
        self._now = now
        keys = ("policy", "import_policy", "export_policy", "ebgp_requires_policy")
        update = {k: change[k] for k in keys if k in change}
        try:
            cfg = BgpSessionConfig.model_validate({**self.config.model_dump(mode="json"), **update})
        except ValidationError as e:
            raise ValueError("; ".join(f"{field_path(x['loc'])}: {x['msg']}" for x in e.errors())) from None
        self.config = cfg
        self._load_policy(cfg)
        refreshed: list[str] = []
        needs_reset: list[str] = []
        announced = withdrawn = 0
        n = self.negotiated
        if self.state is State.ESTABLISHED and n is not None:
            for fam in sorted(n.families):
                if self.received is not None and fam in self.adj_in:
                    self._reimport(fam)  # soft reconfiguration: from what the peer sent
                    refreshed.append(C.family_name(fam))
                elif n.route_refresh:
                    self._write(encode_message(RouteRefresh(fam[0], fam[1])))
                    self.counters["route_refresh_sent"] += 1
                    refreshed.append(C.family_name(fam))
                else:
                    needs_reset.append(C.family_name(fam))
        announced, withdrawn = self._reexport()
        self._out.append(PolicyChanged(refreshed, needs_reset, announced, withdrawn))
        return self._flush()

    def _load_policy(self, cfg: BgpSessionConfig) -> None:
        """The route maps `cfg` names, compiled, and whether RFC 8212 applies."""
        self.route_maps = {}
        for direction in ("import", "export"):
            for name in cfg.families:
                rm = cfg.route_map(direction, name)
                if rm is not None:
                    self.route_maps[(direction, FAMILY_CODES[name])] = RouteMapEngine(rm, cfg.policy)
        self._rfc8212 = cfg.ebgp_requires_policy and not cfg.ibgp

    def _reimport(self, fam: Family) -> None:
        """The family's routes as the peer sent them, through the import policy now in force."""
        assert self.received is not None
        rib = self.adj_in[fam]
        changes: list[BestPathChange] = []
        for pa, keys in list(self.received.groups(fam)):
            changes += self._import(fam, rib, keys, pa)
        self.counters["soft_reconfigurations"] += 1
        if changes:
            self._out.append(RoutesChanged(changes))

    def _reexport(self) -> tuple[int, int]:
        """What the session originates, through the export policy in force: announce what is
        new or changed, withdraw what it no longer lets out. (announced, withdrawn)."""
        fresh: dict[Family, dict[bytes, PathAttributes]] = {}
        for fam, pa, keys in self._exported(self.announcements):
            fresh.setdefault(fam, {}).update(dict.fromkeys(keys, pa))
        announced = withdrawn = 0
        up = self.state is State.ESTABLISHED and self.negotiated is not None
        for fam in sorted(set(fresh) | set(self.adj_out)):
            old, new = self.adj_out.get(fam, {}), fresh.get(fam, {})
            gone = [k for k in old if k not in new]
            changed: dict[PathAttributes, list[bytes]] = {}
            for k, pa in new.items():
                if old.get(k) is not pa:
                    changed.setdefault(pa, []).append(k)
            if up and self.negotiated is not None and fam in self.negotiated.families:
                if gone:
                    self._send_withdrawals(fam, gone)
                for pa, ks in changed.items():
                    self._send_announcements(fam, pa, ks)
            withdrawn += len(gone)
            announced += sum(len(ks) for ks in changed.values())
        self.adj_out = fresh
        return announced, withdrawn

    # ------------------------------------------------------------------------------------------
    # BFD as this session's failure detector (RFC 5882)

    def bfd_changed(self, old: str, new: str, reason: str, now: float) -> list[StackEvent]:
        """The session's BFD session went from `old` to `new` (RFC 5880 state names). Up -> Down
        tears the session down at once, Cease / BFD Down (RFC 9384), and holds it down until BFD
        is Up again; then it may re-establish after a hold that doubles with each recent down
        (§3.2 dampening). A Down the peer signalled as AdminDown, or our own AdminDown, is not a
        path failure (§3.2) and changes nothing."""
        self._now = now
        if new == "UP" and self.bfd_down:
            self.bfd_down = False
            hold = 0.0
            if self.state is State.IDLE and self.config.auto_restart:
                hold = self._bfd_hold(now)
                self.timers["idle_hold"] = now + hold
            self._out.append(BfdClientEvent("up", reason, hold))
        elif new == "DOWN" and old == "UP" and not reason.startswith("peer is ADMIN_DOWN"):
            self.bfd_down = True
            self.bfd_downs = [*self.bfd_downs, now][-BFD_FLAPS_KEPT:]
            self.counters["bfd_down"] += 1
            self._out.append(BfdClientEvent("down", reason))
            if self.state is not State.IDLE:
                self._cease_subcode, self._cease_data = C.CEASE_BFD_DOWN, b""
                self._why = f"BFD down ({reason})"
                self._dispatch(Event.AUTOMATIC_STOP)
                self._why = ""
            self.timers.pop("idle_hold", None)  # held down until BFD is up again
        return self._flush()

    def _bfd_hold(self, now: float) -> float:
        recent = sum(1 for t in self.bfd_downs if now - t <= BFD_FLAP_WINDOW_S)
        return min(self.config.idle_hold_time * float(2 ** max(recent - 1, 0)), self.config.max_idle_hold_time)

    # ------------------------------------------------------------------------------------------
    # Inspection

    def loc_rib_table(self, family: Family = C.IPV4_UNICAST) -> list[tuple[str, str | None, str]]:
        rib = self.loc_rib.get(family)
        return [] if rib is None else rib.table()

    def route_rows(self, family: Family = C.IPV4_UNICAST) -> list[tuple[Any, ...]]:
        """The Loc-RIB with each route's attributes, sorted by prefix: (prefix, next hop, origin,
        AS path text, MED, local preference, communities, large communities, stale)."""
        rib = self.loc_rib.get(family)
        if rib is None:
            return []
        rows = []
        for key, a, src in rib.items():
            rows.append(
                (
                    prefix_str(key, family[0], src.add_path),
                    next_hop_of(a),
                    C.ORIGIN_NAMES.get(a.origin, "") if a.origin is not None else "",
                    as_path_text(a.as_path),
                    a.med,
                    a.local_pref,
                    " ".join(community_text(c) for c in a.get(C.ATTR_COMMUNITIES, ())),
                    " ".join(large_community_text(c) for c in a.get(C.ATTR_LARGE_COMMUNITIES, ())),
                    self.stale.is_stale(family, key),
                )
            )
        return sorted(rows)

    def rib_digest(self) -> str:
        """SHA-256 over every Loc-RIB row (prefix, next hop, AS path) and Adj-RIB-In attribute set:
        equal digests mean equal RIBs, which lets RIBs held in other processes be compared."""
        h = hashlib.sha256()
        for fam in sorted(self.loc_rib):
            loc = self.loc_rib[fam]
            for prefix in sorted(loc.best):
                bp = loc.best_path(prefix)
                assert bp is not None
                h.update(bytes((fam[0], fam[1], len(prefix))) + prefix + bp[0].wire)
                h.update((bp[0].next_hop or "").encode())
        return h.hexdigest()

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
        return {
            "protocol": self.protocol,
            "state": self.state.value,
            "peer": self.source.name,
            "peer_address": self.config.peer_address,
            "peer_as": self.config.peer_as,
            "local_as": self.config.local_as,
            "router_id": self.config.router_id,
            "established_at": self.established_at,
            "stale_routes": len(self.stale),
            # families held long-lived stale (RFC 9494) and when their routes go
            "long_lived_stale_until": {C.family_name(f): t for f, t in sorted(self.long_lived.until.items())},
            "prefixes_received": self.prefix_count(),
            "loc_rib": {f"{a}/{s}": len(r) for (a, s), r in self.loc_rib.items()},
            "prefixes_advertised": sum(len(v) for v in self.adj_out.values()),
            "connect_retry_counter": self.connect_retry_counter,
            "buffered_octets": self._reader.pending,
            **dict(self.counters),
        }

    # ------------------------------------------------------------------------------------------
    # FSM plumbing

    def _run(self, now: float, ev: Event) -> list[StackEvent]:
        self._now = now
        self._dispatch(ev)
        return self._flush()

    def _dispatch(self, ev: Event) -> None:
        actions, nxt = transition(self.state, ev)
        self._event = ev
        old = self.state
        self.counters[FSM_EVENT_COUNTERS[ev]] += 1
        for a in actions:
            self._act(a, old)
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

    def _notify(self, code: int, subcode: int, data: bytes, reason: str) -> None:
        self.counters[f"notifications_sent_{code}_{subcode}"] += 1
        self._write(encode_message(Notification(code, subcode, data)))
        self._out_flush_writes()
        self._out.append(NotificationSent(code, subcode, reason))

    def _act(self, a: Action, state: State) -> None:
        now = self._now
        # the actions of every UPDATE and KEEPALIVE first: this chain runs per message
        if a is Action.PROCESS_UPDATE:
            u, self._update = self._update, None
            if u is not None:
                self._process_update(u)
        elif a is Action.HOLD_TIMER_RESTART:
            if self.hold_time:
                self.timers["hold"] = now + self.hold_time
        elif a is Action.KEEPALIVE_TIMER_RESTART:
            if self.keepalive_time:
                self.timers["keepalive"] = now + self.keepalive_time
        elif a is Action.INIT_RESOURCES or a is Action.RELEASE_RESOURCES:
            self._reader = MessageReader(C.MAX_MESSAGE_LEN)
            self.negotiated = None
            self.peer_open = None
            self.hold_time = 0
            self.keepalive_time = 0.0
            self.timers.pop("hold", None)
            self.timers.pop("keepalive", None)
        elif a is Action.DELETE_ROUTES:
            self._delete_routes(state)
        elif a is Action.COUNTER_RESET:
            self.connect_retry_counter = 0
        elif a is Action.COUNTER_INCR:
            self.connect_retry_counter += 1
        elif a is Action.CONNECT_RETRY_START:
            self.timers["connect_retry"] = now + self.config.connect_retry_time
        elif a is Action.CONNECT_RETRY_STOP:
            self.timers.pop("connect_retry", None)
        elif a is Action.INITIATE_TCP:
            if not self.config.passive:
                self._out_flush_writes()
                self._out.append(OpenTransport())
        elif a is Action.LISTEN:
            pass  # the agent accepts connections from the peer's address on our behalf
        elif a is Action.DROP_TCP:
            self._out_flush_writes()
            if self.connected:
                self._out.append(CloseTransport(f"BGP FSM in {state.value}"))
            self.connected = False
        elif a is Action.SEND_OPEN:
            self._write(encode_message(self._open_message()))
            self.counters["opens_sent"] += 1
        elif a is Action.SEND_KEEPALIVE:
            self._write(KEEPALIVE_BYTES)
            self.counters["keepalives_sent"] += 1
        elif a is Action.NOTIFY_CEASE:
            self._notify(C.ERR_CEASE, self._cease_subcode, self._cease_data, self._why or "cease")
            self._cease_subcode, self._cease_data = C.CEASE_ADMIN_SHUTDOWN, b""
        elif a is Action.NOTIFY_HOLD_EXPIRED:
            self._notify(C.ERR_HOLD_TIMER_EXPIRED, 0, b"", "hold timer expired")
        elif a is Action.NOTIFY_FSM_ERROR:
            # RFC 6608: the data is the type of the unexpected message, when a message caused it.
            mt, self._msg_type = self._msg_type, 0
            self._notify(
                C.ERR_FSM,
                FSM_ERROR_SUBCODE.get(state, 0),
                bytes((mt,)) if mt else b"",
                f"unexpected {C.MESSAGE_NAMES.get(mt, 'event')} in {state.value}",
            )
        elif a is Action.NOTIFY_ERROR:
            err = self._error
            if err is not None:
                self._notify(err.code, err.subcode, err.data, err.reason)
                self._error = None
        elif a is Action.HOLD_TIMER_LARGE:
            self.timers["hold"] = now + LARGE_HOLD_TIME
        elif a is Action.NEGOTIATED_TIMERS:
            if self.hold_time:
                self.timers["hold"] = now + self.hold_time
                self.timers["keepalive"] = now + self.keepalive_time
            else:
                self.timers.pop("hold", None)
                self.timers.pop("keepalive", None)
        elif a is Action.PROCESS_ROUTE_REFRESH:
            rr, self._refresh = self._refresh, None
            n = self.negotiated
            # RFC 2918: refresh a family we negotiated; RFC 7313: BoRR/EoRR and unknown
            # subtypes from the peer ask nothing of us.
            if rr is not None and rr.subtype == 0 and n is not None and (rr.afi, rr.safi) in n.families:
                self._readvertise((rr.afi, rr.safi))
            elif rr is not None:
                self.counters["route_refresh_ignored"] += 1
        elif a is Action.ESTABLISHED:
            pass  # handled once the state has changed (_on_established)
        elif a is Action.IDLE_HOLD_START and self.config.auto_restart:
            self.timers["idle_hold"] = now + self.idle_hold
            self.idle_hold = min(max(self.idle_hold * 2, 1.0), self.config.max_idle_hold_time)

    # ------------------------------------------------------------------------------------------
    # Messages in

    def _on_message(self, mtype: int, body: bytes) -> None:
        self.counters[MESSAGES_IN_COUNTERS.get(mtype) or f"messages_in_{mtype}"] += 1
        self._msg_type = mtype
        if mtype == C.MSG_UPDATE:
            if self.state is not State.ESTABLISHED:
                self._dispatch(Event.UPDATE_MSG)
                return
            try:
                u = decode_update(body, self.ctx)
            except BgpError as e:
                self._error = e
                self._dispatch(Event.UPDATE_MSG_ERR)
                return
            self._update = u
            self._dispatch(Event.UPDATE_MSG)
        elif mtype == C.MSG_KEEPALIVE:
            if body:
                self._error = BgpError(C.ERR_HEADER, C.ERR_HEADER_BAD_LENGTH, (19 + len(body)).to_bytes(2, "big"))
                self._dispatch(Event.BGP_HEADER_ERR)
                return
            self._dispatch(Event.KEEPALIVE_MSG)
        elif mtype == C.MSG_OPEN:
            try:
                m = decode_open(body)
                self._check_open(m)
            except BgpError as e:
                self._error = e
                self._dispatch(Event.BGP_OPEN_MSG_ERR)
                return
            if self.state is State.OPENSENT:
                self._accept_open(m)
            self._dispatch(Event.BGP_OPEN)
        elif mtype == C.MSG_NOTIFICATION:
            code = body[0] if body else 0
            sub = body[1] if len(body) > 1 else 0
            self.counters[f"notifications_received_{code}_{sub}"] += 1
            self._out.append(PeerNotification(code, sub, body[2:]))
            if code == C.ERR_OPEN and sub == C.ERR_OPEN_UNSUPPORTED_VERSION:
                self._dispatch(Event.NOTIF_MSG_VER_ERR)
            else:
                self._dispatch(Event.NOTIF_MSG)
            if code == C.ERR_CEASE and sub == C.CEASE_HARD_RESET and len(body) >= 4:
                sub = body[3] if body[2] == C.ERR_CEASE else 0  # RFC 8538: the NOTIFICATION it wraps
            if code == C.ERR_CEASE and sub in (C.CEASE_ADMIN_SHUTDOWN, C.CEASE_PEER_DECONFIGURED):
                self._table_forget()  # the peer shut the session down on purpose: not back soon
        elif mtype == C.MSG_ROUTE_REFRESH:
            try:
                self._refresh = decode_route_refresh(body)
            except BgpError as e:
                self._error = e
                self._dispatch(Event.UPDATE_MSG_ERR)
                return
            self._dispatch(Event.ROUTE_REFRESH_MSG)

    def _check_open(self, m: Open) -> None:
        """RFC 4271 §6.2 checks (syntax was checked by the decoder)."""
        cfg = self.config
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
        negotiate(self.local_capabilities, m.capabilities)

    def _accept_open(self, m: Open) -> None:
        self.peer_open = m
        self.negotiated = negotiate(self.local_capabilities, m.capabilities)
        self._set_context()
        hold = min(self.config.hold_time, m.hold_time)
        self.hold_time = hold
        self.keepalive_time = hold / 3.0
        self.source.set_router_id(m.router_id)

    def _set_context(self) -> None:
        n = self.negotiated
        assert n is not None
        old_asn4 = self.ctx.asn4
        self.ctx = CodecContext(
            asn4=n.asn4, ibgp=self.config.ibgp, add_path=n.add_path_receive, extended_message=n.extended_message
        )
        self._reader.max_len = self.ctx.max_message_len
        # a table kept over a restart whose keys or attributes no longer mean the same (ADD-PATH
        # or 4-octet ASes negotiated differently): its stale routes go
        self._drop_families(
            [f for f, r in self.adj_in.items() if r.add_path != (f in n.add_path_receive) or n.asn4 != old_asn4]
        )
        keep = self.config.soft_reconfiguration_inbound or not n.route_refresh
        if keep and self.received is None:
            self.received = ReceivedRoutes()
        elif not keep:
            self.received = None
        for fam in n.families:
            if fam not in self.adj_in:
                rib = AdjRibIn(self.source, fam, fam in n.add_path_receive, self.prefix_limit.rib_limit)
                self.adj_in[fam] = rib
                loc = LocRib(fam)
                loc.add_source(rib)
                self.loc_rib[fam] = loc

    # ------------------------------------------------------------------------------------------
    # UPDATE processing

    def _process_update(self, u: Update) -> None:
        self.counters["updates_in"] += 1
        announced = len(u.nlri) + (len(u.mp_reach.nlri or ()) if u.mp_reach is not None else 0)
        if announced:
            self.counters["updates_announcing"] += 1
            self.counters["prefixes_announced"] += announced
        if self._xfer_open:
            # the initial transfer (establishment to End-of-RIB, or table_expect_s for a peer
            # that sends none): how this peer packs a table
            since = self.established_at if self.established_at is not None else self._now
            if u.is_end_of_rib or self._now - since > self.config.table_expect_s:
                self._xfer_open = False
            elif announced:
                self.counters["table_prefixes_in"] += announced
                self.counters["table_announcing_in"] += 1
        if self._table_expected > 0:
            if self.table_backlog(self._now) == 0:
                self._table_forget()  # expired: whatever comes now is not that transfer
            else:
                self._table_progress(u)
        if self.stale and u.is_end_of_rib:
            mu = u.mp_unreach
            fam = C.IPV4_UNICAST if mu is None else (mu.afi, mu.safi)
            if self.stale.count(fam):
                self._drop_stale([fam], "swept", f"End-of-RIB for {C.family_name(fam)}")
        for p in u.problems:
            self.counters[f"rfc7606_{p.action.value}"] += 1
            self._out.append(ProtocolProblem(p.action.value, p.describe()))
        withdraw_all = u.action is ErrorAction.TREAT_AS_WITHDRAW
        attrs = u.attributes
        withdraw_v4 = withdraw_mp = withdraw_all
        if not withdraw_all and attrs is not None and (u.nlri or u.mp_reach is not None):
            why = self._path_problem(attrs)
            if why is not None:
                self._ignore(why)
                withdraw_v4 = withdraw_mp = True
            else:
                if u.nlri and (why := self._next_hop_problem(attrs.next_hop)) is not None:
                    self._ignore(why)
                    withdraw_v4 = True
                mr = u.mp_reach
                if mr is not None and mr.nlri and (why := self._mp_next_hop_problem(mr.afi, mr.next_hop)) is not None:
                    self._ignore(why)
                    withdraw_mp = True
        changes: list[BestPathChange] = []
        try:
            self._apply(u, withdraw_v4, withdraw_mp, changes)
        except PrefixLimitExceeded as e:
            fam = e.family
            self._cease_subcode = C.CEASE_MAX_PREFIXES
            self._cease_data = fam[0].to_bytes(2, "big") + bytes((fam[1],)) + e.limit.to_bytes(4, "big")
            if changes:
                self._out.append(RoutesChanged(changes))
            self._out.append(self.prefix_limit.ceased(fam, e.received, e.limit))
            self._dispatch(Event.AUTOMATIC_STOP)
            # down until started again, or for the configured restart time (not the idle hold)
            self.timers.pop("idle_hold", None)
            if self.prefix_limit.restart_s is not None:
                self.timers["idle_hold"] = self._now + self.prefix_limit.restart_s
            self.counters["prefix_limit_ceased"] += 1
            return
        if changes:
            self._out.append(RoutesChanged(changes))
        if self.prefix_limit.limit is not None:
            for fam, rib in self.adj_in.items():
                self._out.extend(self.prefix_limit.check(fam, len(rib)))

    def _ignore(self, why: str) -> None:
        """A route the peer sent that this speaker must not use: handled as withdrawn."""
        self.counters["rfc7606_treat-as-withdraw"] += 1
        self._out.append(ProtocolProblem(ErrorAction.TREAT_AS_WITHDRAW.value, why))

    def _next_hop_problem(self, nh: str | None) -> str | None:
        if nh is not None and nh in self._own_addresses:
            return f"NEXT_HOP {nh} is this speaker's own address (RFC 4271 §6.3): route ignored"
        return None

    def _mp_next_hop_problem(self, afi: int, nh: bytes) -> str | None:
        """RFC 2545 §3 for IPv6: a global address first, a link-local one only after it."""
        if afi != C.AFI_IPV6 or len(nh) not in (16, 32):
            return self._next_hop_problem(socket.inet_ntoa(nh)) if len(nh) == 4 else None
        first = ipaddress.IPv6Address(nh[:16])
        if first.is_link_local:
            return f"MP_REACH_NLRI next hop {first} is link-local where RFC 2545 §3 needs a global address"
        return self._next_hop_problem(str(first))

    def _path_problem(self, attrs: PathAttributes) -> str | None:
        cfg = self.config
        if not cfg.ibgp and cfg.enforce_first_as and attrs.neighbor_as != cfg.peer_as:
            return f"AS_PATH does not start with the peer's AS {cfg.peer_as} (RFC 4271 §6.3)"
        for _st, asns in attrs.as_path:
            if cfg.local_as in asns:
                return f"AS_PATH contains our AS {cfg.local_as} (loop, RFC 4271 §9.1.2)"
        return None

    def _apply(self, u: Update, withdraw_v4: bool, withdraw_mp: bool, changes: list[BestPathChange]) -> None:
        if self.stale:
            self._refresh_stale(u)
        if self.received is not None:
            self.received.forget(C.IPV4_UNICAST, [*u.withdrawn, *(u.nlri if withdraw_v4 else ())])
            if u.mp_unreach is not None:
                self.received.forget((u.mp_unreach.afi, u.mp_unreach.safi), u.mp_unreach.withdrawn or ())
            if u.mp_reach is not None and withdraw_mp:
                self.received.forget((u.mp_reach.afi, u.mp_reach.safi), u.mp_reach.nlri or ())
        v4 = C.IPV4_UNICAST
        rib4 = self.adj_in.get(v4)
        if rib4 is not None:
            loc4 = self.loc_rib[v4]
            if u.withdrawn:
                changes += loc4.withdraw(rib4, u.withdrawn)
            if u.nlri:
                if withdraw_v4 or u.attributes is None:
                    changes += loc4.withdraw(rib4, u.nlri)
                else:
                    changes += self._import(v4, rib4, u.nlri, u.attributes)
        elif u.nlri or u.withdrawn:
            self.counters["prefixes_ignored_family_not_negotiated"] += len(u.nlri) + len(u.withdrawn)
        mu: MpUnreach | None = u.mp_unreach
        if mu is not None and mu.withdrawn:
            fam = (mu.afi, mu.safi)
            rib = self.adj_in.get(fam)
            if rib is not None:
                changes += self.loc_rib[fam].withdraw(rib, mu.withdrawn)
            else:
                self.counters["prefixes_ignored_family_not_negotiated"] += len(mu.withdrawn)
        mr: MpReach | None = u.mp_reach
        if mr is not None and mr.nlri:
            fam = (mr.afi, mr.safi)
            rib = self.adj_in.get(fam)
            if rib is None:
                self.counters["prefixes_ignored_family_not_negotiated"] += len(mr.nlri)
            elif withdraw_mp or u.attributes is None:
                changes += self.loc_rib[fam].withdraw(rib, mr.nlri)
            else:
                attrs = with_mp_next_hop(u.attributes, mr.next_hop, self.ctx)
                changes += self._import(fam, rib, mr.nlri, attrs)

    def _import(self, fam: Family, rib: AdjRibIn, keys: list[bytes], attrs: PathAttributes) -> list[BestPathChange]:
        """Routes received, through the import policy: what it refuses is handled as withdrawn
        (a route it refuses now may have been accepted before)."""
        loc = self.loc_rib[fam]
        if self.received is not None:
            held = self.received.learn(fam, keys, attrs)
            limit = self.prefix_limit.rib_limit
            if limit is not None and held > limit:
                # routes import refuses are kept too: the same bound holds for them
                raise PrefixLimitExceeded(limit, fam, held)
        rm = self.route_maps.get(("import", fam))
        if rm is None:
            if not self._rfc8212:
                return loc.update(rib, keys, attrs)
            self.counters["policy_refused_in"] += len(keys)
            return loc.withdraw(rib, keys)
        refused, accepted = rm.apply(
            fam, keys, attrs, self.ctx, add_path=rib.add_path, peer_address=self.config.peer_address
        )
        out = loc.withdraw(rib, refused) if refused else []
        self.counters["policy_refused_in"] += len(refused)
        for pa, ks in accepted.items():
            out += loc.update(rib, ks, pa)
        return out

    def _refresh_stale(self, u: Update) -> None:
        """Routes the restarted peer sends (or withdraws) again are no longer stale."""
        self.stale.refreshed(C.IPV4_UNICAST, [*u.withdrawn, *u.nlri])
        if u.mp_unreach is not None:
            self.stale.refreshed((u.mp_unreach.afi, u.mp_unreach.safi), u.mp_unreach.withdrawn or ())
        if u.mp_reach is not None:
            self.stale.refreshed((u.mp_reach.afi, u.mp_reach.safi), u.mp_reach.nlri or ())

    def _table_progress(self, u: Update) -> None:
        """One UPDATE of a table transfer: counted against what is expected; End-of-RIB for
        every family the session had ends it."""
        self.counters["table_updates_in"] += 1
        if u.is_end_of_rib:
            mu = u.mp_unreach
            self._table_eor.discard(C.IPV4_UNICAST if mu is None else (mu.afi, mu.safi))
            if not self._table_eor:
                self._table_expected = 0
        else:
            self._table_expected -= 1

    def _delete_routes(self, state: State) -> None:
        n = self.prefix_count()
        if n:
            # the table the peer will re-send when it is back, in UPDATEs as this peer packs a
            # table (measured over its initial transfers; churn UPDATEs carry fewer prefixes),
            # down again mid-transfer: all of it again, not only what it had got to
            c = self.counters
            if c["table_announcing_in"]:
                per_update = c["table_prefixes_in"] / c["table_announcing_in"]
            else:
                per_update = c["prefixes_announced"] / max(c["updates_announcing"], 1)
            size = math.ceil(n / max(per_update, 1.0))
            unfinished = self.table_backlog(self._now) > 0
            self._table_size = max(size, self._table_size) if unfinished else size
            self._table_expected = self._table_size
            self._table_since = self._now
            self._table_eor = set(self.adj_in)
        elif self.table_backlog(self._now) > 0:
            self._table_since = self._now  # down again before any of it came: still expected, from now
        if self._event is Event.TCP_CONNECTION_FAILS and self._retain_stale(state):
            return
        changes: list[BestPathChange] = []
        for fam, rib in self.adj_in.items():
            keys = list(rib.routes)
            if keys:
                changes += self.loc_rib[fam].withdraw(rib, keys)
        self.adj_in.clear()
        self.loc_rib.clear()
        self.stale.clear()
        self.long_lived.clear()
        if self.received is not None:
            self.received.clear()
        self.timers.pop("gr_restart", None)
        self.timers.pop("gr_stale", None)
        self.timers.pop("llgr_stale", None)
        if changes:
            self._out.append(RoutesChanged(changes))

    # ------------------------------------------------------------------------------------------
    # Graceful restart, the receiving speaker (RFC 4724 §4.2; graceful_restart.py)

    def _retain_stale(self, state: State) -> bool:
        """The transport dropped without a NOTIFICATION: keep the routes of a peer that
        negotiated graceful restart, stale, for its restart time. False: delete them as usual."""
        n = self.negotiated
        if state is not State.ESTABLISHED:
            # a re-establishment that failed: what is stale waits out the running restart timer
            return bool(self.stale) and ("gr_restart" in self.timers or "llgr_stale" in self.timers)
        if n is None or not n.graceful_restart:
            return False
        restarting = n.peer_gr_families if n.peer_restart_time > 0 else frozenset()
        cap = self.config.long_lived_stale_time or 0
        long_lived = {f: min(n.llgr_stale_time(f), cap) for f in self.adj_in if n.llgr_stale_time(f) > 0 and cap}
        kept_families = (restarting | long_lived.keys()) & self.adj_in.keys()
        if not kept_families:
            return False  # the peer restarts no family of ours gracefully (a helper only, like APSV)
        # families the peer's capabilities did not list are not kept (RFC 4724 §4.2, RFC 9494 §4.2)
        self._drop_families([f for f in self.adj_in if f not in kept_families])
        for fam, rib in self.adj_in.items():
            self.stale.mark(fam, rib.routes)
        kept = len(self.stale)
        self.timers.pop("gr_stale", None)
        self.counters["gr_restarts"] += 1
        self.long_lived.clear()
        self.long_lived.pending.update(long_lived)
        if kept_families & restarting:
            self.timers["gr_restart"] = self._now + n.peer_restart_time
            why = f"transport lost; kept stale for the peer's restart time of {n.peer_restart_time} s"
            self._out.append(GracefulRestartEvent("retained", kept, why))
            # a family listed for long-lived restart only starts its long-lived stale time now
            self._enter_long_lived([f for f in long_lived if f not in restarting])
        else:
            self._out.append(GracefulRestartEvent("retained", kept, "transport lost; the peer has no restart time"))
            self._enter_long_lived(list(long_lived))
        return True

    def _restart_time_passed(self) -> None:
        """The peer was not back within its restart time: families it restarts long-lived go on
        stale for their long-lived stale time; the others' stale routes go."""
        ll = self.long_lived
        later = [f for f in self.stale.families() if f in ll.pending]
        gone = [f for f in self.stale.families() if f not in ll.pending and f not in ll.until]
        if gone:
            self._drop_stale(gone, "expired", "the peer was not back in its restart time")
        self._enter_long_lived(later)

    def _enter_long_lived(self, families: list[Family]) -> None:
        """RFC 9494 §4.2: the families' stale routes carrying NO_LLGR go, the others stay for the
        long-lived stale time, marked LLGR_STALE."""
        changes: list[BestPathChange] = []
        for fam in families:
            llst = self.long_lived.pending.pop(fam)
            rib, loc = self.adj_in.get(fam), self.loc_rib.get(fam)
            if rib is None or loc is None:
                continue
            keys = self.stale.take(fam)
            if not keys:
                continue
            moved, kept, deleted = mark_long_lived(rib, loc, keys, self.ctx)
            changes += moved
            self.stale.mark(fam, [k for k in keys if k in rib.routes])
            if self.received is not None and deleted:
                self.received.forget(fam, [k for k in keys if k not in rib.routes])
            self.long_lived.until[fam] = self._now + llst
            self.counters["llgr_stale_kept"] += kept
            self.counters["llgr_no_llgr_deleted"] += deleted
            why = f"restart time over; kept {llst} s more, marked LLGR_STALE ({deleted} NO_LLGR routes deleted)"
            self._out.append(GracefulRestartEvent("long-lived", kept, f"{C.family_name(fam)}: {why}"))
        self._arm_long_lived()
        if changes:
            self._out.append(RoutesChanged(changes))

    def _long_lived_passed(self, now: float) -> None:
        due = self.long_lived.due(now)
        for fam in due:
            self.long_lived.until.pop(fam, None)
        if due:
            self._drop_stale(due, "expired", "the peer was not back in its long-lived stale time")
        self._arm_long_lived()

    def _arm_long_lived(self) -> None:
        at = self.long_lived.next_deadline()
        if at is None:
            self.timers.pop("llgr_stale", None)
        else:
            self.timers["llgr_stale"] = at

    def _gr_reestablished(self) -> None:
        """Back after a restart: stale routes of families the peer no longer restarts gracefully
        go at once; the rest wait for its End-of-RIB, at most stale_routes_time."""
        self.timers.pop("gr_restart", None)
        self.timers.pop("llgr_stale", None)
        long_lived = set(self.long_lived.until)
        self.long_lived.clear()
        if not self.stale:
            return
        n = self.negotiated
        assert n is not None

        def preserved(f: Family) -> bool:
            if f in long_lived:  # RFC 9494 §4.2: the long-lived capability's own forwarding bit
                return n.long_lived and f in n.peer_llgr_forwarding
            return f in n.peer_gr_forwarding

        gone = [f for f in self.stale.families() if not n.graceful_restart or f not in n.families or not preserved(f)]
        if gone:
            self._drop_stale(gone, "flushed", "the peer came back without forwarding state preserved for the family")
        if self.stale:
            self.timers["gr_stale"] = self._now + self.config.stale_routes_time

    def _drop_stale(self, families: list[Family], phase: str, reason: str) -> None:
        changes: list[BestPathChange] = []
        dropped = 0
        for fam in families:
            keys = self.stale.take(fam)
            rib = self.adj_in.get(fam)
            if self.received is not None:
                self.received.forget(fam, keys)
            if rib is not None and keys:
                dropped += len(keys)
                changes += self.loc_rib[fam].withdraw(rib, keys)
        for fam in families:
            self.long_lived.forget(fam)
        if not self.stale:
            self.timers.pop("gr_restart", None)
            self.timers.pop("gr_stale", None)
            self.long_lived.clear()
        self._arm_long_lived()
        self.counters[f"gr_stale_{phase}"] += dropped
        self._out.append(GracefulRestartEvent(phase, dropped, reason))
        if changes:
            self._out.append(RoutesChanged(changes))

    def _drop_families(self, families: list[Family]) -> None:
        """Forget these families' tables outright (their routes withdrawn)."""
        changes: list[BestPathChange] = []
        for fam in families:
            self.stale.take(fam)
            self.long_lived.forget(fam)
            if self.received is not None:
                self.received.drop(fam)
            rib = self.adj_in.pop(fam, None)
            loc = self.loc_rib.pop(fam, None)
            if rib is not None and loc is not None and rib.routes:
                changes += loc.withdraw(rib, list(rib.routes))
        if changes:
            self._out.append(RoutesChanged(changes))

    # ------------------------------------------------------------------------------------------
    # Messages out

    def _open_message(self) -> Open:
        cfg = self.config
        my_as = cfg.local_as if cfg.local_as <= 0xFFFF else C.AS_TRANS
        return Open(my_as, cfg.hold_time, cfg.router_id, self.local_capabilities)

    def _on_established(self) -> None:
        self.idle_hold = self.config.idle_hold_time
        self.established_at = self._now
        self.counters["established"] += 1
        self._xfer_open = True
        self._gr_reestablished()
        if self.table_backlog(self._now) > 0:
            self._table_since = self._now  # the transfer's own time starts
        else:
            self._table_forget()  # back after table_expect_s: no longer that transfer
        # what the session originates now: the configured announcements, with the virtual
        # router's additions and withdrawals
        self._advertise(self.announcements)
        n = self.negotiated
        for fam in sorted(n.families if n is not None else ()):
            self._write(end_of_rib(fam))

    def _outbound_attributes(self, a: Announcement, v6: bool) -> PathAttributes:
        cfg = self.config
        path = tuple(a.as_path) if cfg.ibgp else (cfg.local_as, *a.as_path)
        segs: tuple[tuple[int, tuple[int, ...]], ...] = ((C.AS_SEQUENCE, path),) if path else ()
        asn4 = self.ctx.asn4
        attrs = [Attribute(C.FLAG_TRANSITIVE, C.ATTR_ORIGIN, C.ORIGIN_IGP)]
        if asn4 or all(x <= 0xFFFF for x in path):
            attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_AS_PATH, segs))
            as4: list[Attribute] = []
        else:  # RFC 6793 §4.2.2: AS_TRANS in AS_PATH, the real path in AS4_PATH
            trans = tuple((st, tuple(x if x <= 0xFFFF else C.AS_TRANS for x in seg)) for st, seg in segs)
            attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_AS_PATH, trans))
            as4 = [Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, C.ATTR_AS4_PATH, segs)]
        if not v6:
            nh = a.next_hop or cfg.next_hop_self
            attrs.append(Attribute(C.FLAG_TRANSITIVE, C.ATTR_NEXT_HOP, nh))
        if a.med is not None:
            attrs.append(Attribute(C.FLAG_OPTIONAL, C.ATTR_MED, a.med))
        if cfg.ibgp:
            attrs.append(
                Attribute(C.FLAG_TRANSITIVE, C.ATTR_LOCAL_PREF, a.local_pref if a.local_pref is not None else 100)
            )
        if a.communities:
            vals = tuple((int(x) << 16) | int(y) for x, y in (c.split(":") for c in a.communities))
            attrs.append(Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, C.ATTR_COMMUNITIES, vals))
        attrs.extend(as4)
        if a.large_communities:
            lcs = tuple(tuple(int(x) for x in c.split(":")) for c in a.large_communities)
            attrs.append(Attribute(C.FLAG_OPTIONAL | C.FLAG_TRANSITIVE, C.ATTR_LARGE_COMMUNITIES, lcs))
        pa = PathAttributes.build(attrs, self.ctx)
        if v6:
            nh6 = a.next_hop or cfg.next_hop_self_v6
            assert nh6 is not None
            pa = with_mp_next_hop(pa, socket.inet_pton(socket.AF_INET6, nh6), self.ctx)
        return pa

    def _advertise(self, announcements: Iterable[Announcement]) -> None:
        groups: dict[tuple[Family, PathAttributes], list[bytes]] = {}
        for fam, pa, keys in self._exported(announcements):
            self.adj_out.setdefault(fam, {}).update(dict.fromkeys(keys, pa))
            groups.setdefault((fam, pa), []).extend(keys)
        if self.state is not State.ESTABLISHED:
            return  # sent when the session comes up
        n = self.negotiated
        for (fam, pa), keys in groups.items():
            if n is not None and fam in n.families:
                self._send_announcements(fam, pa, keys)

    def _exported(self, announcements: Iterable[Announcement]) -> Iterator[tuple[Family, PathAttributes, list[bytes]]]:
        """(family, attributes, keys) of the announcements' prefixes that export lets out."""
        for a in announcements:
            for v6 in (False, True):
                ps = [p for p in a.prefixes if (":" in p) == v6]
                if ps:
                    fam = C.IPV6_UNICAST if v6 else C.IPV4_UNICAST
                    for pa, keys in self._export(fam, a, v6, [encode_prefix(p) for p in ps]).items():
                        yield fam, pa, keys

    def _export(self, fam: Family, a: Announcement, v6: bool, keys: list[bytes]) -> dict[PathAttributes, list[bytes]]:
        """An announcement's prefixes through the export policy, grouped by their attributes."""
        pa = self._outbound_attributes(a, v6)
        rm = self.route_maps.get(("export", fam))
        if rm is None:
            if self._rfc8212:
                self.counters["policy_refused_out"] += len(keys)
                return {}
            return {pa: keys}
        own = a.next_hop or (self.config.next_hop_self_v6 if v6 else self.config.next_hop_self)
        ebgp = 0 if self.config.ibgp else 1
        refused, accepted = rm.apply(fam, keys, pa, self.ctx, self_next_hop=own, prepend_after=ebgp)
        self.counters["policy_refused_out"] += len(refused)
        return accepted

    def _readvertise(self, fam: Family) -> None:
        groups: dict[PathAttributes, list[bytes]] = {}
        for k, pa in self.adj_out.get(fam, {}).items():
            groups.setdefault(pa, []).append(k)
        for pa, keys in groups.items():
            self._send_announcements(fam, pa, keys)
        self._write(end_of_rib(fam))

    def _send_announcements(self, fam: Family, pa: PathAttributes, keys: list[bytes]) -> None:
        limit = self.ctx.max_message_len
        wire_attrs = [a for a in pa.attrs if a.type_code != MP_NEXT_HOP]
        base = PathAttributes.build(wire_attrs, self.ctx) if len(wire_attrs) != len(pa.attrs) else pa
        room = limit - C.HEADER_LEN - 4 - len(base.wire) - (64 if fam != C.IPV4_UNICAST else 0)
        for chunk in _chunks(keys, room):
            if fam == C.IPV4_UNICAST:
                u = Update([], base, chunk)
            else:
                nh = pa.get(MP_NEXT_HOP)
                nh_bytes = socket.inet_pton(socket.AF_INET6, nh) if nh else b""
                mp = MpReach(fam[0], fam[1], nh_bytes, 0, chunk, b"")
                u = Update([], base, [], mp, None)
            self._write(encode_update(u, self.ctx))
            self.counters["updates_out"] += 1
            self.counters["prefixes_out"] += len(chunk)
        self._act(Action.KEEPALIVE_TIMER_RESTART, self.state)  # §8.2.2: an UPDATE sent counts as a KEEPALIVE

    def _send_withdrawals(self, fam: Family, keys: list[bytes]) -> None:
        room = self.ctx.max_message_len - C.HEADER_LEN - 4 - 16
        for chunk in _chunks(keys, room):
            if fam == C.IPV4_UNICAST:
                u = Update(chunk, None, [])
            else:
                u = Update([], None, [], None, MpUnreach(fam[0], fam[1], chunk, b""))
            self._write(encode_update(u, self.ctx))
            self.counters["updates_out"] += 1
            self.counters["withdrawals_out"] += len(chunk)

    # ------------------------------------------------------------------------------------------
    # Snapshot / restore

    def snapshot(self) -> bytes:
        w = SnapshotWriter(self.protocol)
        n = self.negotiated
        w.json(
            {
                "config": self.config.model_dump(mode="json"),
                "state": self.state.value,
                "connect_retry_counter": self.connect_retry_counter,
                "timers": self.timers,
                "long_lived": self.long_lived.to_json(),
                "idle_hold": self.idle_hold,
                "connected": self.connected,
                "hold_time": self.hold_time,
                "keepalive_time": self.keepalive_time,
                "established_at": self.established_at,
                "counters": dict(self.counters),
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
                "peer_open": None if self.peer_open is None else encode_message(self.peer_open).hex(),
                # the context the Adj-RIB-In was decoded in (while down, routes kept stale keep it)
                "rib_context": {"asn4": self.ctx.asn4, "add_path": sorted(self.ctx.add_path)},
                "prefix_limit": [sorted(self.prefix_limit.warned), sorted(self.prefix_limit.exceeded)],
                "bfd": [self.bfd_down, self.bfd_downs],
                # the originated announcements, where the virtual router changed them
                "announcements": None
                if self.announcements == list(self.config.announce)
                else [a.model_dump(mode="json") for a in self.announcements],
                "router_id": self.source.router_id,
                "table": [
                    self._table_expected,
                    self._table_size,
                    self._table_since,
                    sorted(self._table_eor),
                    self._xfer_open,
                ],
            }
        )
        w.blob(self._reader.pending_bytes())
        for table in (self._adj_in_tables(), self._adj_out_tables()):
            w.u32(len(table))
            for fam, rows in table:
                _write_rib(w, fam, rows)
        self.stale.write(w)
        received = self.received.tables() if self.received is not None else []
        w.u32(len(received) if self.received is not None else 0xFFFFFFFF)
        for fam, rows in received:
            _write_rib(w, fam, rows)
        return w.getvalue()

    def _adj_in_tables(self) -> list[tuple[Family, dict[bytes, PathAttributes]]]:
        return [(fam, rib.routes) for fam, rib in sorted(self.adj_in.items())]

    def _adj_out_tables(self) -> list[tuple[Family, dict[bytes, PathAttributes]]]:
        return sorted(self.adj_out.items())

    @classmethod
    @decodes_snapshot
    def restore(cls, blob: bytes) -> BgpSession:
        r = SnapshotReader(blob, cls.protocol)
        meta = r.json()
        try:
            s = cls(BgpSessionConfig.model_validate(meta["config"]))
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
            neg = meta["negotiated"]
            if meta["peer_open"]:
                m = decode_open(bytes.fromhex(meta["peer_open"])[C.HEADER_LEN :])
                s.peer_open = m
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
                s._set_context()
            elif meta.get("rib_context"):
                rc = meta["rib_context"]
                s.ctx = CodecContext(
                    asn4=bool(rc["asn4"]), ibgp=s.config.ibgp, add_path=frozenset(tuple(f) for f in rc["add_path"])
                )
        except (KeyError, TypeError, ValueError, BgpError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DecodeError(f"bgp snapshot: state is invalid: {first}") from None
        s._reader.feed(r.blob())
        for i in range(r.u32()):
            fam, rows = _read_rib(r, s.ctx)
            rib = s.adj_in.get(fam)
            if rib is None and s.negotiated is None and rows:
                # down, with routes kept stale: the table outlives the session
                rib = s.adj_in[fam] = AdjRibIn(s.source, fam, fam in s.ctx.add_path, s.prefix_limit.rib_limit)
                s.loc_rib[fam] = LocRib(fam)
                s.loc_rib[fam].add_source(rib)
            if rib is None:
                raise DecodeError(f"snapshot Adj-RIB-In #{i} is for family {fam}, which the session did not negotiate")
            groups: dict[int, tuple[PathAttributes, list[bytes]]] = {}
            for key, pa in rows.items():
                groups.setdefault(id(pa), (pa, []))[1].append(key)
            for pa, keys in groups.values():
                s.loc_rib[fam].update(rib, keys, pa)
        for _ in range(r.u32()):
            fam, rows = _read_rib(r, s.ctx)
            s.adj_out[fam] = rows
        s.stale = StaleRoutes.read(r)
        n_received = r.u32()
        s.received = None if n_received == 0xFFFFFFFF else ReceivedRoutes()
        for _ in range(0 if n_received == 0xFFFFFFFF else n_received):
            fam, rows = _read_rib(r, s.ctx)
            assert s.received is not None
            s.received.load(fam, rows)
        for fam in s.stale.families():
            rib = s.adj_in.get(fam)
            if rib is None or not s.stale.within(fam, rib.routes.keys()):
                raise DecodeError(f"snapshot marks routes of {C.family_name(fam)} stale that its Adj-RIB-In lacks")
        r.done()
        return s


def _write_rib(w: SnapshotWriter, fam: Family, rows: dict[bytes, PathAttributes]) -> None:
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
    w.blobs([_mp_next_hop_bytes(pa) for pa in table])
    w.blobs(refs)


def _mp_next_hop_bytes(pa: PathAttributes) -> bytes:
    nh = pa.get(MP_NEXT_HOP)
    return b"" if nh is None else socket.inet_pton(socket.AF_INET6 if ":" in nh else socket.AF_INET, nh)


def _read_rib(r: SnapshotReader, ctx: CodecContext) -> tuple[Family, dict[bytes, PathAttributes]]:
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


def end_of_rib(fam: Family) -> bytes:
    """RFC 4724 §2 End-of-RIB marker."""
    if fam == C.IPV4_UNICAST:
        return encode_update(Update())
    return encode_update(Update([], None, [], None, MpUnreach(fam[0], fam[1], [], b"")))


def _chunks(keys: list[bytes], room: int) -> Iterable[list[bytes]]:
    chunk: list[bytes] = []
    used = 0
    for k in keys:
        if used + len(k) > room and chunk:
            yield chunk
            chunk, used = [], 0
        chunk.append(k)
        used += len(k)
    if chunk:
        yield chunk

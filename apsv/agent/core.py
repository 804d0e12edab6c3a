"""The agent: a virtual router's sockets on one side, the APSV cluster on the other.

It terminates BGP over TCP (`bgp_transport.py`: listening for passive sessions, connecting for
active ones when the stack asks) and BFD over UDP (`bfd_engine.py`), turns what arrives into
offload frames and sends them, batched, straight to the stack instances holding their sessions
(`OffloadClient`). What the stacks return is applied here: bytes to a peer, a transport to open
or close, a BFD transmission program, and events for the virtual router - delivered to a
callback and, as JSON lines, to a file or an async stream.

Everything it holds is bounded: the buffer pool and batches in flight (a slow cluster stops the
agent reading from its sockets, so TCP pushes back on the peers), each connection's write
buffer, the event queue. Stacks' timers are driven by TIMER frames: every input a stack sees
is a frame, so a session restored on another instance and fed the same frames again does
exactly what the original did. A BGP session gets one when its instance says a timer is due
(DEADLINE frames), and every `timer_interval_s` until it has said.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from apsv.agent.bfd_engine import BfdEngine
from apsv.agent.bgp_transport import BgpLink, BgpTransports
from apsv.agent.config import EVENT_LEVELS, AgentConfig, BfdPeer, BgpPeer, Key
from apsv.agent.events import EventBuffer
from apsv.agent.tcp import listening_socket
from apsv.frame import Frame, FrameKind, ProtocolId, decode_deadline
from apsv.runtime.buffer_pool import BufferPool
from apsv.runtime.client import OffloadClient

log = logging.getLogger("apsv.agent")

EventCallback = Callable[[dict[str, Any]], None]


@dataclass
class AgentCounters:
    frames_out: int = 0  # frames sent into the cluster
    frames_in: int = 0  # frames the cluster returned
    octets_to_peers: int = 0
    octets_from_peers: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0  # from an address no session expects, or a session already connected
    connects: int = 0
    connect_failures: int = 0
    write_overflows: int = 0  # a peer not reading: its connection closed rather than buffer without end
    backpressure_waits: int = 0
    events: int = 0
    events_dropped: int = 0  # kept events dropped, oldest first, to stay within the buffer's bounds
    event_bytes_held: int = 0  # JSON octets of the events kept, not yet taken
    timer_frames: int = 0  # TIMER frames sent: one per timer due, not one per session per tick


@dataclass
class Agent(BgpTransports):
    """Create with a config and the multiplexer's handle, then `await start()`; `await stop()` ends it.

    Events go to `on_event`, to the configured JSON-lines file, and - with `keep_events`, or
    once someone iterates `events()` - into a buffer bounded by `max_events` and
    `max_event_bytes` (`take_events()` empties it)."""

    config: AgentConfig
    multiplexer: Any
    on_event: EventCallback | None = None
    keep_events: bool = False
    c: AgentCounters = field(default_factory=AgentCounters)

    def __post_init__(self) -> None:
        self.client: OffloadClient | None = None
        self.bgp: dict[Key, BgpLink] = {}
        self.bfd: BfdEngine | None = None
        self.servers: list[asyncio.AbstractServer] = []
        # (netns, address, port) it listens on -> peer address -> session
        self.listeners: dict[tuple[str | None, str, int], dict[str, Key]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._kick = asyncio.Event()
        # When each BGP session next needs a TIMER frame: its instance's DEADLINE frames say;
        # until one has, and after a tick it has not answered yet, every timer_interval_s.
        self._wake: dict[Key, float] = {}
        # Senders waiting for room (the session, its payload's length, what wakes it): the pump
        # wakes only those that can now send - waking every waiter on every answer made a
        # hundred sessions behind one busy instance spin the agent's CPU.
        self._senders: list[tuple[Key, int, asyncio.Future[None]]] = []
        self.event_buffer = EventBuffer(self.config.max_events, self.config.max_event_bytes)
        self._event_ready = asyncio.Event()
        self._events_file: Any = None
        self._stopping = False
        self.placed: dict[Key, str] = {}
        self.session_names: dict[Key, str] = {}
        self._readers: set[int] = set()  # the client's sockets this loop watches
        self.bfd_clients: dict[Key, list[Key]] = {}  # BFD session -> the BGP sessions relying on it
        self._commands: set[asyncio.Task[None]] = set()  # BFD state on its way to BGP sessions

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> dict[Key, str]:
        """Open every configured session in the cluster, then the sockets. Returns where each
        session was placed (or why it was refused)."""
        loop = asyncio.get_running_loop()
        slots = self.config.max_inflight + 1  # a free buffer whenever a batch may be sent
        # Shared memory with the stack instances on this node; those elsewhere get the frames
        # through the object store (the client picks per instance).
        pool = BufferPool(slots=slots, slot_bytes=self.config.buffer_bytes, shared=True)
        self.client = await OffloadClient.connect(
            self.multiplexer,
            pool=pool,
            tenant=self.config.tenant,  # it may open only this tenant's sessions
            max_inflight=self.config.max_inflight,
            on_output=self._on_output,
            metrics_label="agent",
        )
        if self.config.events:
            self._events_file = open(self.config.events, "a", buffering=1)  # noqa: SIM115 - closed in stop()
        sessions = self.config.sessions()
        # a BFD session a BGP session relies on: its state changes go to that BGP session
        for key, proto, _cfg, _vrouter, peer in sessions:
            if proto == "bgp" and isinstance(peer, BgpPeer) and peer.bfd is not None:
                bfd_key = (key[0], key[1], int(ProtocolId.BFD), peer.bfd)
                self.bfd_clients.setdefault(bfd_key, []).append(key)
        specs = [
            # such a BFD session sends its state changes even where its virtual router wants none
            (key, proto, cfg, max(EVENT_LEVELS[peer.events], EVENT_LEVELS["state"] if key in self.bfd_clients else 0))
            for key, proto, cfg, _v, peer in sessions
        ]
        specs, ref = self.client.open_request(specs)
        self.placed = self.client.adopt(specs, await ref)
        refused = {k: v for k, v in self.placed.items() if v.startswith("error")}
        for k, why in refused.items():
            self._event(k, {"event": "refused", "detail": why})
        self.bfd = BfdEngine(self._bfd_forward, self._bfd_expired, loop)
        for key, proto, _cfg, vrouter, peer in sessions:
            if key in refused:
                continue
            self.session_names[key] = f"{vrouter.name or vrouter.id}/{proto}{key[3]}"
            if proto == "bgp":
                assert isinstance(peer, BgpPeer)
                self.bgp[key] = BgpLink(key, peer, vrouter)
                if peer.mode == "passive":
                    self.listeners.setdefault((peer.netns, *peer.listen_endpoint()), {})[peer.peer_endpoint()[0]] = key
            else:
                assert isinstance(peer, BfdPeer)
                auth = peer.auth.key() if peer.auth else None
                self.bfd.add(key, peer.local_address, peer.peer_address, peer.netns, auth)
        for (ns, host, port), peers in self.listeners.items():
            links = [self.bgp[k].peer for k in peers.values()]
            md5 = {addr: pw for addr, k in peers.items() if (pw := self.bgp[k].peer.md5_key()) is not None}
            sock = listening_socket(ns, host, port, md5, links[0].ttl_security_hops)
            srv = await asyncio.start_server(functools.partial(self._accepted, ns), sock=sock)
            self.servers.append(srv)
        self._tasks.append(loop.create_task(self._pump(), name="apsv-agent-pump"))
        self._tasks.append(loop.create_task(self._ticker(), name="apsv-agent-timers"))
        # Let every stack run its start-up output (an active BGP session asks for its connection).
        for key in self.bgp:
            await self._send_frame(key, FrameKind.TIMER, b"")
        return dict(self.placed)

    async def stop(self) -> None:
        self._stopping = True
        for srv in self.servers:
            srv.close()
        for link in self.bgp.values():
            if link.reader_task is not None:
                link.reader_task.cancel()
            if link.writer is not None:
                link.writer.close()
        if self.bfd is not None:
            self.bfd.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.client is not None:
            c = self.client
            keys = [k for k, v in self.placed.items() if not v.startswith("error")]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.multiplexer.close_sessions.remote(c.client_id, c.credential, keys), 30)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.multiplexer.close_client.remote(c.client_id, c.credential), 10)
            self._unwatch()
            c.release()
        if self._events_file is not None:
            self._events_file.close()

    # -- the virtual router's API --------------------------------------------------------------

    async def command(self, vrouter: int, session: int, protocol: str, command: dict[str, Any]) -> None:
        """Send a command to a session's stack (BGP: announce / withdraw / stop / start; BFD:
        admin-down / admin-up). Its effects come back as events."""
        key = (self.config.tenant, vrouter, int(ProtocolId[protocol.upper()]), session)
        if key not in self.placed or self.placed[key].startswith("error"):
            raise KeyError(f"no open {protocol} session {session} on virtual router {vrouter}")
        await self._send_frame(key, FrameKind.CONTROL, json.dumps(command).encode())

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event as it happens (the JSON-lines stream's content, as dicts); those the
        buffer dropped while the reader was slow are counted in `events_dropped`."""
        self.keep_events = True
        while True:
            while len(self.event_buffer):
                yield self.event_buffer.pop()
            self._event_ready.clear()
            await self._event_ready.wait()

    def take_events(self) -> list[dict[str, Any]]:
        """The events kept since the last call (within the buffer's bounds)."""
        return self.event_buffer.drain()

    def status(self) -> dict[str, Any]:
        links = {}
        for key, link in self.bgp.items():
            links[self.session_names.get(key, str(key))] = {
                "connected": link.writer is not None,
                "remote": list(link.remote) if link.remote else None,
                "connected_at": link.connected_at,
                "octets_in": link.octets_in,
                "first_rx": link.first_rx,
                "last_rx": link.last_rx,
            }
        return {
            "counters": vars(self.c).copy(),
            "bgp": links,
            "bfd": vars(self.bfd.c).copy() if self.bfd else {},
            "client": vars(self.client.stats).copy() if self.client else {},
            "client_name": self.client.client_id if self.client else None,  # it carries the tenant
        }

    def _event(self, key: Key, ev: dict[str, Any]) -> None:
        clients = self.bfd_clients.get(key)
        if clients and ev.get("event") == "state":
            # RFC 5882: the BGP sessions decide what a BFD state change means (BgpSession.bfd_changed)
            cmd = json.dumps({"op": "bfd", "old": ev.get("old"), "new": ev.get("new"), "reason": ev.get("reason", "")})
            for bgp_key in clients:
                task = asyncio.get_running_loop().create_task(
                    self._send_frame(bgp_key, FrameKind.CONTROL, cmd.encode())
                )
                self._commands.add(task)
                task.add_done_callback(self._commands.discard)
        ev = {
            "ts": time.time(),
            "tenant": key[0],
            "vrouter": key[1],
            "protocol": ProtocolId(key[2]).name.lower(),
            "session": key[3],
            **ev,
        }
        self.c.events += 1
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:
                log.exception("event callback failed")
        if self._events_file is None and not self.keep_events:
            return
        line = json.dumps(ev, separators=(",", ":"))
        if self._events_file is not None:
            self._events_file.write(line + "\n")
        if self.keep_events:
            buf = self.event_buffer
            buf.push(ev, len(line) + 1)  # nobody reading: the oldest go, counted
            self.c.events_dropped = buf.dropped
            self.c.event_bytes_held = buf.bytes
            self._event_ready.set()

    # -- into the cluster ----------------------------------------------------------------------

    async def _send_frame(self, key: Key, kind: int, payload: bytes | memoryview, rx_ns: int = 0) -> None:
        client = self.client
        assert client is not None
        while not client.can_send(len(payload), key):
            # Its instance's window, or every buffer, is in flight: wait for the cluster (the
            # caller stops reading this session's socket - only this one, for a window).
            self.c.backpressure_waits += 1
            room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._senders.append((key, len(payload), room))
            self._kick.set()
            await room
        if client.pending_frames and client.pending_room() < 56 + len(payload):
            client.flush()  # full: out it goes (can_send said a batch slot is free)
        client.send(key, payload, kind, rx_ns or time.time_ns())
        self.c.frames_out += 1
        self._kick.set()

    async def _pump(self) -> None:
        """Send batches (at once while few are in flight, else as the cluster answers: Nagle's
        rule) and take in what comes back. The client's sockets wake this loop (its readers);
        only cross-node calls, which have none, are polled (every 2 ms while any is out)."""
        client = self.client
        assert client is not None
        while not self._stopping:
            if client.pending_frames and client.inflight < min(2, client.max_inflight):
                client.flush()
            try:
                client.wait(0.0)
            except Exception:
                log.exception("taking in the cluster's answers")
            self._wake_senders()
            self._watch(client.fds())
            self._kick.clear()
            if client.pending_frames and client.inflight < min(2, client.max_inflight):
                continue
            timeout = 0.002 if client.needs_polling() else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)

    def _wake_senders(self) -> None:
        """Wake the waiting senders that the cluster's answers made room for (oldest first)."""
        if not self._senders:
            return
        client = self.client
        assert client is not None
        waiting = []
        for key, n, room in self._senders:
            if room.done():  # its task was cancelled
                continue
            if client.can_send(n, key):
                room.set_result(None)
            else:
                waiting.append((key, n, room))
        self._senders = waiting

    def _watch(self, fds: list[int]) -> None:
        """Wake the pump when any of the client's sockets has something to read."""
        loop = asyncio.get_running_loop()
        want = set(fds)
        for fd in self._readers - want:
            loop.remove_reader(fd)
        for fd in want - self._readers:
            loop.add_reader(fd, self._kick.set)
        self._readers = want

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._readers:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        self._readers = set()

    async def _ticker(self) -> None:
        interval = self.config.timer_interval_s
        while not self._stopping:
            await asyncio.sleep(interval)
            now = time.time()
            wake = self._wake
            for key in list(self.bgp):
                if wake.get(key, 0.0) <= now:
                    # until the instance says when next (its DEADLINE), tick again after an interval
                    wake[key] = now + interval
                    self.c.timer_frames += 1
                    await self._send_frame(key, FrameKind.TIMER, b"")

    # -- out of the cluster --------------------------------------------------------------------

    def _on_output(self, f: Frame) -> None:
        self.c.frames_in += 1
        key = (f.tenant, f.vrouter, f.protocol, f.session)
        kind = f.kind
        if kind == FrameKind.SEND:
            self._write(key, bytes(f.payload))
        elif kind == FrameKind.CLOSE:
            self._close(key, bytes(f.payload).decode(errors="replace"))
        elif kind == FrameKind.DEADLINE:
            if key in self.bgp:
                self._wake[key] = decode_deadline(f.payload)
        elif kind == FrameKind.OPEN:
            link = self.bgp.get(key)
            if link is not None and link.writer is None and not link.connecting and link.peer.mode == "active":
                link.connecting = True
                asyncio.get_running_loop().create_task(self._connect(link))
        elif kind == FrameKind.TX_PROGRAM:
            if self.bfd is not None:
                self.bfd.program(key, bytes(f.payload))
        elif kind == FrameKind.EVENTS:
            for line in bytes(f.payload).decode().splitlines():
                with contextlib.suppress(ValueError):
                    self._event(key, json.loads(line))

    # -- BFD -----------------------------------------------------------------------------------

    def _bfd_forward(self, key: Key, packet: bytes, rx_ns: int) -> None:
        asyncio.get_running_loop().create_task(self._send_frame(key, FrameKind.DATA, packet, rx_ns))

    def _bfd_expired(self, key: Key) -> None:
        self._event(key, {"event": "bfd-detect-expired"})
        asyncio.get_running_loop().create_task(self._send_frame(key, FrameKind.EXPIRED, b"detect"))

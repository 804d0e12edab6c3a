"""The agent's BGP transports: one TCP connection per BGP session, accepted on a listening
socket (a passive session) or opened when its stack asks (an active one), its bytes sent to
the stack as DATA frames and the stack's bytes written back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apsv.agent.config import AgentConfig, BgpPeer, Key, VRouter
from apsv.agent.tcp import connecting_socket
from apsv.frame import FrameKind

if TYPE_CHECKING:
    from apsv.agent.core import AgentCounters


@dataclass
class BgpLink:
    """One BGP session's transport: its TCP connection, while there is one, and what it read."""

    key: Key
    peer: BgpPeer
    vrouter: VRouter
    reader_task: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None
    connecting: bool = False
    remote: tuple[str, int] | None = None
    connected_at: float = 0.0
    octets_in: int = 0
    first_rx: float = 0.0
    last_rx: float = 0.0


class BgpTransports:
    """The BGP transports' part of `Agent`, which supplies what is declared here: its
    configuration, counters, links and listeners, and how frames and events go out."""

    config: AgentConfig
    c: AgentCounters
    bgp: dict[Key, BgpLink]
    listeners: dict[tuple[str | None, str, int], dict[str, Key]]
    _stopping: bool

    # Agent's own: a frame to a session's stack, an event for the virtual router
    async def _send_frame(self, key: Key, kind: int, payload: bytes | memoryview, rx_ns: int = 0) -> None:
        raise NotImplementedError

    def _event(self, key: Key, ev: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _accepted(self, netns: str | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("sockname")
        key = self.listeners.get((netns, sock[0], sock[1]), {}).get(peer[0]) if peer and sock else None
        link = self.bgp.get(key) if key is not None else None
        if link is None or link.writer is not None:
            # No session expects this address here, or it is already connected (a collision:
            # the established connection wins, RFC 4271 §6.8).
            self.c.connections_refused += 1
            writer.close()
            return
        self.c.connections_accepted += 1
        await self._attach(link, reader, writer)

    async def _connect(self, link: BgpLink) -> None:
        host, port = link.peer.peer_endpoint()
        p = link.peer
        self.c.connects += 1
        try:
            sock = connecting_socket(p.netns, host, p.local_address, p.md5_key(), p.ttl_security_hops)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout=10)
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError) as e:
            self.c.connect_failures += 1
            link.connecting = False
            await self._send_frame(link.key, FrameKind.DISCONNECTED, f"connect failed: {e}".encode())
            return
        link.connecting = False
        await self._attach(link, reader, writer)

    async def _attach(self, link: BgpLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.writer = writer
        link.remote = writer.get_extra_info("peername")[:2]
        link.connected_at, link.octets_in = time.time(), 0
        info = {"local": list(writer.get_extra_info("sockname")[:2]), "remote": list(link.remote or ())}
        self._event(link.key, {"event": "transport", "state": "up", **info})
        await self._send_frame(link.key, FrameKind.CONNECTED, json.dumps(info).encode())
        link.reader_task = asyncio.get_running_loop().create_task(self._read(link, reader, writer))

    async def _read(self, link: BgpLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "connection closed by the peer"
        sock = writer.get_extra_info("socket")
        quickack = getattr(socket, "TCP_QUICKACK", None)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if quickack is not None and sock is not None:
                    # ACK at once: a sender held by Nagle would otherwise wait out our delayed ACK
                    # (40 ms) for every partial segment of a burst. Linux clears the mode by itself.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                now = time.time()
                if not link.octets_in:
                    link.first_rx = now
                link.octets_in += len(data)
                link.last_rx = now
                self.c.octets_from_peers += len(data)
                await self._send_frame(link.key, FrameKind.DATA, data, int(now * 1e9))
        except (OSError, asyncio.IncompleteReadError) as e:
            reason = f"connection error: {e}"
        except asyncio.CancelledError:
            return
        if link.writer is writer:
            link.writer = None
            link.remote = None
            writer.close()
            self._event(link.key, {"event": "transport", "state": "down", "reason": reason})
            if not self._stopping:
                await self._send_frame(link.key, FrameKind.DISCONNECTED, reason.encode())

    def _write(self, key: Key, data: bytes) -> None:
        link = self.bgp.get(key)
        if link is None or link.writer is None:
            return  # the connection went away; the stack hears of it through DISCONNECTED
        transport = link.writer.transport
        if transport.get_write_buffer_size() + len(data) > self.config.max_write_buffer:
            self.c.write_overflows += 1
            self._close(key, "peer not reading: write buffer limit reached")
            return
        link.writer.write(data)
        self.c.octets_to_peers += len(data)

    def _close(self, key: Key, reason: str) -> None:
        link = self.bgp.get(key)
        if link is None or link.writer is None:
            return
        writer, link.writer = link.writer, None
        link.remote = None
        if link.reader_task is not None:
            link.reader_task.cancel()
        writer.close()  # after what was written before: the NOTIFICATION goes out first
        self._event(key, {"event": "transport", "state": "down", "reason": reason})
        if not self._stopping:
            asyncio.get_running_loop().create_task(self._send_frame(key, FrameKind.DISCONNECTED, reason.encode()))

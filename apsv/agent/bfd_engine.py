"""The agent's half of BFD: sockets, periodic transmission and detection, as a line card does.

For each session the stack sends a transmission program (`apsv.bfd.program`). The engine
sends the program's packet every interval (less RFC 5880 §6.8.7's 0-25% jitter), signs it
(the agent holds the session's key and sequence number), and checks every packet received:
RFC 5881 TTL 255, the RFC 5880 §6.8.6 rules, authentication with the sequence window, the
discriminators. A valid packet re-arms the detection timer; only a packet that says
something new (or asks for a Final) goes to the stack. If the detection time passes without
a valid packet, the stack is told (an EXPIRED frame) - so detection does not wait on the
cluster, and nothing the cluster does (moving or losing an instance) delays a packet.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apsv.agent.netns import in_netns
from apsv.bfd.packet import BFD_PORT, MAX_PACKET, AuthKey, AuthRxState, BfdDecodeError, decode, encode, verify
from apsv.bfd.program import TxProgram

log = logging.getLogger("apsv.agent.bfd")

Key = tuple[int, int, int, int]
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
SOURCE_PORTS = (49152, 65535)  # RFC 5881 §4


@dataclass
class BfdCounters:
    tx: int = 0
    rx: int = 0
    forwarded: int = 0
    expired: int = 0
    bad_ttl: int = 0
    malformed: int = 0
    auth_failed: int = 0
    wrong_discriminator: int = 0
    unknown_peer: int = 0


@dataclass
class BfdLink:
    key: Key
    local: str
    peer: str
    netns: str | None
    auth: AuthKey | None
    program: TxProgram | None = None
    local_disc: int = 0
    tx_seq: int = field(default_factory=lambda: random.getrandbits(32))
    rx_auth: AuthRxState = field(default_factory=AuthRxState)
    last_forwarded: tuple[int, ...] | None = None
    tx_handle: asyncio.TimerHandle | None = None
    detect_handle: asyncio.TimerHandle | None = None
    tx_sock: socket.socket | None = None
    last_rx: float = 0.0


class BfdEngine:
    def __init__(
        self,
        forward: Callable[[Key, bytes, int], None],
        expired: Callable[[Key], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """`forward(key, packet, rx_ns)` hands a packet to the stack; `expired(key)` reports detection."""
        self.loop = loop or asyncio.get_event_loop()
        self.forward = forward
        self.expired_cb = expired
        self.links: dict[Key, BfdLink] = {}
        self.by_addr: dict[tuple[str | None, str, str], BfdLink] = {}
        self.rx_socks: dict[tuple[str | None, str], socket.socket] = {}
        self.c = BfdCounters()
        self._next_port = SOURCE_PORTS[0]

    # -- sessions ------------------------------------------------------------------------------

    def add(self, key: Key, local: str, peer: str, netns: str | None, auth: AuthKey | None) -> None:
        link = BfdLink(key, local, peer, netns, auth)
        where = (netns, local)
        if where not in self.rx_socks:
            rx = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            rx.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            rx.bind((local, BFD_PORT))
            rx.setblocking(False)
            self.rx_socks[where] = rx
            self.loop.add_reader(rx.fileno(), self._readable, rx, netns, local)
        link.tx_sock = self._tx_socket(netns, local)
        self.links[key] = link
        self.by_addr[(netns, local, peer)] = link

    def _tx_socket(self, netns: str | None, local: str) -> socket.socket:
        for _ in range(SOURCE_PORTS[1] - SOURCE_PORTS[0] + 1):
            port = self._next_port
            self._next_port = port + 1 if port < SOURCE_PORTS[1] else SOURCE_PORTS[0]
            s = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)  # RFC 5881 §5 (GTSM)
                s.bind((local, port))
                s.setblocking(False)
                return s
            except OSError:
                s.close()
        raise OSError(f"no free BFD source port on {local}")

    def remove(self, key: Key) -> None:
        link = self.links.pop(key, None)
        if link is None:
            return
        self.by_addr.pop((link.netns, link.local, link.peer), None)
        for h in (link.tx_handle, link.detect_handle):
            if h is not None:
                h.cancel()
        if link.tx_sock is not None:
            link.tx_sock.close()

    def close(self) -> None:
        for key in list(self.links):
            self.remove(key)
        for s in self.rx_socks.values():
            self.loop.remove_reader(s.fileno())
            s.close()
        self.rx_socks.clear()

    # -- programs from the stack ---------------------------------------------------------------

    def program(self, key: Key, data: bytes) -> None:
        link = self.links.get(key)
        if link is None:
            return
        prog = TxProgram.decode(data)
        old = link.program
        link.program = prog
        link.local_disc = decode(prog.packet).my_disc
        if prog.once:
            self._send(link, prog.once)
        if old is None or old.tx_interval_us != prog.tx_interval_us or link.tx_handle is None:
            self._schedule_tx(link, first=not prog.once)
        if prog.detect_time_us == 0:
            if link.detect_handle is not None:
                link.detect_handle.cancel()
                link.detect_handle = None
        elif link.detect_handle is None or old is None or old.detect_time_us != prog.detect_time_us:
            self._arm(link)

    def _schedule_tx(self, link: BfdLink, first: bool = False) -> None:
        if link.tx_handle is not None:
            link.tx_handle.cancel()
            link.tx_handle = None
        prog = link.program
        if prog is None or prog.tx_interval_us == 0:
            return
        interval = prog.tx_interval_us / 1e6
        # §6.8.7: 0-25% less than the interval (10-25% with a detect multiplier of 1).
        low = 0.75
        high = 0.9 if prog.detect_mult == 1 else 1.0
        delay = 0.0 if first else interval * random.uniform(low, high)
        link.tx_handle = self.loop.call_later(delay, self._tick, link)

    def _tick(self, link: BfdLink) -> None:
        link.tx_handle = None
        if link.program is not None:
            self._send(link, link.program.packet)
            self._schedule_tx(link)

    def _send(self, link: BfdLink, packet: bytes) -> None:
        if link.tx_sock is None:
            return
        if link.auth is not None:
            link.tx_seq = (link.tx_seq + 1) & 0xFFFFFFFF
            packet = encode(decode(packet), link.auth, link.tx_seq)
        try:
            link.tx_sock.sendto(packet, (link.peer, BFD_PORT))
            self.c.tx += 1
        except OSError as e:  # an interface going down: detection will tell the stack
            log.debug("BFD send to %s failed: %s", link.peer, e)

    def _arm(self, link: BfdLink) -> None:
        if link.detect_handle is not None:
            link.detect_handle.cancel()
        prog = link.program
        if prog is None or prog.detect_time_us == 0:
            link.detect_handle = None
            return
        link.detect_handle = self.loop.call_later(prog.detect_time_us / 1e6, self._expire, link)

    def _expire(self, link: BfdLink) -> None:
        link.detect_handle = None
        self.c.expired += 1
        link.last_forwarded = None  # whatever comes next is news
        self.expired_cb(link.key)

    # -- receiving -----------------------------------------------------------------------------

    def _readable(self, sock: socket.socket, netns: str | None, local: str) -> None:
        for _ in range(64):  # a bounded burst, then back to the loop
            try:
                data, anc, _flags, addr = sock.recvmsg(MAX_PACKET + 64, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("BFD receive on %s: %s", local, e)
                return
            self._received(data, anc, addr, netns, local)

    def _received(self, data: bytes, anc: list[Any], addr: tuple[str, int], netns: str | None, local: str) -> None:
        self.c.rx += 1
        ttl = None
        for level, kind, value in anc:
            if level == socket.IPPROTO_IP and kind in (socket.IP_TTL, IP_RECVTTL):
                ttl = struct.unpack("i", value[:4])[0] if len(value) >= 4 else value[0]
        if ttl != 255:
            self.c.bad_ttl += 1  # RFC 5881 §5: single hop packets come with TTL 255
            return
        link = self.by_addr.get((netns, local, addr[0]))
        if link is None:
            self.c.unknown_peer += 1
            return
        try:
            p = decode(data)
        except BfdDecodeError:
            self.c.malformed += 1
            return
        if p.your_disc and link.local_disc and p.your_disc != link.local_disc:
            self.c.wrong_discriminator += 1
            return
        if verify(data, p, link.auth, link.rx_auth):
            self.c.auth_failed += 1
            return
        link.last_rx = time.monotonic()
        if link.detect_handle is not None or (link.program is not None and link.program.detect_time_us):
            self._arm(link)
        sig = p.significant()
        if p.poll or sig != link.last_forwarded:
            link.last_forwarded = sig
            self.c.forwarded += 1
            self.forward(link.key, data, time.time_ns())

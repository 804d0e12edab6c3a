"""The hostile peer's wire: BGP messages built by hand (so that they can be malformed in every
way a case needs), and a TCP connection to the agent read as BGP messages."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from apsv.bgp import constants as C
from apsv.bgp.errors import BgpError
from apsv.bgp.framing import MessageReader

MARKER = b"\xff" * 16
OPEN, UPDATE, NOTIFICATION, KEEPALIVE, ROUTE_REFRESH = 1, 2, 3, 4, 5
NEXT_HOP = "198.51.100.1"


def message(mtype: int, body: bytes = b"", length: int | None = None) -> bytes:
    return MARKER + struct.pack("!HB", 19 + len(body) if length is None else length, mtype) + body


def open_message(
    asn: int, hold: int, router_id: str, *, version: int = 4, params: bytes | None = None, asn_field: int = 23456
) -> bytes:
    """An OPEN: IPv4 unicast, 4-octet AS `asn`, route refresh (or the given optional parameters)."""
    if params is None:
        params = bytes.fromhex("0206010400010001" + f"02064104{asn:08x}" + "02020200")
    body = struct.pack("!BHH4sB", version, asn_field, hold, socket.inet_aton(router_id), len(params)) + params
    return message(OPEN, body)


def update_message(asn: int, prefixes: list[str] | list[tuple[str, int]]) -> bytes:
    """An UPDATE announcing `prefixes` (addresses as /32s, or (address, length)) from `asn`,
    next hop NEXT_HOP."""
    attrs = (
        bytes([0x40, 1, 1, 0])  # ORIGIN IGP
        + bytes([0x40, 2, 6, 2, 1])
        + struct.pack("!I", asn)  # AS_PATH (4-octet ASes)
        + bytes([0x40, 3, 4])
        + socket.inet_aton(NEXT_HOP)
    )
    nlri = b""
    for p in prefixes:
        addr, length = (p, 32) if isinstance(p, str) else p
        nlri += bytes([length]) + socket.inet_aton(addr)[: (length + 7) // 8]
    return message(UPDATE, struct.pack("!H", 0) + struct.pack("!H", len(attrs)) + attrs + nlri)


def maximal_update(asn: int, first: int) -> bytes:
    """An UPDATE of exactly 4,096 octets, RFC 4271's largest: /32s from 10.0.0.0 + `first`,
    and one shorter prefix to fill the last octets."""
    room = 4096 - len(update_message(asn, []))
    n, rest = divmod(room, 5)
    prefixes: list[tuple[str, int]] = [
        (socket.inet_ntoa(struct.pack("!I", (10 << 24) + first + i)), 32) for i in range(n)
    ]
    if rest:
        prefixes.append(("172.16.0.0", 8 * (rest - 1)))  # (rest - 1) octets of prefix
    msg = update_message(asn, prefixes)
    assert len(msg) == 4096
    return msg


def route_refresh() -> bytes:
    return message(ROUTE_REFRESH, struct.pack("!HBB", 1, 0, 1))


END_OF_RIB = message(UPDATE, b"\x00\x00\x00\x00")


@dataclass
class Target:
    """The agent's listener and two passive sessions configured on it."""

    agent: tuple[str, int]
    attacker: str  # the peer address of one session (the attacker plays this peer)
    bystander: str  # the peer address of another (a well-behaved peer)
    apsv_as: int
    peer_as: int
    hold_time: int = 9
    stray_net: int = 0x7F010000  # 127.1.0.0/16: source addresses no session expects


class Peer:
    """One TCP connection to the agent, read as BGP messages."""

    def __init__(self, target: Target, source: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(target.agent, source_address=(source, 0), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = MessageReader(C.MAX_EXTENDED_MESSAGE_LEN)
        self.closed = False

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def messages(self, until: float) -> Iterator[tuple[int, bytes]]:
        """Messages as they arrive, until the deadline or the connection closes."""
        while True:
            while (m := self._next()) is not None:
                yield m
            left = until - time.monotonic()
            if left <= 0 or self.closed:
                return
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.reader.feed(chunk)

    def _next(self) -> tuple[int, bytes] | None:
        try:
            return self.reader.next_message()
        except BgpError:  # (the agent sent a bad header: nothing more can be read)
            self.closed = True
            return None

    def drain(self) -> list[tuple[int, bytes]]:
        """The messages already here, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    break
                self.reader.feed(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed = True
        finally:
            self.sock.setblocking(True)
        return list(self.messages(0.0))

    def answer(self, within: float) -> tuple[str, Any]:
        """The first NOTIFICATION, or the socket closing, or nothing within `within` seconds
        (KEEPALIVEs and the agent's OPEN are not answers)."""
        for t, body in self.messages(time.monotonic() + within):
            if t == NOTIFICATION:
                return "notification", [body[0], body[1]] if len(body) >= 2 else None
        return ("closed", None) if self.closed else ("open", None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_until_open(target: Target, source: str, timeout: float = 20.0) -> Peer:
    """A connection the agent answers with its OPEN (after a reset, the session is Idle for a
    moment and the agent drops connections meanwhile: try again)."""
    deadline = time.monotonic() + timeout
    while True:
        p = Peer(target, source)
        for t, _ in p.messages(time.monotonic() + 2.0):
            if t == OPEN:
                return p
        p.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the agent did not send its OPEN to {source} within {timeout:.0f} s")
        time.sleep(0.1)


def establish(target: Target, source: str, hold: int | None = None) -> Peer:
    p = connect_until_open(target, source)
    p.send(open_message(target.peer_as, hold or target.hold_time, "10.0.0.99") + message(KEEPALIVE))
    for t, body in p.messages(time.monotonic() + 10):
        if t == KEEPALIVE:
            return p
        if t == NOTIFICATION:
            raise RuntimeError(f"{source}: NOTIFICATION {body[:2].hex()} while establishing")
    raise TimeoutError(f"{source}: no KEEPALIVE after the OPEN exchange")

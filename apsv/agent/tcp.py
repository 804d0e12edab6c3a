"""BGP's TCP sockets: in the session's network namespace, with its security settings.

- TCP MD5 signatures (RFC 2385) through Linux's `TCP_MD5SIG`, a key per peer address, set on
  the listening socket (before the peer's SYN) and on a connecting socket (before its SYN).
  A segment without the right signature never reaches the session: a wrong key never
  establishes.
- GTSM (RFC 5082): every segment leaves with TTL (hop limit) 255, and the kernel drops those
  that arrive with less than 256 - `hops` (`IP_MINTTL` / `IPV6_MINHOPCOUNT`).

The functions create blocking-free sockets for asyncio; `netns.in_netns` creates them in
another namespace without moving the agent there.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable

from apsv.agent.netns import in_netns

TCP_MD5SIG = getattr(socket, "TCP_MD5SIG", 14)
TCP_MD5SIG_MAXKEYLEN = 80
IP_MINTTL = getattr(socket, "IP_MINTTL", 21)
IPV6_MINHOPCOUNT = getattr(socket, "IPV6_MINHOPCOUNT", 73)


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def md5sig(peer: str, key: bytes) -> bytes:
    """`struct tcp_md5sig` for `peer` (an empty key removes the peer's)."""
    if len(key) > TCP_MD5SIG_MAXKEYLEN:
        raise ValueError(f"a TCP MD5 key is at most {TCP_MD5SIG_MAXKEYLEN} octets, not {len(key)}")
    ip = ipaddress.ip_address(peer)
    if ip.version == 4:
        addr = struct.pack("=H", socket.AF_INET) + b"\x00\x00" + ip.packed
    else:
        addr = struct.pack("=H", socket.AF_INET6) + b"\x00\x00" + b"\x00" * 4 + ip.packed + b"\x00" * 4
    # tcpm_addr (sockaddr_storage, 128), tcpm_flags, tcpm_prefixlen, tcpm_keylen, tcpm_ifindex, tcpm_key[80]
    return addr.ljust(128, b"\x00") + struct.pack("=BBHI", 0, 0, len(key), 0) + key.ljust(TCP_MD5SIG_MAXKEYLEN, b"\x00")


def set_md5(sock: socket.socket, peer: str, key: bytes) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5sig(peer, key))
    except OSError as e:
        raise OSError(e.errno, f"TCP MD5 for {peer}: {e.strerror} (a kernel without CONFIG_TCP_MD5SIG?)") from None


def set_gtsm(sock: socket.socket, hops: int) -> None:
    """Send with TTL 255; accept only what arrives within `hops` hops (RFC 5082)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT, 256 - hops)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, IP_MINTTL, 256 - hops)


def _stream_socket(family: int, setup: Callable[[socket.socket], None]) -> socket.socket:
    """A non-blocking TCP socket after `setup`, closed if setup fails."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        setup(s)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def listening_socket(
    netns: str | None, host: str, port: int, md5: dict[str, bytes], gtsm_hops: int | None
) -> socket.socket:
    """A listening socket on host:port in `netns`, with each peer's MD5 key set before accept."""

    def setup(s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for peer, key in md5.items():
            set_md5(s, peer, key)
        if gtsm_hops is not None:
            set_gtsm(s, gtsm_hops)
        s.bind((host, port))
        s.listen(128)

    return in_netns(netns, lambda: _stream_socket(_family(host), setup))


def connecting_socket(
    netns: str | None, peer: str, local: str | None, md5_key: bytes | None, gtsm_hops: int | None
) -> socket.socket:
    """An unconnected socket for an active session towards `peer` (connect it with asyncio)."""

    def setup(s: socket.socket) -> None:
        if md5_key is not None:
            set_md5(s, peer, md5_key)
        if gtsm_hops is not None:
            set_gtsm(s, gtsm_hops)
        if local:
            s.bind((local, 0))

    return in_netns(netns, lambda: _stream_socket(_family(peer), setup))

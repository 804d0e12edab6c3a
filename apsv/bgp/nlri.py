"""NLRI prefixes in their wire form.

A prefix is kept as the exact bytes it has on the wire: one length octet followed by the
significant address octets (RFC 4271 §4.3), preceded by a 4-octet Path Identifier when
ADD-PATH is in use (RFC 7911 §3). Those bytes are hashable, compact (a /24 is a 4-byte
object), need no conversion on the hot path, and re-encode exactly. Host bits beyond the
prefix length are "irrelevant" (RFC 4271 §4.3); they are cleared on decode so that a
prefix has exactly one key.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from apsv.bgp.constants import ADDRESS_BITS, AFI_IPV4, AFI_IPV6

PATH_ID_LEN: Final = 4


class NlriError(ValueError):
    """A prefix that cannot be parsed: its length is impossible or it overruns its field."""


def split_prefixes(data: bytes, start: int, end: int, max_bits: int, add_path: bool = False) -> list[bytes]:
    """Split the NLRI field data[start:end] into wire-form prefixes (path id included if add_path)."""
    out: list[bytes] = []
    append = out.append
    i = start
    head = PATH_ID_LEN if add_path else 0
    while i < end:
        p = i + head
        if p >= end:
            raise NlriError(f"prefix at offset {i} is truncated (no length octet)")
        plen = data[p]
        if plen > max_bits:
            raise NlriError(f"prefix length {plen} exceeds {max_bits} bits at offset {p}")
        j = p + 1 + ((plen + 7) >> 3)
        if j > end:
            raise NlriError(f"prefix /{plen} at offset {p} overruns the field by {j - end} bytes")
        rem = plen & 7
        if rem and data[j - 1] & (0xFF >> rem):
            append(data[i : j - 1] + bytes((data[j - 1] & (0xFF << (8 - rem)) & 0xFF,)))
        else:
            append(data[i:j])
        i = j
    return out


def prefix_part(key: bytes, add_path: bool) -> bytes:
    """The prefix of a wire key without its path identifier."""
    return key[PATH_ID_LEN:] if add_path else key


def path_id(key: bytes) -> int:
    return int.from_bytes(key[:PATH_ID_LEN], "big")


def encode_prefix(network: str | ipaddress.IPv4Network | ipaddress.IPv6Network, path_id: int | None = None) -> bytes:
    """Wire form of a prefix given as text ('192.0.2.0/24') or an ipaddress network."""
    net = ipaddress.ip_network(network, strict=False) if isinstance(network, str) else network
    plen = net.prefixlen
    octets = net.network_address.packed[: (plen + 7) >> 3]
    body = bytes((plen,)) + octets
    if path_id is not None:
        return path_id.to_bytes(PATH_ID_LEN, "big") + body
    return body


def prefix_network(key: bytes, afi: int, add_path: bool = False) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The ipaddress network a wire key denotes."""
    body = prefix_part(key, add_path)
    plen = body[0]
    width = ADDRESS_BITS[afi] // 8
    packed = bytes(body[1:]).ljust(width, b"\x00")
    if afi == AFI_IPV4:
        return ipaddress.IPv4Network((packed, plen))
    if afi == AFI_IPV6:
        return ipaddress.IPv6Network((packed, plen))
    raise ValueError(f"no address family {afi} prefixes")


def prefix_str(key: bytes, afi: int, add_path: bool = False) -> str:
    """'192.0.2.0/24' (or '192.0.2.0/24#7' with the path identifier under ADD-PATH)."""
    text = str(prefix_network(key, afi, add_path))
    return f"{text}#{path_id(key)}" if add_path else text


# SAFIs whose NLRI start with their own length in bits (unicast, multicast, labeled, VPN, RTC, SR policy).
_BIT_LENGTH_SAFIS: Final = frozenset({1, 2, 4, 73, 128, 129, 132})


def nlri_length(afi: int, safi: int, data: bytes, i: int) -> int | None:
    """Octets taken by the single NLRI at data[i] for any family whose framing APSV knows, else None.

    Used where one NLRI of an otherwise opaque family must be stepped over (MRT RIB_GENERIC).
    """
    if i >= len(data):
        return None
    b0 = data[i]
    if safi in _BIT_LENGTH_SAFIS:
        return 1 + ((b0 + 7) >> 3)
    if safi in (5, 70) and i + 1 < len(data):  # MVPN, EVPN: route type, length
        return 2 + data[i + 1]
    if safi in (133, 134):  # FlowSpec: 1- or 2-octet length (RFC 8955 §4.1)
        if b0 < 0xF0:
            return 1 + b0
        return 2 + (((b0 & 0x0F) << 8) | data[i + 1]) if i + 1 < len(data) else None
    if afi == 16388 and safi in (71, 72) and i + 3 < len(data):  # BGP-LS: type, length
        return 4 + ((data[i + 2] << 8) | data[i + 3])
    return None


def count_nlri(afi: int, safi: int, data: bytes, add_path: bool = False) -> int | None:
    """Number of NLRI in an opaque family's NLRI field, or None if its framing is unknown or broken."""
    i, n, count = 0, len(data), 0
    head = PATH_ID_LEN if add_path else 0
    while i < n:
        size = nlri_length(afi, safi, data, i + head)
        if size is None or i + head + size > n:
            return None
        i += head + size
        count += 1
    return count

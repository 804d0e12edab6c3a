"""Reading BGP (and BFD) out of packet captures: pcap and pcapng, TCP reassembly, message split.

Used to replay real captures through the stacks and to check the decoders against them.
Link layers: null/loopback, Ethernet (with VLAN/QinQ/MPLS), PPP, raw IP, Cisco HDLC,
Linux cooked (v1, v2) and Juniper's MGC encapsulation. Corrupt captures (truncated records,
impossible lengths) end the read with a `DecodeError` naming the offset, never a crash.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apsv.bgp import constants as C
from apsv.errors import DecodeError

MAX_SNAPLEN = 1 << 18


@dataclass(slots=True)
class Packet:
    timestamp: float
    linktype: int
    data: bytes


def read_packets(path: str | Path) -> Iterator[Packet]:
    """Packets of a pcap or pcapng file."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise DecodeError(f"{path}: too short to be a capture")
    magic = data[:4]
    if magic == b"\x0a\x0d\x0d\x0a":
        yield from _pcapng(data)
    elif magic in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
        yield from _pcap(data)
    else:
        raise DecodeError(f"{path}: not a pcap or pcapng file (magic {magic.hex()})", 0)


def _pcap(data: bytes) -> Iterator[Packet]:
    le = data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
    nano = data[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    e = "<" if le else ">"
    if len(data) < 24:
        raise DecodeError("pcap global header truncated", 0)
    linktype = struct.unpack_from(e + "I", data, 20)[0] & 0xFFFF  # high bits: FCS information
    i = 24
    while i + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack_from(e + "IIII", data, i)
        if incl > MAX_SNAPLEN:
            raise DecodeError(f"pcap record claims {incl} octets", i)
        if i + 16 + incl > len(data):
            raise DecodeError("pcap record truncated", i)
        yield Packet(sec + frac / (1e9 if nano else 1e6), linktype, data[i + 16 : i + 16 + incl])
        i += 16 + incl


def _pcapng(data: bytes) -> Iterator[Packet]:
    i = 0
    e = "<"
    ifaces: list[int] = []
    while i + 12 <= len(data):
        btype = struct.unpack_from(e + "I", data, i)[0]
        if btype == 0x0A0D0D0A:
            bom = data[i + 8 : i + 12]
            e = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            ifaces = []
        blen = struct.unpack_from(e + "I", data, i + 4)[0]
        if blen < 12 or i + blen > len(data):
            raise DecodeError(f"pcapng block length {blen} invalid", i)
        body = data[i + 8 : i + blen - 4]
        if btype == 1 and len(body) >= 2:  # Interface Description
            ifaces.append(struct.unpack_from(e + "H", body, 0)[0])
        elif btype == 6 and len(body) >= 20:  # Enhanced Packet
            iface, hi, lo, cap, _orig = struct.unpack_from(e + "IIIII", body, 0)
            if cap > len(body) - 20:
                raise DecodeError("pcapng packet truncated", i)
            lt = ifaces[iface] if iface < len(ifaces) else 1
            yield Packet(((hi << 32) | lo) / 1e6, lt, body[20 : 20 + cap])
        elif btype == 3 and len(body) >= 4:  # Simple Packet
            lt = ifaces[0] if ifaces else 1
            yield Packet(0.0, lt, body[4:])
        i += blen


def _strip_ethernet(d: bytes, i: int) -> tuple[int, int] | None:
    """(ethertype, offset of the network header) after Ethernet framing at d[i]."""
    if len(d) < i + 14:
        return None
    et = (d[i + 12] << 8) | d[i + 13]
    j = i + 14
    while et in (0x8100, 0x88A8, 0x9100) and len(d) >= j + 4:
        et = (d[j + 2] << 8) | d[j + 3]
        j += 4
    return et, j


def _network(p: Packet) -> tuple[int, int] | None:
    """(ethertype-like protocol, offset) of the IP header inside a captured frame."""
    d, lt = p.data, p.linktype
    if lt == 1:
        return _strip_ethernet(d, 0)
    if lt in {0, 108}:  # BSD loopback: 4-octet address family in either byte order
        if len(d) < 4:
            return None
        fam = max(struct.unpack_from("<I", d)[0], struct.unpack_from(">I", d)[0]) & 0xFFFF
        return (0x0800 if fam == 2 else 0x86DD, 4)
    if lt in (101, 12, 14):  # raw IP
        return (0x0800 if d and d[0] >> 4 == 4 else 0x86DD, 0)
    if lt == 9:  # PPP (maybe with HDLC-like address/control), or Cisco HDLC framing
        i = 2 if d[:2] == b"\xff\x03" else 0
        if len(d) >= 4 and d[0] in (0x0F, 0x8F) and d[1] == 0:
            return ((d[2] << 8) | d[3], 4)
        proto = (d[i] << 8) | d[i + 1] if len(d) >= i + 2 else 0
        return ({0x0021: 0x0800, 0x0057: 0x86DD, 0x0281: 0x8847}.get(proto, proto), i + 2)
    if lt == 104:  # Cisco HDLC
        return ((d[2] << 8) | d[3], 4) if len(d) >= 4 else None
    if lt == 113:  # Linux cooked v1
        return ((d[14] << 8) | d[15], 16) if len(d) >= 16 else None
    if lt == 276:  # Linux cooked v2
        return ((d[0] << 8) | d[1], 20) if len(d) >= 20 else None
    if lt == 178 and d[:3] == b"MGC":  # Juniper Ethernet: MGC, flags, optional extensions
        j = 4
        if d[3] & 0x80 and len(d) >= 6:
            j = 6 + ((d[4] << 8) | d[5])
        return _strip_ethernet(d, j)
    return None


@dataclass(slots=True)
class Segment:
    timestamp: float
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    payload: bytes


def _ip_text(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


@dataclass(slots=True)
class Datagram:
    timestamp: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def _transport(p: Packet) -> tuple[int, str, str, int, int] | None:
    """(IP protocol number, source, destination, offset of the transport header, end of the IP
    payload) of a captured frame's unfragmented (or first-fragment) IPv4/IPv6 packet, through
    any MPLS labels and IPv6 extension headers; None for anything else."""
    net = _network(p)
    if net is None:
        return None
    et, i = net
    d = p.data
    while et == 0x8847 and len(d) >= i + 4:  # MPLS label stack
        bottom = d[i + 2] & 1
        i += 4
        if bottom:
            et = 0x0800 if len(d) > i and d[i] >> 4 == 4 else 0x86DD
    if et == 0x0800 and len(d) >= i + 20:
        ihl = (d[i] & 0x0F) * 4
        total = (d[i + 2] << 8) | d[i + 3]
        if ihl < 20 or ((d[i + 6] & 0x1F) or d[i + 7]):  # a later fragment
            return None
        end = min(len(d), i + total) if total >= ihl else len(d)
        return d[i + 9], _ip_text(d[i + 12 : i + 16]), _ip_text(d[i + 16 : i + 20]), i + ihl, end
    if et == 0x86DD and len(d) >= i + 40:
        nh = d[i + 6]
        plen = (d[i + 4] << 8) | d[i + 5]
        t = i + 40
        while nh in (0, 43, 60) and len(d) >= t + 8:  # hop-by-hop, routing, destination options
            nh, t = d[t], t + 8 + d[t + 1] * 8
        return nh, _ip_text(d[i + 8 : i + 24]), _ip_text(d[i + 24 : i + 40]), t, min(len(d), i + 40 + plen)
    return None


def tcp_segments(path: str | Path, port: int = 179) -> Iterator[Segment]:
    """TCP segments to or from `port`, with payload."""
    for p in read_packets(path):
        ip = _transport(p)
        if ip is None or ip[0] != 6:
            continue
        _, src, dst, t, end = ip
        d = p.data
        if len(d) < t + 20:
            continue
        sport, dport, seq = struct.unpack_from("!HHI", d, t)
        if port not in (sport, dport):
            continue
        off = (d[t + 12] >> 4) * 4
        payload = d[t + off : end]
        if payload:
            yield Segment(p.timestamp, src, sport, dst, dport, seq, payload)


def udp_datagrams(path: str | Path, ports: set[int] | frozenset[int]) -> Iterator[Datagram]:
    """UDP datagrams to or from one of `ports` (an S-BFD reflector answers from its well-known
    port to the initiator's): the BFD control packets of a capture, for one."""
    for p in read_packets(path):
        ip = _transport(p)
        if ip is None or ip[0] != 17:
            continue
        _, src, dst, u, end = ip
        d = p.data
        if len(d) < u + 8:
            continue
        sport, dport, length = struct.unpack_from("!HHH", d, u)
        if sport in ports or dport in ports:
            yield Datagram(p.timestamp, src, sport, dst, dport, d[u + 8 : min(end, u + max(length, 8))])


@dataclass
class StreamStats:
    segments: int = 0
    retransmitted: int = 0
    gaps: int = 0
    resyncs: int = 0  # places where the stream did not start with a marker and one was searched for
    truncated: int = 0  # octets of an unfinished message at the end of the capture


@dataclass
class BgpStream:
    """One direction of one TCP connection, as BGP messages."""

    src: str
    sport: int
    dst: str
    dport: int
    messages: list[tuple[int, bytes]] = field(default_factory=list)  # (type, whole message with header)
    stats: StreamStats = field(default_factory=StreamStats)


def _assemble(segs: list[Segment], st: StreamStats) -> list[bytes]:
    """In-order byte runs of one direction (retransmissions dropped); a gap starts a new run."""
    base = segs[0].seq
    ordered = sorted(segs, key=lambda s: (s.seq - base) & 0xFFFFFFFF)
    runs: list[bytearray] = [bytearray()]
    pos = (ordered[0].seq - base) & 0xFFFFFFFF
    for s in ordered:
        rel = (s.seq - base) & 0xFFFFFFFF
        end = rel + len(s.payload)
        if end <= pos:
            # Overlap. A true retransmission repeats what we have; different bytes at the same
            # sequence numbers (crafted captures) are kept as a run of their own.
            start = len(runs[-1]) - (pos - rel)
            if start >= 0 and runs[-1][start : start + len(s.payload)] == s.payload:
                st.retransmitted += 1
            else:
                st.gaps += 1
                runs.append(bytearray(s.payload))
            continue
        if rel > pos:
            st.gaps += 1
            runs.append(bytearray())
            pos = rel
        runs[-1] += s.payload[pos - rel :]
        pos = end
    return [bytes(r) for r in runs if r]


def _split(run: bytes, st: StreamStats) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i + C.HEADER_LEN <= len(run):
        if run[i : i + 16] != C.MARKER:
            j = run.find(C.MARKER, i + 1)
            if j < 0:
                break
            st.resyncs += 1
            i = j
            continue
        length = (run[i + 16] << 8) | run[i + 17]
        if length < C.HEADER_LEN:
            st.resyncs += 1
            i += 1
            continue
        if i + length > len(run):
            st.truncated += len(run) - i
            break
        out.append((run[i + 18], run[i : i + length]))
        i += length
    return out


def bgp_streams(path: str | Path, port: int = 179, *, reassemble: bool = True) -> list[BgpStream]:
    """Every BGP stream (one direction of a TCP connection) in a capture, split into messages.

    With `reassemble=False` each segment is split on its own, as if it opened a new
    connection: the way to feed fuzzed captures, whose sequence numbers mean nothing.
    """
    flows: dict[tuple[str, int, str, int], list[Segment]] = {}
    for seg in tcp_segments(path, port):
        flows.setdefault((seg.src, seg.sport, seg.dst, seg.dport), []).append(seg)
    streams = []
    for (src, sport, dst, dport), segs in flows.items():
        s = BgpStream(src, sport, dst, dport)
        s.stats.segments = len(segs)
        runs = _assemble(segs, s.stats) if reassemble else [seg.payload for seg in segs]
        for run in runs:
            s.messages.extend(_split(run, s.stats))
        streams.append(s)
    return streams


@dataclass(slots=True)
class DecodedMessage:
    stream: BgpStream
    msg_type: int
    raw: bytes
    message: object | None  # the decoded message, or None when `error` is set
    error: Exception | None


def decode_capture(path: str | Path, *, reassemble: bool = True) -> list[DecodedMessage]:
    """Decode every BGP message of a capture; a malformed one carries its typed error instead."""
    from apsv.bgp.errors import BgpError
    from apsv.bgp.inference import ContextInference

    inference = ContextInference()
    out = []
    for st in bgp_streams(path, reassemble=reassemble):
        session = frozenset({(st.src, st.sport), (st.dst, st.dport)})
        for mtype, raw in st.messages:
            try:
                m: object | None = inference.decode(session, (st.src, st.sport), mtype, raw[C.HEADER_LEN :])
                err: Exception | None = None
            except BgpError as e:
                m, err = None, e
            out.append(DecodedMessage(st, mtype, raw, m, err))
    return out

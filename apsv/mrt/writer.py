"""MRT (RFC 6396) writer: a Loc-RIB as a TABLE_DUMP_V2 file that bgpdump and mrtparse read.

A dump is a PEER_INDEX_TABLE record, then one RIB record per prefix (RIB_IPV4_UNICAST,
RIB_IPV6_UNICAST, their multicast subtypes, or the RFC 8050 ADDPATH subtypes for paths learned
with a path identifier), each with one RIB entry per path naming its peer by index.

What each entry carries:

* **Attributes** in 4-octet-AS form, as TABLE_DUMP_V2 requires (RFC 6396 §4.3.4): a set learned
  on a 2-octet session has AS_PATH rebuilt from the true path (AS4_PATH merged, RFC 6793 §4.2.3),
  AGGREGATOR widened (AS4_AGGREGATOR's value when AGGREGATOR holds AS_TRANS), and AS4_PATH and
  AS4_AGGREGATOR dropped. Every other attribute is written with the exact bytes it was received
  with, in its received order.
* **The next hop** of a route learned through MP_REACH_NLRI (IPv6, or IPv4 without NEXT_HOP) as
  the abbreviated MP_REACH_NLRI of RFC 6396 §4.3.4 (next hop length and address only), placed in
  type-code order. APSV keeps only the global address of an IPv6 next hop, so a link-local
  second address is not in the dump.
* **Originated time**: a Loc-RIB keeps no per-route arrival time, so entries carry the time the
  caller gives (by default, the dump's own timestamp).

`write_loc_ribs` dumps Loc-RIBs (`apsv.bgp.rib.LocRib`): the best path of every prefix, or with
`all_paths` every path of every Adj-RIB-In feeding them - a collector's full RIB view. Peers are
the Loc-RIBs' sources, one index per source object (two sessions with the same peer address stay
two peers). `TableDumpV2Writer` is the record-level writer underneath.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import ipaddress
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from apsv.bgp import constants as C
from apsv.bgp.attribute_values import MP_NEXT_HOP, encode_as_path, encode_attribute
from apsv.bgp.nlri import PATH_ID_LEN
from apsv.bgp.path_attributes import PathAttributes
from apsv.bgp.rib import LocRib, Source
from apsv.mrt.records import MRT_TABLE_DUMP_V2, TDV2_PEER_INDEX_TABLE, TDV2_RIB_SUBTYPES

# (afi, safi, add-path) -> RIB subtype: the inverse of the reader's table.
RIB_SUBTYPE = {spec: subtype for subtype, spec in TDV2_RIB_SUBTYPES.items()}
MAX_RECORD_LEN = 0xFFFFFFFF  # the MRT header's length field


@dataclass(frozen=True, slots=True)
class DumpPeer:
    """One PEER_INDEX_TABLE entry."""

    ip: str
    asn: int
    bgp_id: str = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class DumpEntry:
    """One path of a RIB record: its peer (an index into the peer table) and attributes."""

    peer_index: int
    attributes: PathAttributes
    originated: int
    path_id: int | None = None


@dataclass
class DumpStats:
    peers: int = 0
    prefixes: int = 0
    entries: int = 0
    records: int = 0  # the PEER_INDEX_TABLE included
    octets: int = 0


def _record(ts: int, subtype: int, body: bytes) -> bytes:
    if len(body) > MAX_RECORD_LEN:
        raise ValueError(f"MRT record body of {len(body)} octets exceeds the 32-bit length field")
    return struct.pack("!IHHI", ts, MRT_TABLE_DUMP_V2, subtype, len(body)) + body


def peer_index_table(peers: Sequence[DumpPeer], collector_id: str = "0.0.0.0", view_name: str = "") -> bytes:
    """The body of a PEER_INDEX_TABLE record (RFC 6396 §4.3.1)."""
    if len(peers) > 0xFFFF:
        raise ValueError(f"{len(peers)} peers: a PEER_INDEX_TABLE holds at most 65535")
    name = view_name.encode()
    if len(name) > 0xFFFF:
        raise ValueError("view name longer than 65535 octets")
    out = [socket.inet_aton(collector_id), struct.pack("!H", len(name)), name, struct.pack("!H", len(peers))]
    for p in peers:
        ip = ipaddress.ip_address(p.ip)
        wide = p.asn > 0xFFFF
        # Peer Type: bit 0 = IPv6 address, bit 1 = 4-octet AS (2-octet where it fits, as collectors do).
        ptype = (1 if ip.version == 6 else 0) | (2 if wide else 0)
        out.append(bytes((ptype,)) + socket.inet_aton(p.bgp_id) + ip.packed)
        out.append(p.asn.to_bytes(4 if wide else 2, "big"))
    return b"".join(out)


def _tlvs(wire: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(flags, type code, value, whole TLV) of each attribute of a canonical attribute list."""
    i, n = 0, len(wire)
    while i < n:
        flags, code = wire[i], wire[i + 1]
        if flags & C.FLAG_EXTENDED_LENGTH:
            vs = i + 4
            ve = vs + ((wire[i + 2] << 8) | wire[i + 3])
        else:
            vs = i + 3
            ve = vs + wire[i + 2]
        yield flags, code, wire[vs:ve], wire[i:ve]
        i = ve


def _next_hop_bytes(text: str) -> bytes:
    if text.startswith("0x"):  # a next hop of no known address length, kept as hex
        return bytes.fromhex(text[2:])
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def rib_entry_attributes(pa: PathAttributes) -> bytes:
    """The attribute bytes of a TABLE_DUMP_V2 RIB entry for `pa` (4-octet ASes, abbreviated MP_REACH)."""
    parts: list[tuple[int, bytes]] = []  # (type code, TLV)
    aggregator4: bytes | None = None
    if not pa.asn4:
        for _f, code, value, _tlv in _tlvs(pa.wire):
            if code == C.ATTR_AS4_AGGREGATOR and len(value) == 8:
                aggregator4 = value
    for flags, code, value, tlv in _tlvs(pa.wire):
        if pa.asn4:
            parts.append((code, tlv))
        elif code == C.ATTR_AS_PATH:
            # The true path: AS_TRANS replaced from AS4_PATH where RFC 6793 says to.
            parts.append((code, encode_attribute(flags, code, encode_as_path(pa.as_path, True))))
        elif code == C.ATTR_AGGREGATOR and len(value) == 6:
            asn = int.from_bytes(value[:2], "big")
            wide = aggregator4 if asn == C.AS_TRANS and aggregator4 is not None else asn.to_bytes(4, "big") + value[2:]
            parts.append((code, encode_attribute(flags, code, wide)))
        elif code in (C.ATTR_AS4_PATH, C.ATTR_AS4_AGGREGATOR):
            continue  # folded into AS_PATH / AGGREGATOR above
        else:
            parts.append((code, tlv))
    nh = pa.get(MP_NEXT_HOP)
    if nh is not None:
        raw = _next_hop_bytes(nh)
        mp = encode_attribute(C.FLAG_OPTIONAL, C.ATTR_MP_REACH_NLRI, bytes((len(raw),)) + raw)
        at = next((i for i, (code, _t) in enumerate(parts) if code > C.ATTR_MP_REACH_NLRI), len(parts))
        parts.insert(at, (C.ATTR_MP_REACH_NLRI, mp))
    return b"".join(t for _c, t in parts)


def rib_body(sequence: int, prefix: bytes, entries: Sequence[DumpEntry], add_path: bool) -> bytes:
    """The body of an AFI/SAFI-specific RIB record (RFC 6396 §4.3.2; RFC 8050 §4.1 with path ids)."""
    if len(entries) > 0xFFFF:
        raise ValueError(f"{len(entries)} paths to one prefix: a RIB record holds at most 65535")
    out = [struct.pack("!I", sequence & 0xFFFFFFFF), prefix, struct.pack("!H", len(entries))]
    for e in entries:
        attrs = rib_entry_attributes(e.attributes)
        if len(attrs) > 0xFFFF:
            raise ValueError(f"attributes of {len(attrs)} octets do not fit a RIB entry")
        out.append(struct.pack("!HI", e.peer_index, e.originated & 0xFFFFFFFF))
        if add_path:
            out.append(struct.pack("!I", e.path_id or 0))
        out.append(struct.pack("!H", len(attrs)))
        out.append(attrs)
    return b"".join(out)


class TableDumpV2Writer:
    """Writes a PEER_INDEX_TABLE on creation, then one RIB record per `write_prefix` call (two if
    the prefix has paths both with and without a path identifier)."""

    def __init__(
        self,
        out: BinaryIO,
        peers: Sequence[DumpPeer],
        *,
        collector_id: str = "0.0.0.0",
        view_name: str = "",
        timestamp: int | None = None,
    ) -> None:
        self.out = out
        self.npeers = len(peers)
        self.timestamp = int(time.time()) if timestamp is None else int(timestamp)
        self.sequence = 0
        self.stats = DumpStats(peers=len(peers))
        self._put(TDV2_PEER_INDEX_TABLE, peer_index_table(peers, collector_id, view_name))

    def _put(self, subtype: int, body: bytes) -> None:
        rec = _record(self.timestamp, subtype, body)
        self.out.write(rec)
        self.stats.records += 1
        self.stats.octets += len(rec)

    def write_prefix(self, afi: int, safi: int, prefix: bytes, entries: Sequence[DumpEntry]) -> None:
        """`prefix` in wire form (length octet, significant octets) without a path id."""
        if not entries:
            return
        for e in entries:
            if not 0 <= e.peer_index < self.npeers:
                raise ValueError(f"peer index {e.peer_index} outside the {self.npeers}-entry peer table")
        self.stats.prefixes += 1
        for add_path in (False, True):
            group = [e for e in entries if (e.path_id is not None) == add_path]
            if not group:
                continue
            subtype = RIB_SUBTYPE.get((afi, safi, add_path))
            if subtype is None:
                raise ValueError(f"no TABLE_DUMP_V2 RIB subtype for AFI {afi} SAFI {safi}")
            self._put(subtype, rib_body(self.sequence, prefix, group, add_path))
            self.sequence += 1
            self.stats.entries += len(group)


def prefix_sort_key(prefix: bytes, afi: int) -> tuple[bytes, int]:
    """Address order, then length: how collectors order a dump."""
    width = 4 if afi == C.AFI_IPV4 else 16
    return (prefix[1:].ljust(width, b"\0"), prefix[0])


def loc_rib_entries(
    loc: LocRib, peer_of: dict[int, int], originated: int, all_paths: bool = False
) -> Iterator[tuple[bytes, list[DumpEntry]]]:
    """(prefix, entries) of one Loc-RIB in address order: its best path per prefix, or with
    `all_paths` every Adj-RIB-In path (in peer order). `peer_of` maps id(source) to a peer index."""
    for prefix in sorted(loc.best, key=lambda p: prefix_sort_key(p, loc.afi)):
        best = loc.best_path(prefix)
        if best is None:
            continue
        if not all_paths:
            attrs, rib = best
            pid = None
            b = loc.best[prefix]
            if isinstance(b, tuple):  # ADD-PATH: (Adj-RIB-In, path id + prefix)
                pid = int.from_bytes(b[1][:PATH_ID_LEN], "big")
            yield prefix, [DumpEntry(peer_of[id(rib.source)], attrs, originated, pid)]
            continue
        entries = []
        for rib in loc.sources:
            for attrs, path_id in rib.paths(prefix):
                entries.append(DumpEntry(peer_of[id(rib.source)], attrs, originated, path_id if rib.add_path else None))
        entries.sort(key=lambda e: (e.peer_index, e.path_id or 0))
        yield prefix, entries


def peers_of(ribs: Iterable[LocRib]) -> tuple[list[DumpPeer], dict[int, int], list[Source]]:
    """One peer per source object feeding the Loc-RIBs, in the order first met."""
    peers: list[DumpPeer] = []
    index: dict[int, int] = {}
    sources: list[Source] = []
    for loc in ribs:
        for rib in loc.sources:
            s = rib.source
            if id(s) not in index:
                index[id(s)] = len(peers)
                peers.append(DumpPeer(s.peer_ip, s.peer_as, s.router_id))
                sources.append(s)
    return peers, index, sources


@contextlib.contextmanager
def open_output(path: str | Path) -> Iterator[BinaryIO]:
    """A file to write, compressed by its suffix (.gz, .bz2), written aside and renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f: BinaryIO
    if path.suffix == ".gz":
        f = cast(BinaryIO, gzip.open(tmp, "wb"))  # noqa: SIM115 - closed below
    elif path.suffix == ".bz2":
        f = cast(BinaryIO, bz2.open(tmp, "wb"))  # noqa: SIM115
    else:
        f = open(tmp, "wb")  # noqa: SIM115
    try:
        yield f
        f.close()
        tmp.rename(path)  # nobody reads half a dump
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_loc_ribs(
    out: str | Path | BinaryIO,
    ribs: Iterable[LocRib],
    *,
    all_paths: bool = False,
    collector_id: str = "0.0.0.0",
    view_name: str = "",
    timestamp: int | None = None,
    originated: int | None = None,
) -> DumpStats:
    """Write Loc-RIBs as one TABLE_DUMP_V2 dump: IPv4 before IPv6, each family in address order.

    Loc-RIBs of the same family (several sessions of one virtual router) are merged per prefix:
    one entry per Loc-RIB that has it. `out` is a path (compressed by suffix) or a binary stream.
    """
    ribs = sorted(ribs, key=lambda r: (r.afi, r.safi))
    ts = int(time.time()) if timestamp is None else int(timestamp)
    orig = ts if originated is None else int(originated)
    peers, peer_of, _sources = peers_of(ribs)
    if isinstance(out, (str, Path)):
        with open_output(out) as f:
            return _write(f, ribs, peers, peer_of, all_paths, collector_id, view_name, ts, orig)
    return _write(out, ribs, peers, peer_of, all_paths, collector_id, view_name, ts, orig)


def _write(
    f: BinaryIO,
    ribs: list[LocRib],
    peers: list[DumpPeer],
    peer_of: dict[int, int],
    all_paths: bool,
    collector_id: str,
    view_name: str,
    ts: int,
    orig: int,
) -> DumpStats:
    w = TableDumpV2Writer(f, peers, collector_id=collector_id, view_name=view_name, timestamp=ts)
    families: dict[tuple[int, int], list[LocRib]] = {}
    for loc in ribs:
        families.setdefault((loc.afi, loc.safi), []).append(loc)
    for (afi, safi), locs in families.items():
        if len(locs) == 1:
            for prefix, entries in loc_rib_entries(locs[0], peer_of, orig, all_paths):
                w.write_prefix(afi, safi, prefix, entries)
            continue
        merged: dict[bytes, list[DumpEntry]] = {}
        for loc in locs:
            for prefix, entries in loc_rib_entries(loc, peer_of, orig, all_paths):
                merged.setdefault(prefix, []).extend(entries)
        for prefix in sorted(merged, key=lambda p: prefix_sort_key(p, afi)):
            w.write_prefix(afi, safi, prefix, merged[prefix])
    return w.stats

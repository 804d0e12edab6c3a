"""MRT (RFC 6396) reader: BGP4MP, BGP4MP_ET, TABLE_DUMP, TABLE_DUMP_V2, and the deprecated BGP type.

`MrtReader` takes the records `apsv.mrt.framing` splits a plain, gzip or bzip2 file into and
decodes each body into the types of `apsv.mrt.records`. A record that cannot be decoded becomes
an `MrtError` item in the stream, carrying the offset and the reason; reading goes on with the
next record, so one bad record loses nothing else. When the framing itself is damaged (a length
field that does not fit), `recover=True` scans forward for the next plausible record header
instead of stopping.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

from apsv.bgp import constants as C
from apsv.bgp.nlri import nlri_length
from apsv.errors import DecodeError
from apsv.mrt.framing import FramingStats, iter_raw_records, open_mrt
from apsv.mrt.records import (
    BGP4MP_STATE_CHANGE,
    BGP4MP_STATE_CHANGE_AS4,
    BGP_KEEPALIVE,
    BGP_NOTIFY,
    BGP_OPEN,
    BGP_STATE_CHANGE,
    BGP_UPDATE,
    MRT_BGP,
    MRT_BGP4MP,
    MRT_BGP4MP_ET,
    MRT_BGP4PLUS,
    MRT_BGP4PLUS_01,
    MRT_TABLE_DUMP,
    MRT_TABLE_DUMP_V2,
    TDV2_PEER_INDEX_TABLE,
    TDV2_RIB_GENERIC,
    TDV2_RIB_GENERIC_ADDPATH,
    TDV2_RIB_SUBTYPES,
    BgpMessageRecord,
    MrtError,
    MrtItem,
    MrtRecord,
    OtherRecord,
    Peer,
    PeerIndexTable,
    RibEntry,
    RibRecord,
    StateChangeRecord,
)

_MESSAGE_SUBTYPES: Final = {
    # subtype: (4-octet AS fields, ADD-PATH, locally generated)
    1: (False, False, False),
    4: (True, False, False),
    6: (False, False, True),
    7: (True, False, True),
    8: (False, True, False),
    9: (True, True, False),
    10: (False, True, True),
    11: (True, True, True),
}

# the deprecated BGP type's message subtypes -> BGP message types
_LEGACY_MESSAGE_TYPES: Final = {
    BGP_UPDATE: C.MSG_UPDATE,
    BGP_OPEN: C.MSG_OPEN,
    BGP_NOTIFY: C.MSG_NOTIFICATION,
    BGP_KEEPALIVE: C.MSG_KEEPALIVE,
}


_IP_TEXT: dict[bytes, str] = {}


def _ip(raw: bytes) -> str:
    """Address text, cached: a dump names the same few peers millions of times."""
    text = _IP_TEXT.get(raw)
    if text is None:
        if len(_IP_TEXT) > 100_000:
            _IP_TEXT.clear()
        text = _IP_TEXT[raw] = socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
    return text


class MrtReader:
    """Iterates decoded MRT items from a file; keeps the PEER_INDEX_TABLE for TABLE_DUMP_V2."""

    def __init__(self, source: str | Path | BinaryIO, *, recover: bool = False) -> None:
        self._stream = open_mrt(source) if isinstance(source, (str, Path)) else source
        self.recover = recover
        self.framing = FramingStats()
        self.peer_table: PeerIndexTable | None = None

    def __enter__(self) -> MrtReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    def __iter__(self) -> Iterator[MrtItem]:
        for rec in iter_raw_records(self._stream, recover=self.recover, stats=self.framing):
            if isinstance(rec, MrtError):
                yield rec
                continue
            try:
                yield from self._decode(rec)
            except (DecodeError, struct.error, IndexError, ValueError, OSError) as e:
                yield MrtError(rec.offset, rec.type, rec.subtype, f"{rec.type_name}/{rec.subtype}: {e}")

    def _decode(self, rec: MrtRecord) -> Iterator[MrtItem]:
        t = rec.type
        if t in (MRT_BGP4MP, MRT_BGP4MP_ET):
            yield decode_bgp4mp(rec)
        elif t == MRT_TABLE_DUMP_V2:
            if rec.subtype == TDV2_PEER_INDEX_TABLE:
                self.peer_table = decode_peer_index(rec)
                yield self.peer_table
            else:
                yield decode_rib(rec, self.peer_table)
        elif t == MRT_TABLE_DUMP:
            yield from decode_table_dump(rec)
        elif t in (MRT_BGP, MRT_BGP4PLUS, MRT_BGP4PLUS_01):
            yield decode_legacy_bgp(rec)
        else:
            yield OtherRecord(rec)


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise DecodeError(f"{what}: needs {n} octets, record has {len(body)}")


BGP4MP_ENTRY: Final = 2  # deprecated table-dump form still written by OpenBGPD ("TABLE_DUMP_MP")


def decode_bgp4mp_entry(rec: MrtRecord) -> RibRecord:
    """BGP4MP_ENTRY (subtype 2, from the MRT drafts before RFC 6396): one path with its own next hop."""
    b = rec.body
    _need(b, 8, "BGP4MP_ENTRY header")
    peer_as, _local_as, _ifindex, afi = struct.unpack_from("!HHHH", b, 0)
    alen = 4 if afi == C.AFI_IPV4 else 16 if afi == C.AFI_IPV6 else 0
    if not alen:
        raise DecodeError(f"BGP4MP_ENTRY address family {afi} unknown")
    i = 8
    _need(b, i + 2 * alen + 12, "BGP4MP_ENTRY")
    peer_ip = _ip(b[i : i + alen])
    i += 2 * alen
    _view, _status, changed, pafi, psafi, nhl = struct.unpack_from("!HHIHBB", b, i)
    i += 12
    _need(b, i + nhl + 1, "BGP4MP_ENTRY next hop")
    nh = b[i : i + nhl]
    i += nhl
    plen = b[i]
    if pafi not in C.ADDRESS_BITS or plen > C.ADDRESS_BITS[pafi]:
        raise DecodeError(f"BGP4MP_ENTRY prefix /{plen} invalid for AFI {pafi}")
    pend = i + 1 + ((plen + 7) >> 3)
    _need(b, pend + 2, "BGP4MP_ENTRY prefix")
    prefix = _mask_prefix(b[i + 1 : pend], plen)
    attr_len = struct.unpack_from("!H", b, pend)[0]
    if pend + 2 + attr_len > len(b):
        raise DecodeError(f"BGP4MP_ENTRY attributes ({attr_len} octets) overrun the record")
    entry = RibEntry(-1, changed, b[pend + 2 : pend + 2 + attr_len], None, Peer("0.0.0.0", peer_ip, peer_as), nh)
    return RibRecord(rec.timestamp, pafi, psafi, prefix, [entry], False, 0, rec.offset)


def decode_bgp4mp(rec: MrtRecord) -> BgpMessageRecord | StateChangeRecord | RibRecord | OtherRecord:
    b = rec.body
    st = rec.subtype
    if st == BGP4MP_ENTRY:
        return decode_bgp4mp_entry(rec)
    if st in (BGP4MP_STATE_CHANGE, BGP4MP_STATE_CHANGE_AS4) or st in _MESSAGE_SUBTYPES:
        asn4 = st in (BGP4MP_STATE_CHANGE_AS4, 4, 7, 9, 11)
        w = 4 if asn4 else 2
        _need(b, 2 * w + 4, "BGP4MP header")
        fmt = "!II" if asn4 else "!HH"
        peer_as, local_as = struct.unpack_from(fmt, b, 0)
        i = 2 * w
        short = _zebra_short_form(b, i, st)
        if short is not None:
            return _short_record(rec, b, i, peer_as, local_as, asn4, short)
        _ifindex, afi = struct.unpack_from("!HH", b, i)
        i += 4
        alen = 4 if afi == C.AFI_IPV4 else 16 if afi == C.AFI_IPV6 else 0
        if not alen:
            raise DecodeError(f"BGP4MP address family {afi} unknown")
        _need(b, i + 2 * alen, "BGP4MP addresses")
        peer_ip, local_ip = _ip(b[i : i + alen]), _ip(b[i + alen : i + 2 * alen])
        i += 2 * alen
        if st in (BGP4MP_STATE_CHANGE, BGP4MP_STATE_CHANGE_AS4):
            _need(b, i + 4, "BGP4MP state change")
            old, new = struct.unpack_from("!HH", b, i)
            return StateChangeRecord(rec.timestamp, peer_as, local_as, peer_ip, local_ip, old, new, rec.offset)
        return _message_record(rec, b, i, peer_as, local_as, peer_ip, local_ip, asn4)
    return OtherRecord(rec)


def _message_record(
    rec: MrtRecord, b: bytes, i: int, peer_as: int, local_as: int, peer_ip: str, local_ip: str, asn4: bool
) -> BgpMessageRecord:
    """The BGP message that starts at b[i] (with its header), as a BgpMessageRecord."""
    _as4, add_path, local = _MESSAGE_SUBTYPES[rec.subtype]
    _need(b, i + C.HEADER_LEN, "BGP4MP message header")
    hdr = b[i : i + C.HEADER_LEN]
    length = (hdr[16] << 8) | hdr[17]
    if length < C.HEADER_LEN or i + length > len(b):
        raise DecodeError(f"BGP message length {length} does not fit the {len(b) - i} octets recorded")
    body = b[i + C.HEADER_LEN : i + length]
    return BgpMessageRecord(
        rec.timestamp, peer_as, local_as, peer_ip, local_ip, hdr[18], body, asn4, add_path, local, rec.offset, hdr
    )


def _zebra_short_form(b: bytes, i: int, subtype: int) -> str | None:
    """Old Zebra wrote some BGP4MP records without interface, AFI and addresses.

    Such a state change is exactly the two AS fields plus two states; such a message has the
    BGP marker right after the AS fields. Neither shape can be a well-formed long record.
    """
    if subtype in (BGP4MP_STATE_CHANGE, BGP4MP_STATE_CHANGE_AS4) and len(b) == i + 4:
        return "state"
    if subtype in _MESSAGE_SUBTYPES and b[i : i + 16] == C.MARKER:
        return "message"
    return None


def _short_record(
    rec: MrtRecord, b: bytes, i: int, peer_as: int, local_as: int, asn4: bool, kind: str
) -> BgpMessageRecord | StateChangeRecord:
    if kind == "state":
        old, new = struct.unpack_from("!HH", b, i)
        return StateChangeRecord(rec.timestamp, peer_as, local_as, "", "", old, new, rec.offset)
    return _message_record(rec, b, i, peer_as, local_as, "", "", asn4)


def decode_legacy_bgp(rec: MrtRecord) -> BgpMessageRecord | StateChangeRecord | OtherRecord:
    """Deprecated MRT type BGP (5) and BGP4PLUS (9, 10): RFC 6396 Appendix B.2.

    The message follows the peer/local AS and address fields without its 19-octet header.
    """
    b = rec.body
    alen = 4 if rec.type == MRT_BGP else 16
    st = rec.subtype
    if st == BGP_STATE_CHANGE:
        _need(b, 2 + alen + 4, "BGP state change")
        peer_as = struct.unpack_from("!H", b, 0)[0]
        old, new = struct.unpack_from("!HH", b, 2 + alen)
        return StateChangeRecord(rec.timestamp, peer_as, 0, _ip(b[2 : 2 + alen]), "", old, new, rec.offset)
    mtype = _LEGACY_MESSAGE_TYPES.get(st)
    if mtype is None:
        return OtherRecord(rec)
    hl = 2 * (2 + alen)
    _need(b, hl, "BGP record header")
    peer_as = struct.unpack_from("!H", b, 0)[0]
    local_as = struct.unpack_from("!H", b, 2 + alen)[0]
    return BgpMessageRecord(
        rec.timestamp,
        peer_as,
        local_as,
        _ip(b[2 : 2 + alen]),
        _ip(b[4 + alen : 4 + 2 * alen]),
        mtype,
        b[hl:],
        False,
        False,
        False,
        rec.offset,
    )


def decode_peer_index(rec: MrtRecord) -> PeerIndexTable:
    b = rec.body
    _need(b, 6, "PEER_INDEX_TABLE")
    collector = _ip(b[0:4])
    vlen = struct.unpack_from("!H", b, 4)[0]
    _need(b, 8 + vlen, "PEER_INDEX_TABLE view name")
    view = b[6 : 6 + vlen].decode("utf-8", "replace")
    i = 6 + vlen
    count = struct.unpack_from("!H", b, i)[0]
    i += 2
    peers = []
    for _ in range(count):
        _need(b, i + 5, "peer entry")
        ptype = b[i]
        bgp_id = _ip(b[i + 1 : i + 5])
        i += 5
        alen = 16 if ptype & 1 else 4
        awid = 4 if ptype & 2 else 2
        _need(b, i + alen + awid, "peer entry")
        ip = _ip(b[i : i + alen])
        i += alen
        asn = int.from_bytes(b[i : i + awid], "big")
        i += awid
        peers.append(Peer(bgp_id, ip, asn))
    return PeerIndexTable(collector, view, peers, rec.offset)


def decode_rib(rec: MrtRecord, table: PeerIndexTable | None) -> RibRecord | OtherRecord:
    b = rec.body
    st = rec.subtype
    spec = TDV2_RIB_SUBTYPES.get(st)
    generic = st in (TDV2_RIB_GENERIC, TDV2_RIB_GENERIC_ADDPATH)
    if spec is None and not generic:
        return OtherRecord(rec)
    _need(b, 5, "RIB header")
    seq = struct.unpack_from("!I", b, 0)[0]
    if generic:
        add_path = st == TDV2_RIB_GENERIC_ADDPATH
        _need(b, 8, "RIB_GENERIC header")
        afi, safi = struct.unpack_from("!HB", b, 4)
        i = 7
        size = nlri_length(afi, safi, b, i)
        if size is None or i + size > len(b):
            # An NLRI whose framing APSV does not know: the rest of the record cannot be split.
            return RibRecord(rec.timestamp, afi, safi, b[i:], [], True, seq, rec.offset, True)
        end = i + size
        prefix = b[i:end]
        generic = (afi, safi) not in ((1, 1), (1, 2), (2, 1), (2, 2))
    else:
        afi, safi, add_path = spec  # type: ignore[misc]
        plen = b[4]
        if plen > C.ADDRESS_BITS[afi]:
            raise DecodeError(f"prefix length {plen} exceeds the address size")
        end = 5 + ((plen + 7) >> 3)
        prefix = b[4:end]
    _need(b, end + 2, "RIB entry count")
    count = struct.unpack_from("!H", b, end)[0]
    i = end + 2
    entries = []
    npeers = len(table.peers) if table is not None else 0
    for _ in range(count):
        _need(b, i + (12 if add_path else 8), "RIB entry")
        pidx, orig = struct.unpack_from("!HI", b, i)
        i += 6
        pid = None
        if add_path:
            pid = struct.unpack_from("!I", b, i)[0]
            i += 4
        alen = struct.unpack_from("!H", b, i)[0]
        i += 2
        if i + alen > len(b):
            raise DecodeError(f"RIB entry attributes ({alen} octets) overrun the record")
        if table is not None and pidx >= npeers:
            raise DecodeError(f"peer index {pidx} beyond the {npeers}-entry PEER_INDEX_TABLE")
        entries.append(RibEntry(pidx, orig, b[i : i + alen], pid, table.peers[pidx] if table is not None else None))
        i += alen
    return RibRecord(rec.timestamp, afi, safi, prefix, entries, True, seq, rec.offset, generic)


def _mask_prefix(raw: bytes, plen: int) -> bytes:
    """Wire form of an address/length: significant octets with host bits cleared."""
    n = (plen + 7) >> 3
    body = bytearray(raw[:n])
    if plen & 7 and n:
        body[-1] &= (0xFF << (8 - (plen & 7))) & 0xFF
    return bytes((plen,)) + bytes(body)


def decode_table_dump(rec: MrtRecord) -> Iterator[RibRecord]:
    """TABLE_DUMP (RFC 6396 §4.2): one path per entry; some old writers pack several per record."""
    b = rec.body
    afi = rec.subtype
    if afi not in (C.AFI_IPV4, C.AFI_IPV6):
        raise DecodeError(f"TABLE_DUMP subtype (AFI) {afi} unknown")
    alen = 4 if afi == C.AFI_IPV4 else 16
    fixed = 2 + 2 + alen + 1 + 1 + 4 + alen + 2 + 2
    _need(b, fixed, "TABLE_DUMP entry")
    _view, seq = struct.unpack_from("!HH", b, 0)
    i = 4
    n = len(b)
    while i < n:
        # Entries after the first exist only in the batched 1999-2000 layout, without view/seq.
        _need(b, i + fixed - 4, "TABLE_DUMP entry")
        j = i
        addr = b[j : j + alen]
        plen = b[j + alen]
        if plen > alen * 8:
            raise DecodeError(f"prefix length {plen} exceeds the address size")
        j += alen + 2  # prefix, length, status
        orig = struct.unpack_from("!I", b, j)[0]
        j += 4
        peer_ip = _ip(b[j : j + alen])
        j += alen
        peer_as, attr_len = struct.unpack_from("!HH", b, j)
        j += 4
        if j + attr_len > n:
            raise DecodeError(f"TABLE_DUMP attributes ({attr_len} octets) overrun the record")
        peer = Peer("0.0.0.0", peer_ip, peer_as)
        yield RibRecord(
            rec.timestamp,
            afi,
            C.SAFI_UNICAST,
            _mask_prefix(addr, plen),
            [RibEntry(-1, orig, b[j : j + attr_len], None, peer)],
            False,
            seq,
            rec.offset,
        )
        i = j + attr_len


def read_all(path: str | Path, *, recover: bool = False) -> list[MrtItem]:
    with MrtReader(path, recover=recover) as r:
        return list(r)


def iter_bgp_messages(path: str | Path, *, recover: bool = False) -> Iterator[BgpMessageRecord]:
    with MrtReader(path, recover=recover) as r:
        for item in r:
            if isinstance(item, BgpMessageRecord):
                yield item

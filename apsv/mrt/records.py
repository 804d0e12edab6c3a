"""MRT (RFC 6396) numbers and the decoded record types the reader yields: BGP messages and
state changes, PEER_INDEX_TABLE, RIB records and their entries, errors, records of other types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from apsv.bgp.context import CodecContext

# MRT types (RFC 6396 §4, Appendix B for the deprecated ones)
MRT_BGP: Final = 5  # deprecated
MRT_BGP4PLUS: Final = 9  # deprecated
MRT_BGP4PLUS_01: Final = 10  # deprecated
MRT_TABLE_DUMP: Final = 12
MRT_TABLE_DUMP_V2: Final = 13
MRT_BGP4MP: Final = 16
MRT_BGP4MP_ET: Final = 17
MRT_TYPE_NAMES: Final = {
    0: "NULL",
    1: "START",
    2: "DIE",
    3: "I_AM_DEAD",
    4: "PEER_DOWN",
    5: "BGP",
    6: "RIP",
    7: "IDRP",
    8: "RIPNG",
    9: "BGP4PLUS",
    10: "BGP4PLUS_01",
    11: "OSPFv2",
    12: "TABLE_DUMP",
    13: "TABLE_DUMP_V2",
    16: "BGP4MP",
    17: "BGP4MP_ET",
    32: "ISIS",
    33: "ISIS_ET",
    48: "OSPFv3",
    49: "OSPFv3_ET",
}

# BGP4MP subtypes (RFC 6396 §4.4, RFC 8050)
BGP4MP_STATE_CHANGE: Final = 0
BGP4MP_MESSAGE: Final = 1
BGP4MP_MESSAGE_AS4: Final = 4
BGP4MP_STATE_CHANGE_AS4: Final = 5
BGP4MP_MESSAGE_LOCAL: Final = 6
BGP4MP_MESSAGE_AS4_LOCAL: Final = 7
BGP4MP_MESSAGE_ADDPATH: Final = 8
BGP4MP_MESSAGE_AS4_ADDPATH: Final = 9
BGP4MP_MESSAGE_LOCAL_ADDPATH: Final = 10
BGP4MP_MESSAGE_AS4_LOCAL_ADDPATH: Final = 11

# TABLE_DUMP_V2 subtypes (RFC 6396 §4.3, RFC 8050)
TDV2_PEER_INDEX_TABLE: Final = 1
TDV2_RIB_SUBTYPES: Final = {
    # subtype: (afi, safi, add-path)
    2: (1, 1, False),
    3: (1, 2, False),
    4: (2, 1, False),
    5: (2, 2, False),
    8: (1, 1, True),
    9: (1, 2, True),
    10: (2, 1, True),
    11: (2, 2, True),
}
TDV2_RIB_GENERIC: Final = 6
TDV2_RIB_GENERIC_ADDPATH: Final = 12

# Deprecated BGP type subtypes (RFC 6396 Appendix B.2)
BGP_NULL, BGP_UPDATE, BGP_PREF_UPDATE, BGP_STATE_CHANGE, BGP_SYNC, BGP_OPEN, BGP_NOTIFY, BGP_KEEPALIVE = range(8)

# ---------------------------------------------------------------------------------------------
# Decoded record types


@dataclass(slots=True)
class MrtRecord:
    """One raw MRT record: common header fields and the body (for _ET types without the usec field)."""

    offset: int
    timestamp: float
    type: int
    subtype: int
    body: bytes

    @property
    def type_name(self) -> str:
        return MRT_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(slots=True)
class BgpMessageRecord:
    """A BGP message as recorded between a peer and the collector (BGP4MP or legacy BGP)."""

    timestamp: float
    peer_as: int
    local_as: int
    peer_ip: str
    local_ip: str
    msg_type: int
    body: bytes  # message body after the 19-octet header
    asn4: bool
    add_path: bool
    local: bool  # sent by the collector rather than received
    offset: int = 0
    raw_header: bytes = b""  # the 19 header octets as recorded (empty for legacy records)

    def context(self) -> CodecContext:
        fams = frozenset({(1, 1), (1, 2), (2, 1), (2, 2)}) if self.add_path else frozenset()
        return CodecContext(asn4=self.asn4, ibgp=self.peer_as == self.local_as, add_path=fams, extended_message=True)

    @property
    def peer_key(self) -> tuple[str, int]:
        return (self.peer_ip, self.peer_as)


@dataclass(slots=True)
class StateChangeRecord:
    timestamp: float
    peer_as: int
    local_as: int
    peer_ip: str
    local_ip: str
    old_state: int
    new_state: int
    offset: int = 0


@dataclass(slots=True)
class Peer:
    bgp_id: str
    ip: str
    asn: int


@dataclass(slots=True)
class PeerIndexTable:
    collector_id: str
    view_name: str
    peers: list[Peer]
    offset: int = 0


@dataclass(slots=True)
class RibEntry:
    peer_index: int  # into the PEER_INDEX_TABLE (TABLE_DUMP_V2) or -1 (TABLE_DUMP: see peer)
    originated: int
    attributes: bytes  # raw path attributes (4-octet ASNs for TABLE_DUMP_V2, 2-octet for TABLE_DUMP)
    path_id: int | None = None
    peer: Peer | None = None
    next_hop: bytes | None = None  # BGP4MP_ENTRY keeps the next hop outside the attributes


@dataclass(slots=True)
class RibRecord:
    """All paths to one prefix (TABLE_DUMP_V2), or one path (TABLE_DUMP)."""

    timestamp: float
    afi: int
    safi: int
    prefix: bytes  # wire form: length octet + significant octets
    entries: list[RibEntry]
    asn4: bool  # width of AS numbers inside the attributes
    sequence: int = 0
    offset: int = 0
    generic: bool = False  # RIB_GENERIC: `prefix` is the raw NLRI of a family APSV does not decode


@dataclass(slots=True)
class MrtError:
    """A record (or a stretch of bytes) that could not be decoded."""

    offset: int
    type: int
    subtype: int
    reason: str


@dataclass(slots=True)
class OtherRecord:
    """A well-framed record of a type APSV does not interpret (OSPF, IS-IS, ...)."""

    record: MrtRecord


MrtItem = BgpMessageRecord | StateChangeRecord | PeerIndexTable | RibRecord | MrtError | OtherRecord

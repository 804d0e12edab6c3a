"""What a decoder must know about the session a message arrived on.

The same UPDATE bytes mean different things on a 2-octet-AS session and a 4-octet one, on an
iBGP and an eBGP session, and with or without ADD-PATH; a `CodecContext` carries exactly those
facts and nothing else, so the codec stays a pure function of (bytes, context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apsv.bgp import constants as C

Family = tuple[int, int]


@dataclass(frozen=True, slots=True)
class CodecContext:
    asn4: bool = True  # 4-octet AS numbers in AS_PATH/AGGREGATOR (RFC 6793 negotiated)
    ibgp: bool = False  # peer is in our AS: LOCAL_PREF, ORIGINATOR_ID, CLUSTER_LIST are honoured
    add_path: frozenset[Family] = field(default_factory=frozenset)  # families received with path ids
    extended_message: bool = False  # RFC 8654: messages up to 65535 octets
    # Attributes from an MRT TABLE_DUMP_V2 RIB entry, where MP_REACH_NLRI may be abbreviated
    # to just the next hop (RFC 6396 §4.3.4).
    rib_dump: bool = False

    @property
    def max_message_len(self) -> int:
        return C.MAX_EXTENDED_MESSAGE_LEN if self.extended_message else C.MAX_MESSAGE_LEN

    def with_add_path(self, *families: Family) -> CodecContext:
        return CodecContext(
            self.asn4, self.ibgp, frozenset(families) | self.add_path, self.extended_message, self.rib_dump
        )


DEFAULT_CONTEXT = CodecContext()

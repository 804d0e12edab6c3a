"""The codec context of each BGP session recorded in an MRT file.

A BGP4MP record says whether AS numbers are 4 octets wide and (RFC 8050 subtypes) whether
NLRI carry path identifiers. Writers that predate RFC 8050 (BIRD 1.x, Quagga, OpenBGPD) record
ADD-PATH sessions under the plain subtypes; for those, `ContextInference` uses the peer's
recorded OPEN and the bytes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apsv.bgp.inference import ContextInference
from apsv.bgp.message import Message
from apsv.mrt.records import BgpMessageRecord


@dataclass
class RecordedSessions:
    inference: ContextInference = field(default_factory=ContextInference)

    def decode(self, rec: BgpMessageRecord) -> Message:
        """Decode a recorded message; raises BgpError if it is malformed under every plausible context."""
        session = (rec.peer_ip, rec.local_ip)
        sender = "local" if rec.local else "peer"
        return self.inference.decode(
            session,
            sender,
            rec.msg_type,
            rec.body,
            asn4=rec.asn4,
            add_path=True if rec.add_path else None,
            # Zebra wrote peer AS 0 before the OPEN was seen: then the session kind is unknown.
            ibgp=(rec.peer_as == rec.local_as) if rec.peer_as else None,
        )

    @property
    def inferred_add_path(self) -> int:
        return self.inference.inferred_add_path

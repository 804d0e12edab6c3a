"""Summary counts of an MRT file, in the spirit of bgpdump's summary (`apsv mrt stats`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apsv.bgp import constants as C
from apsv.bgp.attributes import decode_attributes
from apsv.bgp.context import CodecContext
from apsv.bgp.errors import Action, BgpError
from apsv.bgp.message import Update
from apsv.bgp.path_attributes import interner_for
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord, MrtError, OtherRecord, PeerIndexTable, RibRecord, StateChangeRecord
from apsv.mrt.sessions import RecordedSessions


@dataclass
class MrtStats:
    records: int = 0  # MRT records framed
    updates: int = 0  # BGP UPDATE messages decoded
    announced: int = 0  # prefixes announced in them (NLRI + MP_REACH_NLRI)
    withdrawn: int = 0  # prefixes withdrawn (Withdrawn Routes + MP_UNREACH_NLRI)
    errors: int = 0  # records or messages that could not be decoded
    messages: Counter[str] = field(default_factory=Counter)  # BGP messages by type name
    state_changes: int = 0
    rib_prefixes: int = 0
    rib_entries: int = 0
    treat_as_withdraw: int = 0  # UPDATEs whose NLRI RFC 7606 turns into withdrawals
    attribute_discards: int = 0
    opaque_families: int = 0  # MP NLRI of families carried without decoding (EVPN, FlowSpec, ...)
    other_records: int = 0
    resyncs: int = 0
    error_samples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "updates": self.updates,
            "announced": self.announced,
            "withdrawn": self.withdrawn,
            "errors": self.errors,
            "messages": dict(self.messages),
            "state_changes": self.state_changes,
            "rib_prefixes": self.rib_prefixes,
            "rib_entries": self.rib_entries,
            "treat_as_withdraw": self.treat_as_withdraw,
            "attribute_discards": self.attribute_discards,
            "opaque_families": self.opaque_families,
            "other_records": self.other_records,
            "resyncs": self.resyncs,
            "error_samples": self.error_samples[:10],
        }

    def _error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(text)


def mrt_stats(path: str | Path, *, recover: bool = False, decode_rib_attributes: bool = True) -> MrtStats:
    """Decode every record of an MRT file and count what it holds."""
    s = MrtStats()
    sessions = RecordedSessions()
    with MrtReader(path, recover=recover) as reader:
        for item in reader:
            if isinstance(item, BgpMessageRecord):
                s.messages[C.MESSAGE_NAMES.get(item.msg_type, str(item.msg_type))] += 1
                try:
                    msg = sessions.decode(item)
                except BgpError as e:
                    s._error(f"offset {item.offset}: {e}")
                    continue
                if isinstance(msg, Update):
                    s.updates += 1
                    s.announced += msg.announced_count
                    s.withdrawn += msg.withdrawn_count
                    if msg.action is Action.TREAT_AS_WITHDRAW:
                        s.treat_as_withdraw += 1
                    s.attribute_discards += sum(p.action is Action.ATTRIBUTE_DISCARD for p in msg.problems)
                    if (msg.mp_reach is not None and msg.mp_reach.nlri is None) or (
                        msg.mp_unreach is not None and msg.mp_unreach.withdrawn is None
                    ):
                        s.opaque_families += 1
            elif isinstance(item, RibRecord):
                s.rib_prefixes += 1
                s.rib_entries += len(item.entries)
                if decode_rib_attributes:
                    ctx = CodecContext(asn4=item.asn4, rib_dump=True)
                    interner = interner_for(ctx)
                    for entry in item.entries:
                        try:
                            decode_attributes(entry.attributes, 0, len(entry.attributes), ctx, interner)
                        except BgpError as err:
                            s._error(f"offset {item.offset}: RIB entry: {err}")
            elif isinstance(item, StateChangeRecord):
                s.state_changes += 1
            elif isinstance(item, PeerIndexTable):
                pass
            elif isinstance(item, OtherRecord):
                s.other_records += 1
            elif isinstance(item, MrtError):
                s._error(f"offset {item.offset}: {item.reason}")
        s.records = reader.framing.records
        s.resyncs = reader.framing.resyncs
        for text in reader.framing.stream_errors:  # not yielded as records: the file itself is cut short
            s._error(text)
    return s

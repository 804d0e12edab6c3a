"""The BGP stack as APSV loads it (entry point ``apsv.stacks: bgp``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.session import BgpSession
from apsv.frame import ProtocolId


class BgpStack:
    name: ClassVar[str] = "bgp"
    protocol_id: ClassVar[int] = int(ProtocolId.BGP)

    def create_session(self, config: Mapping[str, Any]) -> BgpSession:
        """A session from its configuration (raises pydantic.ValidationError naming the bad field).

        With a ``replay`` entry (``{"asn4": true}``) the session starts Established, as it is
        when UPDATEs recorded in an MRT dump are replayed into it.
        """
        cfg = dict(config)
        replay = cfg.pop("replay", None)
        parsed = BgpSessionConfig.model_validate(cfg)
        if replay is None:
            return BgpSession(parsed)
        if not isinstance(replay, Mapping) or set(replay) - {"asn4"}:
            raise ValueError("bgp: 'replay' must be a mapping with at most the key 'asn4'")
        return BgpSession.established(parsed, asn4=bool(replay.get("asn4", True)))

    def restore_session(self, snapshot: bytes) -> BgpSession:
        return BgpSession.restore(snapshot)

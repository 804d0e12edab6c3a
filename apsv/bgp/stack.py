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
        """A session from its configuration (raises pydantic.ValidationError naming the bad field)."""
        return BgpSession(BgpSessionConfig.model_validate(dict(config)))

    def restore_session(self, snapshot: bytes) -> BgpSession:
        return BgpSession.restore(snapshot)

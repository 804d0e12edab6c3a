"""The echo stack: every byte received is sent straight back.

It exists to measure the offload path itself (agent -> multiplexer -> instance -> back) with a
stack that costs nothing, against a bare Ray echo. It is a complete stack all the same: it
counts what it echoes and its snapshot carries those counters across a move.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from apsv.frame import ProtocolId
from apsv.snapshot import SnapshotReader, SnapshotWriter
from apsv.stacks.interface import CloseTransport, Send, StackEvent, StateChanged

_Send: Final = Send  # (compiled: no lookup per message)


class EchoSession:
    protocol: ClassVar[str] = "echo"

    def __init__(self, max_message: int = 1 << 16, delay_ms: float = 0.0) -> None:
        self.max_message = max_message
        self.delay_ms = delay_ms  # a slow stack on demand: for overload and backpressure tests
        self.connected = False
        self.messages = 0
        self.octets = 0

    def start(self, now: float) -> list[StackEvent]:
        return []

    def stop(self, now: float, reason: str = "") -> list[StackEvent]:
        was = self.connected
        self.connected = False
        return [CloseTransport(reason)] if was else []

    def connection_made(self, now: float) -> list[StackEvent]:
        self.connected = True
        return [StateChanged("down", "up", "transport up")]

    def connection_lost(self, now: float, reason: str = "") -> list[StackEvent]:
        self.connected = False
        return [StateChanged("up", "down", reason)]

    def data_received(self, data: bytes | memoryview, now: float) -> list[StackEvent]:
        if len(data) > self.max_message:
            return [CloseTransport(f"message of {len(data)} octets exceeds {self.max_message}")]
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000.0)
        self.messages += 1
        self.octets += len(data)
        return [_Send(bytes(data))]

    def next_deadline(self) -> float | None:
        return None

    def on_timer(self, now: float) -> list[StackEvent]:
        return []

    def snapshot(self) -> bytes:
        w = SnapshotWriter(self.protocol)
        w.u64(self.max_message)
        w.f64(self.delay_ms)
        w.u8(int(self.connected))
        w.u64(self.messages)
        w.u64(self.octets)
        return w.getvalue()

    @classmethod
    def restore(cls, blob: bytes) -> EchoSession:
        r = SnapshotReader(blob, cls.protocol)
        s = cls(r.u64(), r.f64())
        s.connected = bool(r.u8())
        s.messages = r.u64()
        s.octets = r.u64()
        r.done()
        return s

    def stats(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "messages": self.messages, "octets": self.octets}


class EchoStack:
    name: ClassVar[str] = "echo"
    protocol_id: ClassVar[int] = int(ProtocolId.ECHO)

    def create_session(self, config: Mapping[str, Any]) -> EchoSession:
        unknown = set(config) - {"max_message", "delay_ms"}
        if unknown:
            raise ValueError(f"echo: unknown config field(s) {sorted(unknown)}")
        max_message = int(config.get("max_message", 1 << 16))
        if not 1 <= max_message <= 1 << 20:
            raise ValueError(f"echo: max_message {max_message} is outside 1..1048576")
        delay_ms = float(config.get("delay_ms", 0.0))
        if not 0.0 <= delay_ms <= 1000.0:
            raise ValueError(f"echo: delay_ms {delay_ms} is outside 0..1000")
        return EchoSession(max_message, delay_ms)

    def restore_session(self, snapshot: bytes) -> EchoSession:
        return EchoSession.restore(snapshot)

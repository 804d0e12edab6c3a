"""Where a stack instance's sessions run: in the actor's own process, or in a container.

Both backends expose the same operations; the instance actor does not know which it has.
The process backend is the embedded default. The Docker backend (`apsv.runtime.docker_backend`)
runs the same `SessionHost` inside a locked-down container and forwards each call over a Unix
socket.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

import psutil

from apsv.runtime.host import HostLimits, Key, SeqState, SessionHost


class Backend(Protocol):
    kind: str

    def open(self, key: Key, config: Mapping[str, Any], now: float, emit_events: int) -> None: ...

    def process(self, data: bytes | memoryview, offsets: Any, now: float, allowed: set[Key] | None) -> bytes: ...

    def restore(self, key: Key, blob: bytes, seq: SeqState, emit_events: int) -> None: ...

    def detach(self, key: Key) -> tuple[bytes, SeqState]: ...

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]: ...

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]: ...

    def close(self, key: Key, now: float) -> None: ...

    def tick(self, now: float) -> bytes: ...

    def load(self) -> dict[str, Any]: ...

    def session_info(self, key: Key) -> dict[str, Any]: ...

    def session_table(self, key: Key, family: str) -> list[tuple[str, str | None, str]]: ...

    def usage(self) -> dict[str, float]: ...

    def shutdown(self) -> None: ...


class ProcessBackend:
    """Sessions run in the instance actor's own worker process."""

    kind = "process"

    def __init__(self, protocol: str, limits: HostLimits | None = None) -> None:
        self.host = SessionHost(protocol, limits)
        self._proc = psutil.Process(os.getpid())
        self._t0 = time.monotonic()

    def open(self, key: Key, config: Mapping[str, Any], now: float, emit_events: int) -> None:
        self.host.open(key, config, now, emit_events=emit_events)

    def process(self, data: bytes | memoryview, offsets: Any, now: float, allowed: set[Key] | None) -> bytes:
        return self.host.process(data, offsets, now, allowed)

    def restore(self, key: Key, blob: bytes, seq: SeqState, emit_events: int) -> None:
        self.host.restore(key, blob, seq, emit_events=emit_events)

    def detach(self, key: Key) -> tuple[bytes, SeqState]:
        return self.host.detach(key)

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        return self.host.snapshot(key)

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]:
        return self.host.take_snapshots()

    def close(self, key: Key, now: float) -> None:
        self.host.close(key, now)

    def tick(self, now: float) -> bytes:
        self.host.tick(now)
        return self.host.collect()

    def load(self) -> dict[str, Any]:
        load = self.host.load()
        load["latency_ns"], self.host.counters.latency_ns = self.host.counters.latency_ns, []
        return load

    def session_info(self, key: Key) -> dict[str, Any]:
        return self.host.session_info(key)

    def session_table(self, key: Key, family: str) -> list[tuple[str, str | None, str]]:
        return self.host.session_table(key, family)

    def usage(self) -> dict[str, float]:
        """CPU seconds and resident memory of this worker process (psutil)."""
        with self._proc.oneshot():
            cpu = self._proc.cpu_times()
            mem = self._proc.memory_info()
        return {"cpu_seconds": cpu.user + cpu.system, "rss_bytes": float(mem.rss)}

    def shutdown(self) -> None:
        self.host.sessions.clear()

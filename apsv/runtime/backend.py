"""Where a stack instance's sessions run: in the actor's own process, or in a container.

Both backends expose the same operations; the instance actor does not know which it has.
The process backend is the embedded default. The Docker backend (`apsv.runtime.docker_backend`)
runs the same `SessionHost` inside a locked-down container and forwards each call over a Unix
socket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import psutil

from apsv.runtime.host import HostLimits, Key, Refused, SeqState, SessionHost

# What a session is held as, besides its state: (owner, epoch, emit events).
Holding = tuple[str, int, int]


class Backend(Protocol):
    kind: str

    def open(
        self, key: Key, config: Mapping[str, Any], now: float, emit_events: int, owner: str, epoch: int
    ) -> None: ...

    def process(
        self, data: bytes | memoryview, offsets: Sequence[int], now: float, owner: str, snapshot_keys: Sequence[Key]
    ) -> tuple[bytes, list[Refused]]: ...

    def restore(self, key: Key, blob: bytes, seq: SeqState, emit_events: int, owner: str, epoch: int) -> None: ...

    def expect(self, key: Key, owner: str, epoch: int) -> None: ...

    def restore_pending(
        self,
        key: Key,
        owner: str,
        epoch: int,
        snapshot: tuple[bytes, SeqState] | None,
        config: Mapping[str, Any],
        emit_events: int,
        now: float,
    ) -> None: ...

    def holding(self, key: Key) -> Holding | None: ...

    def detach(self, key: Key, moved_to: str, epoch: int) -> tuple[bytes, SeqState]: ...

    def depart(self, key: Key, moved_to: str, epoch: int) -> None: ...

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]: ...

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]: ...

    def snapshots_waiting(self) -> bool: ...

    def close(self, key: Key, now: float) -> None: ...

    def collect(self) -> dict[str, bytes]: ...

    def load(self) -> dict[str, Any]: ...

    def session_info(self, key: Key, digest: bool = True) -> dict[str, Any]: ...

    def session_table(self, key: Key, family: str, detail: bool = False) -> list[tuple[Any, ...]]: ...

    def sessions_report(self) -> list[tuple[Key, str, int, bool]]: ...

    def session_weights(self) -> dict[Key, int]: ...

    def usage(self) -> dict[str, float]: ...

    def shutdown(self) -> None: ...


class ProcessBackend:
    """Sessions run in the instance actor's own worker process."""

    kind = "process"

    def __init__(self, protocol: str, limits: HostLimits | None = None) -> None:
        self.host = SessionHost(protocol, limits)
        self._proc = psutil.Process(os.getpid())

    def open(self, key: Key, config: Mapping[str, Any], now: float, emit_events: int, owner: str, epoch: int) -> None:
        self.host.open(key, config, now, emit_events=emit_events, owner=owner, epoch=epoch)

    def process(
        self, data: bytes | memoryview, offsets: Sequence[int], now: float, owner: str, snapshot_keys: Sequence[Key]
    ) -> tuple[bytes, list[Refused]]:
        out = self.host.process(data, offsets, now, owner, snapshot_keys)
        return out, self.host.refusals

    def restore(self, key: Key, blob: bytes, seq: SeqState, emit_events: int, owner: str, epoch: int) -> None:
        self.host.restore(key, blob, seq, emit_events=emit_events, owner=owner, epoch=epoch)

    def expect(self, key: Key, owner: str, epoch: int) -> None:
        self.host.expect(key, owner, epoch)

    def restore_pending(
        self,
        key: Key,
        owner: str,
        epoch: int,
        snapshot: tuple[bytes, SeqState] | None,
        config: Mapping[str, Any],
        emit_events: int,
        now: float,
    ) -> None:
        self.host.restore_pending(key, owner, epoch, snapshot, config, emit_events, now)

    def holding(self, key: Key) -> Holding | None:
        e = self.host.sessions.get(key)
        return None if e is None else (e.owner, e.epoch, e.emit_events)

    def detach(self, key: Key, moved_to: str, epoch: int) -> tuple[bytes, SeqState]:
        return self.host.detach(key, moved_to, epoch)

    def depart(self, key: Key, moved_to: str, epoch: int) -> None:
        self.host.depart(key, moved_to, epoch)

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        return self.host.snapshot(key)

    def take_snapshots(self) -> dict[Key, tuple[SeqState, bytes]]:
        return self.host.take_snapshots()

    def snapshots_waiting(self) -> bool:
        return self.host.has_snapshots()

    def close(self, key: Key, now: float) -> None:
        self.host.close(key, now)

    def collect(self) -> dict[str, bytes]:
        return self.host.collect()

    def load(self) -> dict[str, Any]:
        load = self.host.load()
        load["latency_ns"], self.host.counters.latency_ns = self.host.counters.latency_ns, []
        return load

    def session_info(self, key: Key, digest: bool = True) -> dict[str, Any]:
        return self.host.session_info(key, digest)

    def session_table(self, key: Key, family: str, detail: bool = False) -> list[tuple[Any, ...]]:
        return self.host.session_table(key, family, detail)

    def sessions_report(self) -> list[tuple[Key, str, int, bool]]:
        return self.host.sessions_report()

    def session_weights(self) -> dict[Key, int]:
        return {k: e.frames for k, e in list(self.host.sessions.items())}

    def usage(self) -> dict[str, float]:
        """CPU seconds and resident memory of this worker process (psutil)."""
        with self._proc.oneshot():
            cpu = self._proc.cpu_times()
            mem = self._proc.memory_info()
        return {"cpu_seconds": cpu.user + cpu.system, "rss_bytes": float(mem.rss)}

    def shutdown(self) -> None:
        self.host.sessions.clear()

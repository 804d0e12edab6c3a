"""The client side of the offload path: sessions' frames in, their output out.

`OffloadClient` is what an agent (or the replay driver) uses. It numbers each session's frames,
writes them into pool buffers, sends full buffers to the multiplexer (a bounded number in flight)
and hands back the output frames in order, dropping any it has already delivered - after a
recovery the cluster may regenerate output, and its sequence numbers make that visible.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray

from apsv.frame import Frame, FrameKind, iter_batch
from apsv.runtime.buffer_pool import Buffer, BufferPool
from apsv.runtime.host import Key


@dataclass
class ClientStats:
    frames_sent: int = 0
    payload_bytes: int = 0
    batches: int = 0
    payload_copies: int = 0  # whole-payload copies made on the way to the stack decoder
    outputs: int = 0
    repeated_outputs: int = 0  # regenerated after a recovery and dropped here
    inflight_waits: int = 0


class OffloadClient:
    def __init__(
        self,
        multiplexer: Any,
        pool: BufferPool | None = None,
        *,
        max_inflight: int = 8,
        on_output: Callable[[Frame], None] | None = None,
    ) -> None:
        self.im = multiplexer
        self.pool = pool or BufferPool()
        self.max_inflight = max(1, min(max_inflight, self.pool.slots))
        self.on_output = on_output
        self.stats = ClientStats()
        self._seq: dict[Key, int] = {}
        self._delivered: dict[Key, int] = {}
        self._buf: Buffer | None = None
        self._inflight: deque[tuple[Any, Buffer, float]] = deque()
        self.batch_latencies: list[float] = []  # seconds from send to output, per batch
        self.client_id = uuid.uuid4().hex
        self._batch_seq = 0

    # -- sessions ------------------------------------------------------------------------------

    def open_sessions(self, specs: Iterable[tuple[Key, str, dict[str, Any], bool]]) -> dict[Key, str]:
        specs = list(specs)
        placed: dict[Key, str] = ray.get(self.im.open_sessions.remote(specs))
        for key, where in placed.items():
            if not where.startswith("error"):
                self._seq.setdefault(key, 0)
        return placed

    # -- sending -------------------------------------------------------------------------------

    def send(self, key: Key, payload: bytes | memoryview, kind: int = FrameKind.DATA, rx_ns: int = 0) -> None:
        seq = self._seq[key] + 1
        self._seq[key] = seq
        tenant, vrouter, proto, sid = key
        rx = rx_ns or time.time_ns()
        while True:
            if self._buf is None:
                self._buf = self._take_buffer()
            if self._buf.append(kind, proto, tenant, vrouter, sid, seq, rx, payload):
                break
            if self._buf.frames == 0:
                raise ValueError(f"a frame of {len(payload)} octets does not fit a {self.pool.slot_bytes}-octet buffer")
            self.flush()
        self.stats.frames_sent += 1
        self.stats.payload_bytes += len(payload)

    def _take_buffer(self) -> Buffer:
        # With every buffer in flight, the only way to get one back is to wait for the oldest
        # batch: that wait is the backpressure a slow cluster puts on this sender.
        while self.pool.in_use() >= self.pool.slots and self._inflight:
            self.stats.inflight_waits += 1
            self._complete_oldest()
        return self.pool.acquire()

    def flush(self) -> None:
        """Send the current buffer (if it holds anything)."""
        buf, self._buf = self._buf, None
        if buf is None or buf.frames == 0:
            if buf is not None:
                self.pool.release(buf)
            return
        while len(self._inflight) >= self.max_inflight:
            self.stats.inflight_waits += 1
            self._complete_oldest()
        ref = ray.put(buf.filled())  # the one copy: into the object store, read in place from here on
        self.stats.payload_copies += buf.frames
        self.stats.batches += 1
        fut = self.im.submit.remote(self.client_id, self._batch_seq, [ref])
        self._batch_seq += 1
        self._inflight.append((fut, buf, time.perf_counter()))

    def _complete_oldest(self) -> None:
        fut, buf, t0 = self._inflight.popleft()
        try:
            outputs = ray.get(fut)
        finally:
            self.pool.release(buf)
        self.batch_latencies.append(time.perf_counter() - t0)
        if len(self.batch_latencies) > 100_000:
            del self.batch_latencies[:50_000]
        self._deliver(outputs)

    def _deliver(self, outputs: list[bytes]) -> None:
        for out in outputs:
            for f in iter_batch(out):
                key = (f.tenant, f.vrouter, f.protocol, f.session)
                if f.seq <= self._delivered.get(key, 0):
                    self.stats.repeated_outputs += 1
                    continue
                self._delivered[key] = f.seq
                self.stats.outputs += 1
                if self.on_output is not None:
                    self.on_output(f)

    def drain(self) -> None:
        """Send what is buffered and wait for every batch in flight."""
        self.flush()
        while self._inflight:
            self._complete_oldest()
        self._deliver(ray.get(self.im.poll.remote()))

    def last_seq(self, key: Key) -> int:
        return self._seq.get(key, 0)

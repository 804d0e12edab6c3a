"""The client side of the offload path: sessions' frames in, their output out.

`OffloadClient` is what an agent (or the replay driver) uses. It numbers each session's frames,
writes them into pool buffers, sends full buffers to the multiplexer (a bounded number in flight)
and hands back the output frames in order, dropping any it has already delivered - after a
recovery the cluster may regenerate output, and its sequence numbers make that visible.

The transport follows the pool: a shared-memory pool (the default when the multiplexer is on this
node) hands batches over in place; a private pool sends each batch through the object store.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from apsv.frame import HEADER, HEADER_LEN, Frame, FrameKind, decode_frame
from apsv.runtime.buffer_pool import Buffer, BufferPool
from apsv.runtime.host import Key
from apsv.runtime.telemetry import ClientMetrics

MAX_EARLY_OUTPUTS = 100_000  # output frames held back waiting for an earlier one
REPORT_EVERY_S = 0.25  # how often a client tells the multiplexer its offered load


@dataclass
class ClientStats:
    frames_sent: int = 0
    payload_bytes: int = 0
    batches: int = 0
    payload_copies: int = 0  # whole-payload copies made on the way to the stack decoder
    outputs: int = 0
    repeated_outputs: int = 0  # regenerated after a recovery and dropped here
    reordered_outputs: int = 0  # arrived before an earlier one of their session, held until it came
    output_gaps: int = 0  # output frames given up on (MAX_EARLY_OUTPUTS reached)
    inflight_waits: int = 0


class OffloadClient:
    def __init__(
        self,
        multiplexer: Any,
        pool: BufferPool | None = None,
        *,
        max_inflight: int = 8,
        on_output: Callable[[Frame], None] | None = None,
        max_batch_delay_s: float | None = None,
        eager_inflight: int = 1,
        metrics_label: str | None = None,
    ) -> None:
        self.im = multiplexer
        if pool is None:
            same_node = ray.get(multiplexer.node.remote()) == ray.get_runtime_context().get_node_id()
            pool = BufferPool(shared=same_node)
        self.pool = pool
        self.max_inflight = max(1, min(max_inflight, self.pool.slots))
        self.on_output = on_output
        self.stats = ClientStats()
        self._seq: dict[Key, int] = {}
        self._delivered: dict[Key, int] = {}
        self._early: dict[Key, dict[int, bytes | None]] = {}  # out-of-order output, by session
        self._early_count = 0
        self._buf: Buffer | None = None
        self._inflight: deque[tuple[Any, Buffer, float]] = deque()
        self.batch_latencies: list[float] = []  # seconds from send to output, per batch
        self.client_id = uuid.uuid4().hex
        self._batch_seq = 0
        # A batch is sent when its buffer is full, or (with a delay set) when its first frame has
        # waited this long - an agent's trade between batching and latency.
        self.max_batch_delay_s = max_batch_delay_s
        self._batch_started = 0.0
        self._last_poll = 0.0
        self.eager_inflight = eager_inflight
        # Frames offered per protocol id: handed to this client to send, sent yet or not. Reported
        # to the multiplexer as Ray Serve's handles report queued requests, so the VPSM sees the
        # demand even while backpressure holds it here.
        self.offered: dict[int, int] = {}
        self._offered_reported: dict[int, int] = {}
        self._last_report = 0.0
        # Pool use on the metrics endpoint, tagged client=`metrics_label` (an agent's name, say).
        self.metrics = ClientMetrics(metrics_label or self.client_id[:8], self.pool.slots)

    # -- sessions ------------------------------------------------------------------------------

    def open_sessions(self, specs: Iterable[tuple[Key, str, dict[str, Any], int]]) -> dict[Key, str]:
        specs = list(specs)
        placed: dict[Key, str] = ray.get(self.im.open_sessions.remote(specs, self.client_id))
        for key, where in placed.items():
            if not where.startswith("error"):
                self._seq.setdefault(key, 0)
        return placed

    def adopt(self, placed: dict[Key, str]) -> None:
        """Sessions opened for this client by an awaited `open_sessions` call (async callers)."""
        for key, where in placed.items():
            if not where.startswith("error"):
                self._seq.setdefault(key, 0)

    # -- non-blocking use (an asyncio agent) -------------------------------------------------------

    def can_send(self, payload_len: int) -> bool:
        """Whether `send` of a payload this long returns without waiting for the cluster."""
        buf = self._buf
        if buf is not None and buf.room() >= HEADER_LEN + payload_len:
            return True
        if buf is not None and buf.frames and len(self._inflight) >= self.max_inflight:
            return False  # the full buffer would have to be sent first
        return self.pool.in_use() < self.pool.slots or (buf is not None and not buf.frames)

    @property
    def pending_frames(self) -> int:
        return 0 if self._buf is None else self._buf.frames

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def oldest_ref(self) -> Any:
        return self._inflight[0][0] if self._inflight else None

    def complete_oldest(self) -> None:
        """Take in the oldest batch's output (call when `oldest_ref()` is ready)."""
        self._complete_oldest()

    # -- sending -------------------------------------------------------------------------------

    def offer(self, key: Key, n: int = 1) -> None:
        """Count frames of a session that arrived and wait on the sender's side (a caller that
        holds them back while `can_send` is False); `send` them later with `offered=True`."""
        self.offered[key[2]] = self.offered.get(key[2], 0) + n

    def send(
        self,
        key: Key,
        payload: bytes | memoryview,
        kind: int = FrameKind.DATA,
        rx_ns: int = 0,
        offered: bool = False,
    ) -> None:
        if not offered:
            self.offered[key[2]] = self.offered.get(key[2], 0) + 1
        seq = self._seq[key] + 1
        self._seq[key] = seq
        tenant, vrouter, proto, sid = key
        rx = rx_ns or time.time_ns()
        while True:
            if self._buf is None:
                self._buf = self._take_buffer()
            if self._buf.append(kind, proto, tenant, vrouter, sid, seq, rx, payload):
                if self._buf.frames == 1:
                    self._batch_started = time.perf_counter()
                break
            if self._buf.frames == 0:
                raise ValueError(f"a frame of {len(payload)} octets does not fit a {self.pool.slot_bytes}-octet buffer")
            self.flush()
        self.stats.frames_sent += 1
        self.stats.payload_bytes += len(payload)
        if self.max_batch_delay_s is not None:
            self.service()

    def service(self) -> None:
        """Take in finished batches and send the buffer if it should go now, without blocking.

        With a batch delay set, a buffer goes as soon as fewer than `eager_inflight` batches are
        in flight (Nagle's rule: while the cluster works on a batch the next one fills, so light
        load gets small fast batches and heavy load big ones, and the batch rate clocks itself
        to the round trip), or when its first frame has waited `max_batch_delay_s`.
        """
        now = time.perf_counter()
        self._report(now)
        if now - self._last_poll >= 0.0001:  # ray.wait costs tens of microseconds: not every frame
            self._last_poll = now
            while self._inflight:
                ready, _ = ray.wait([self._inflight[0][0]], timeout=0)
                if not ready:
                    break
                self._complete_oldest()
        buf = self._buf
        if (
            self.max_batch_delay_s is not None
            and buf is not None
            and buf.frames
            and (
                len(self._inflight) < self.eager_inflight
                or (now - self._batch_started >= self.max_batch_delay_s and len(self._inflight) < self.max_inflight)
            )
        ):
            self.flush()

    def _report(self, now: float, wait: bool = False) -> None:
        """Tell the multiplexer the offered counts (at most every REPORT_EVERY_S, if changed)."""
        if (wait or now - self._last_report >= REPORT_EVERY_S) and self.offered != self._offered_reported:
            self._last_report = now
            self._offered_reported = dict(self.offered)
            ref = self.im.report_offered.remote(self.client_id, self._offered_reported)
            if wait:
                ray.get(ref)

    def _take_buffer(self) -> Buffer:
        # With every buffer in flight, the only way to get one back is to wait for the oldest
        # batch: that wait is the backpressure a slow cluster puts on this sender.
        while self.pool.in_use() >= self.pool.slots and self._inflight:
            self.stats.inflight_waits += 1
            self._complete_oldest()
        return self.pool.acquire()

    def flush(self) -> None:
        """Send the current buffer (if it holds anything)."""
        self._report(time.perf_counter())
        buf, self._buf = self._buf, None
        if buf is None or buf.frames == 0:
            if buf is not None:
                self.pool.release(buf)
            return
        while len(self._inflight) >= self.max_inflight:
            self.stats.inflight_waits += 1
            self._complete_oldest()
        if self.pool.shm_name is not None:
            # In place: the multiplexer and the instances read this buffer where it is.
            start = buf.index * self.pool.slot_bytes
            offsets = np.array(buf.offsets, dtype="<u4").tobytes()
            fut = self.im.submit_shm.remote(
                self.client_id, self._batch_seq, self.pool.shm_name, start, buf.used, offsets
            )
        else:
            # The one copy: into the object store; read in place from there on. The offsets travel
            # with the frames so the multiplexer routes without rescanning them.
            ref = ray.put((buf.filled(), np.array(buf.offsets, dtype=np.int64)))
            self.stats.payload_copies += buf.frames
            fut = self.im.submit.remote(self.client_id, self._batch_seq, ref, [ref])  # resolved there, and by ref
        self.stats.batches += 1
        self._batch_seq += 1
        now = time.perf_counter()
        self._inflight.append((fut, buf, now))
        self.metrics.sample(self.pool.in_use(), now)

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
        """Hand over output frames once each and in each session's order. Output reaches this
        client by two paths - with a batch's answer, or queued after a move or a recovery - so
        a session's later frame can come first: it waits here (bounded) until the gap fills.
        A frame at or below what was delivered is a regenerated repeat, dropped."""
        unpack = HEADER.unpack_from
        delivered = self._delivered
        st = self.stats
        bookkeeping_only = self.on_output is None
        for out in outputs:
            view = memoryview(out)
            off, end = 0, len(view)
            while off < end:
                _m, _v, _k, proto, _f, tenant, vrouter, sid, seq, _rx, _tx, n, _r = unpack(view, off)
                key = (tenant, vrouter, proto, sid)
                if bookkeeping_only and not self._early and seq == delivered.get(key, 0) + 1:
                    # the common case, inline: in order, nothing waiting, nobody to hand it to
                    delivered[key] = seq
                    st.outputs += 1
                else:
                    self._accept(key, seq, None if bookkeeping_only else view[off : off + HEADER_LEN + n])
                off += HEADER_LEN + n

    def _accept(self, key: Key, seq: int, frame: memoryview | None) -> None:
        st = self.stats
        last = self._delivered.get(key, 0)
        if seq <= last:
            st.repeated_outputs += 1
            return
        if seq != last + 1:
            waiting = self._early.setdefault(key, {})
            if seq not in waiting:
                waiting[seq] = None if frame is None else bytes(frame)
                self._early_count += 1
                st.reordered_outputs += 1
                if self._early_count > MAX_EARLY_OUTPUTS:
                    self._skip_gap()
            return
        self._hand(key, seq, frame)
        early = self._early.get(key)
        while early and (seq := seq + 1) in early:
            held = early.pop(seq)
            self._early_count -= 1
            self._hand(key, seq, None if held is None else memoryview(held))
        if early is not None and not early:
            del self._early[key]

    def _hand(self, key: Key, seq: int, frame: memoryview | None) -> None:
        self._delivered[key] = seq
        self.stats.outputs += 1
        if self.on_output is not None and frame is not None:
            self.on_output(decode_frame(frame))

    def _skip_gap(self) -> None:
        """Too much waiting on a gap: give up on the session with the oldest one (counted)."""
        key = min(self._early, key=lambda k: min(self._early[k]))
        first = min(self._early[key])
        self.stats.output_gaps += first - self._delivered.get(key, 0) - 1
        self._delivered[key] = first - 1
        held = self._early[key].pop(first)
        self._early_count -= 1
        self._accept(key, first, None if held is None else memoryview(held))

    def drain(self) -> None:
        """Send what is buffered and wait for every batch in flight."""
        self.flush()
        while self._inflight:
            self._complete_oldest()
        self.poll()

    def poll(self) -> None:
        """Take output produced outside this client's batches (moves' released frames, recoveries,
        timers) now, rather than with the next batch."""
        self._deliver(ray.get(self.im.poll.remote(self.client_id)))
        self.metrics.sample(self.pool.in_use(), time.perf_counter(), force=True)

    def close(self) -> None:
        """Finish what is in flight, tell the multiplexer this client is gone, free the pool."""
        self.drain()
        self._report(time.perf_counter(), wait=True)
        ray.get(self.im.close_client.remote(self.client_id, self.pool.shm_name))
        self.pool.close()

    @property
    def transport(self) -> str:
        return "shm" if self.pool.shm_name is not None else "object_store"

    def last_seq(self, key: Key) -> int:
        return self._seq.get(key, 0)

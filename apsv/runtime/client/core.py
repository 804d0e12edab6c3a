"""`OffloadClient`: its state, its calls to the multiplexer, sending, and waiting for the
cluster. How it takes replies and routes each session are in the modules beside it, as parts
of this one class (the package's docstring has the whole picture)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from apsv.frame import HEADER_LEN, Frame, FrameKind
from apsv.runtime.buffer_pool import Buffer, BufferPool
from apsv.runtime.channel import offsets_bytes
from apsv.runtime.client.base import ClientStats
from apsv.runtime.client.replies import Replies
from apsv.runtime.client.routes import Routes
from apsv.runtime.custody import Custody
from apsv.runtime.delivery import OutputOrder
from apsv.runtime.host import Key
from apsv.runtime.links import Link, RayLink, Sent
from apsv.runtime.metrics import ClientMetrics
from apsv.runtime.outbox import Outbox, Session
from apsv.runtime.routefeed import RouteFeed
from apsv.runtime.tenancy import TokenBucket

log = logging.getLogger("apsv.client")

# The `client` label of a client whose owner names none: a constant, not the random client id,
# so that each new client process does not add series of its own (Ray's WorkerId tells them apart).
DEFAULT_METRICS_LABEL = "client"
MUX_TIMEOUT_S = 30.0  # how long opening (or closing) sessions waits for the multiplexer
DRAIN_TIMEOUT_S = 300.0
_NO_BUFFER = memoryview(b"")


class OffloadClient(Replies, Routes):
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
        transport: str | None = None,
        custody: Custody | None = None,
        registration: dict[str, Any] | None = None,
        record_latency: bool = False,
        tenant: int | None = None,
    ) -> None:
        """`transport`: "shm" or "object_store" to force one (default: shared memory with
        instances on this node, the object store with the others). `registration`: the
        multiplexer's answer to `register_client`, if the caller awaited it (`connect`).
        `tenant`: the one tenant whose sessions it may open (None: any; runtime/tenancy.py); its
        quota's message rate is kept here (`can_send`).
        `record_latency`: keep each output frame's round trip (its input's receive stamp to its
        arrival here) in `order.latencies`, for whoever reads them (`take_latencies`)."""
        self.im = multiplexer
        if transport not in (None, "shm", "object_store"):
            raise ValueError(f"transport must be shm or object_store, not {transport!r}")
        self.node_id = ray.get_runtime_context().get_node_id()
        if pool is None:
            pool = BufferPool(shared=transport != "object_store")
        self.pool = pool
        pool_bytes = pool.slots * pool.slot_bytes
        reg = registration or self._call_mux(
            lambda: multiplexer.register_client.remote(self.node_id, tenant, pool_bytes), MUX_TIMEOUT_S
        )
        self.client_id: str = reg["client"]
        self.credential: bytes = reg["credential"]
        rate = reg.get("max_messages_per_s")
        self.rate = TokenBucket(float(rate)) if rate else None  # the tenant's quota, kept by its client
        self.force = transport if transport is not None else (None if pool.shm_name else "object_store")
        self.max_inflight = max(1, min(max_inflight, self.pool.slots))
        self.stats = ClientStats()
        self.order = OutputOrder(on_output, record_latency)
        self.custody = custody or Custody()
        self.sessions: dict[Key, Session] = {}
        self.links: dict[str, Link] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.feed = RouteFeed(multiplexer, self.client_id, self.credential)
        self.max_batch_delay_s = max_batch_delay_s
        self.eager_inflight = eager_inflight
        self.batch_latencies: list[float] = []  # seconds from send to reply, per batch part
        self._buf: Buffer | None = None  # the buffer being filled (`outbox` writes into it)
        self.outbox = Outbox()
        self._open_parts: dict[int, int] = {}  # pool buffer index -> its parts not yet answered
        self._buffers_out = 0
        self._batch_ids = 0
        self._mark = 0
        self._batch_started = 0.0
        self._last_poll = 0.0
        self._last_reply = time.perf_counter()
        self._resends: dict[Key, Session] = {}
        self._locating: dict[Key, Session] = {}
        self._control: list[tuple[str, Any]] = []  # multiplexer calls whose answers matter
        self._restore_ids = 0
        # Frames offered per protocol id: handed to this client to send, sent yet or not. Reported
        # to the multiplexer as Ray Serve's handles report queued requests, so the VPSM sees the
        # demand even while backpressure holds it here.
        self._waiting_offers: dict[int, int] = {}  # offered (`offer`) and not yet sent, per protocol id
        self._closed_offers: dict[int, int] = {}  # sent by sessions closed since
        self._offered_reported: dict[str, int] = {}
        self._protocols: dict[int, str] = {}  # protocol id -> name, of the sessions opened
        self._report_ref: Any = None
        self._last_report = 0.0
        self._last_metrics = 0.0
        self._latencies_exported = 0
        self.metrics = ClientMetrics(metrics_label or DEFAULT_METRICS_LABEL, self.pool.slots)

    @classmethod
    async def connect(
        cls, multiplexer: Any, *, pool: BufferPool, tenant: int | None = None, **kw: Any
    ) -> OffloadClient:
        """A client made from inside an event loop (an agent): registration awaited, not blocked on."""
        node = ray.get_runtime_context().get_node_id()
        reg = await asyncio.wait_for(
            multiplexer.register_client.remote(node, tenant, pool.slots * pool.slot_bytes), MUX_TIMEOUT_S
        )
        return cls(multiplexer, pool, registration=reg, tenant=tenant, **kw)

    # -- the control plane ---------------------------------------------------------------------

    @staticmethod
    def _call_mux(make: Callable[[], Any], timeout: float) -> Any:
        """A multiplexer call, waited for at most `timeout` - across its restart, if it restarts."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return ray.get(make(), timeout=max(0.001, left))
            except GetTimeoutError:
                raise TimeoutError(f"the multiplexer did not answer within {timeout:.0f} s") from None
            except RayActorError as e:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the multiplexer is not available ({type(e).__name__})") from None
                time.sleep(0.1)

    def open_request(self, specs: Iterable[tuple[Key, str, dict[str, Any], int]]) -> tuple[list[Any], Any]:
        """Start opening sessions (key, protocol, config, emit events); `adopt` the awaited answer."""
        specs = list(specs)
        return specs, self.im.open_sessions.remote(self.client_id, self.credential, specs)

    def open_sessions(
        self, specs: Iterable[tuple[Key, str, dict[str, Any], int]], timeout: float = MUX_TIMEOUT_S
    ) -> dict[Key, str]:
        """Place and open sessions; returns key -> instance id, or key -> 'error: ...'."""
        specs = list(specs)
        answer = self._call_mux(lambda: self.im.open_sessions.remote(self.client_id, self.credential, specs), timeout)
        return self.adopt(specs, answer)

    def adopt(self, specs: list[tuple[Key, str, dict[str, Any], int]], answer: dict[str, Any]) -> dict[Key, str]:
        """Take in the multiplexer's answer to an `open_request`."""
        self.endpoints.update(answer["instances"])
        placed: dict[Key, str] = answer["placed"]
        for key, protocol, config, emit in specs:
            where = placed.get(key, "error: no answer")
            if where.startswith("error"):
                continue
            s = self.sessions.get(key)
            if s is None:
                s = self.sessions[key] = Session(key, protocol, dict(config), int(emit))
                self._protocols[key[2]] = protocol
                self.custody.add(key)
            iid, epoch, state = answer["routes"][key]
            self._route(s, iid, epoch, state)
        return placed

    def close_sessions(self, keys: Iterable[Key], timeout: float = MUX_TIMEOUT_S) -> None:
        keys = [k for k in keys if k in self.sessions]
        self.flush()
        self._call_mux(lambda: self.im.close_sessions.remote(self.client_id, self.credential, keys), timeout)
        for k in keys:
            self._forget(k)

    def _forget(self, key: Key) -> None:
        s = self.sessions.pop(key, None)
        if s is not None:  # its frames stay counted as offered (the sums never go back)
            self._closed_offers[key[2]] = self._closed_offers.get(key[2], 0) + s.seq
        self.custody.remove(key)
        self._resends.pop(key, None)
        self._locating.pop(key, None)

    # -- sending -------------------------------------------------------------------------------

    def offer(self, key: Key, n: int = 1) -> None:
        """Count frames of a session that arrived and wait on the sender's side (a caller that
        holds them back while `can_send` is False); `send` them later with `offered=True`."""
        self._waiting_offers[key[2]] = self._waiting_offers.get(key[2], 0) + n

    @property
    def offered(self) -> dict[int, int]:
        """Frames offered so far per protocol id: sent (numbered, by sessions open or closed), and
        waiting on the sender's side."""
        out = dict(self._waiting_offers)
        for pid, n in self._closed_offers.items():
            out[pid] = out.get(pid, 0) + n
        for k, s in self.sessions.items():
            out[k[2]] = out.get(k[2], 0) + s.seq
        return out

    def can_send(self, payload_len: int, key: Key | None = None) -> bool:
        """Whether `send` of a payload this long returns without waiting for the cluster (and,
        with `key`, whether that session's instance is taking frames), within the tenant's
        message rate."""
        if self.custody.full():
            return False
        if self.rate is not None and not self.rate.allows(time.monotonic()):
            self.stats.rate_waits += 1
            return False
        if key is not None:
            s = self.sessions.get(key)
            if s is not None and s.link is not None and s.link.backlog:
                return False  # its instance is at its window: stop reading this session's socket
        ob = self.outbox
        if self._buf is not None and ob.cap - ob.used >= HEADER_LEN + payload_len:
            return True
        if self._buf is not None and ob.frames and self._buffers_out >= self.max_inflight:
            return False  # the full buffer would have to be sent first
        return self.pool.in_use() < self.pool.slots or (self._buf is not None and not ob.frames)

    def send(
        self,
        key: Key,
        payload: bytes | memoryview,
        kind: int = FrameKind.DATA,
        rx_ns: int = 0,
        offered: bool = False,
    ) -> None:
        """Write one frame of a session into the pool; it goes with the buffer (`flush`, or
        `service` in latency mode). The per-frame work is the frame itself (`Outbox.write`):
        counters are taken per batch."""
        s = self.sessions.get(key)
        if s is None:
            raise KeyError(f"session {key} is not open on this client")
        if self._resends:
            self._resend()
        if offered:
            self._waiting_offers[key[2]] -= 1
        if self.rate is not None:
            self.rate.take(time.monotonic())
        off = self.outbox.write(s, kind, payload, rx_ns)
        if off < 0:
            self._next_buffer(HEADER_LEN + len(payload))
            off = self.outbox.write(s, kind, payload, rx_ns)
        if off == 0:
            self._batch_started = time.perf_counter()

    def _next_buffer(self, size: int) -> Buffer:
        """A buffer with room for a frame of `size` octets (the current one sent if it has frames)."""
        if size > self.pool.slot_bytes:
            raise ValueError(
                f"a frame of {size - HEADER_LEN} octets does not fit a {self.pool.slot_bytes}-octet buffer"
            )
        if self._buf is not None:
            self.flush()
        return self._take_buffer()

    def _take_buffer(self) -> Buffer:
        # With every buffer in flight, the only way to get one back is to wait for replies:
        # that wait is the backpressure a slow cluster puts on this sender.
        while (self.pool.in_use() >= self.pool.slots and self._buffers_out) or self.custody.full():
            if self.custody.full():
                self.stats.custody_waits += 1
                self._request_snapshots(self._ask_snapshots(force=True))
            else:
                self.stats.inflight_waits += 1
            self.pump(1.0)  # (not wait(): no resend may start a buffer while this takes one)
        buf = self._buf = self.pool.acquire()
        self.outbox.start(buf, buf.mv, buf.cap)
        return buf

    def flush(self) -> None:
        """Send the current buffer (if it holds anything): one batch to each instance with frames in it."""
        self._report(time.perf_counter())
        buf, self._buf = self._buf, None
        if buf is None:
            return
        ob = self.outbox
        buf.used, buf.frames = ob.used, ob.frames
        touched, offsets_by_link = ob.touched, ob.parts
        ob.start(None, _NO_BUFFER, 0)
        if buf.frames == 0:
            self.pool.release(buf)
            return
        # The custody copy: what a resend or a restore elsewhere would take (off the decoder's path).
        self.custody.retain(bytes(buf.array[: buf.used]), [(s.key, s.first, s.seq, s.octets) for s in touched])
        st = self.stats
        st.custody_copy_bytes += buf.used
        st.frames_sent += buf.frames
        st.payload_bytes += buf.used - HEADER_LEN * buf.frames
        per_link: dict[Link, int] = {}  # (octets to each link: what its window counts)
        firsts: dict[Link, list[tuple[Key, int]]] = {}  # (where each session's frames begin)
        for s in touched:
            part_link = s.link if s.part is not None else None
            s.buf = s.part_of = s.part = None
            if part_link is not None:
                per_link[part_link] = per_link.get(part_link, 0) + s.octets
                firsts.setdefault(part_link, []).append((s.key, s.first))
        wanted = self._ask_snapshots()
        for k in wanted:
            ws = self.sessions.get(k)
            if ws is not None and ws.link is not None and not ws.hold:
                offsets_by_link.setdefault(ws.link, [])
        parts = {link: (offs, per_link.get(link, 0)) for link, offs in offsets_by_link.items()}
        now = time.perf_counter()
        start = buf.index * self.pool.slot_bytes
        data_ref = None
        n = 0
        for link, (offsets, octets) in parts.items():
            if link.down:
                continue
            keys = [k for k in wanted if (ws := self.sessions.get(k)) is not None and ws.link is link]
            base = start
            if isinstance(link, RayLink):
                base = 0
                if data_ref is None:
                    # The one copy: into the object store; read in place there.
                    data_ref = ray.put(buf.filled())
                    self.stats.payload_copies += buf.frames
            self._batch_ids += 1
            sent = Sent(self._batch_ids, buf, octets, len(offsets), now, self._mark, firsts.get(link, []))
            waits = link.window_waits
            link.send(sent, base, buf.used, offsets_bytes(offsets), keys, data_ref)
            self.stats.window_waits += link.window_waits - waits
            n += 1
        self._mark += 1
        self.stats.batches += 1
        if n:
            if not self._buffers_out:
                self._last_reply = now  # (idle time is no gap)
            self._open_parts[buf.index] = n
            self._buffers_out += 1
        else:
            self.pool.release(buf)
        self.metrics.sample(self.pool.in_use(), now)
        while self._buffers_out > self.max_inflight:
            self.stats.inflight_waits += 1
            self.pump(1.0)

    def _request_snapshots(self, keys: list[Key]) -> None:
        """Ask instances for snapshots now, in a batch of no frames (custody is full)."""
        by_link: dict[Link, list[Key]] = {}
        for k in keys:
            s = self.sessions.get(k)
            if s is not None and s.link is not None and not s.hold:
                by_link.setdefault(s.link, []).append(k)
        for link, ks in by_link.items():
            self._batch_ids += 1
            link.send(Sent(self._batch_ids, None, 0, 0, time.perf_counter(), self._mark, []), 0, 0, b"", ks, None)

    def _ask_snapshots(self, force: bool = False) -> list[Key]:
        c = self.custody
        if not force and c.stats.bytes <= c.max_bytes and not c.over:
            return []
        return c.wants_snapshot(time.monotonic())

    # -- waiting for the cluster ---------------------------------------------------------------

    def pending_room(self) -> int:
        """Octets left in the buffer frames are being written into (0: none taken)."""
        return self.outbox.cap - self.outbox.used

    @property
    def pending_frames(self) -> int:
        return self.outbox.frames

    @property
    def inflight(self) -> int:
        return self._buffers_out

    def settled(self) -> bool:
        """Nothing sent unanswered, nothing waiting for a route, a restore or a resend."""
        return not (
            self._buffers_out
            or self._resends
            or self._locating
            or any(s.hold or s.restoring for s in self.sessions.values())
        )

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Send what is buffered and wait until every frame sent has been answered."""
        self.flush()
        deadline = time.monotonic() + timeout
        while not self.settled():
            if time.monotonic() > deadline:
                held = sum(1 for s in self.sessions.values() if s.hold)
                raise TimeoutError(
                    f"frames still unanswered after {timeout:.0f} s: {self._buffers_out} batches in flight, "
                    f"{held} sessions without a usable route"
                )
            self.wait(0.05)
            if self.outbox.frames:
                self.flush()
        self.poll()

    def poll(self) -> None:
        """Take output produced outside this client's batches (sessions opening, moving in, being
        restored) now."""
        for link in self.links.values():
            link.poll()
        self.wait(0.0)
        self.metrics.sample(self.pool.in_use(), time.perf_counter(), force=True)

    def close(self) -> None:
        """Finish what is in flight, tell the multiplexer this client is gone, free the pool."""
        try:
            self.drain()
            self._report(time.perf_counter(), wait=True)
            self._call_mux(lambda: self.im.close_client.remote(self.client_id, self.credential), 10.0)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the links, the route feed and the pool, now (what is in flight is dropped)."""
        self.feed.close()
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.pool.close()

    @property
    def transport(self) -> str:
        kinds = {link.transport for link in self.links.values()}
        if len(kinds) == 1:
            return kinds.pop()
        return "mixed" if kinds else ("object_store" if self.force == "object_store" else "shm")

    def take_latencies(self) -> list[int]:
        """Round trips (ns) recorded since the last call (`record_latency`)."""
        lat = self.order.latencies
        if lat is None:
            return []
        self.order.latencies = []
        return lat

    def last_seq(self, key: Key) -> int:
        s = self.sessions.get(key)
        return 0 if s is None else s.seq

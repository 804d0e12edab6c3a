"""The client side of the offload path: a router in the caller's process, as in a Ray Serve handle.

`OffloadClient` is what an agent (or the replay driver) uses. The multiplexer - the control
plane - places its sessions and tells it where each one is (a route: instance and epoch, kept
current by a long poll, `routefeed.py`); from then on the client sends every batch straight to
the instances that hold its frames' sessions - one transfer per instance per batch, no central
actor on the way (`links.py`: a descriptor over a Unix socket into shared memory on the same
node, a direct Ray call through the object store across nodes).

It numbers each session's frames, writes them once into a buffer of its pool (read in place by
the instances), keeps a copy of every batch in custody (`custody.py`) until a snapshot from the
instance covers it, and hands back output frames once each, in order (`delivery.py`).

Fencing: a frame carries its route's epoch; an instance refuses frames for a session it does not
hold at that epoch (moved, restored elsewhere, waiting for its restore, or an earlier frame
missing) and says what it knows. The client then re-sends the session's frames from the first
refused one, from custody, by the route it now has - and where the route is not known, or the
session's instance died, it asks the multiplexer (`locate`) and restores the session from its
snapshot. Instances apply a session's frames strictly in sequence, so each is applied exactly
once, in order, across moves, drains, kills and restarts.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from apsv.frame import HEADER, HEADER_LEN, Frame, FrameKind
from apsv.runtime import channel
from apsv.runtime.buffer_pool import Buffer, BufferPool
from apsv.runtime.channel import offsets_bytes
from apsv.runtime.custody import Custody
from apsv.runtime.delivery import OutputOrder
from apsv.runtime.host import GAP, MOVED, PENDING, STALE, Key
from apsv.runtime.links import RAY_WINDOW, Link, LinkDown, RayLink, Sent, ShmLink
from apsv.runtime.metrics import ClientMetrics
from apsv.runtime.outbox import Outbox, Session
from apsv.runtime.routefeed import RouteFeed
from apsv.runtime.tenancy import TokenBucket

log = logging.getLogger("apsv.client")

REPORT_EVERY_S = 0.25  # how often a client tells the multiplexer its offered load
# The `client` label of a client whose owner names none: a constant, not the random client id,
# so that each new client process does not add series of its own (Ray's WorkerId tells them apart).
DEFAULT_METRICS_LABEL = "client"
MUX_TIMEOUT_S = 30.0  # how long opening (or closing) sessions waits for the multiplexer
DRAIN_TIMEOUT_S = 300.0
RELOCATE_AFTER_S = 0.05  # a session with no usable route asks the multiplexer again after this
POLL_EVERY_S = 0.0001  # service() looks for replies at most this often
_NO_BUFFER = memoryview(b"")


@dataclass
class ClientStats:
    outputs: int = 0  # output frames handed over (counted by the client's OutputOrder)
    repeated_outputs: int = 0  # regenerated after a restore and dropped
    reordered_outputs: int = 0  # arrived before an earlier one of their session, held until it came
    output_gaps: int = 0  # output frames given up on (too many waiting for an earlier one)
    frames_sent: int = 0
    payload_bytes: int = 0
    batches: int = 0
    payload_copies: int = 0  # whole-payload copies made on the way to the stack decoder
    inflight_waits: int = 0
    window_waits: int = 0  # batches that waited for an instance's window
    refused: int = 0  # refusals (one per session and batch) from instances
    frames_resent: int = 0  # from custody, after refusals or restores
    restores: int = 0  # sessions restored from custody on a new instance
    relocations: int = 0  # sessions whose route the multiplexer was asked for
    links_lost: int = 0  # instances whose connection broke (died, or closed it)
    custody_waits: int = 0  # sends held back until snapshots freed custody
    rate_waits: int = 0  # sends held back by the tenant's message rate (`can_send` said no)
    longest_reply_gap_s: float = 0.0  # the longest wait for any reply while batches were out
    custody_copy_bytes: int = 0  # batches copied into custody (off the path to the decoder)


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

    def _link_to(self, iid: str) -> Link | None:
        """The link to an instance, connected on first use (None: it cannot be reached now)."""
        link = self.links.get(iid)
        if link is not None and not link.down:
            return link
        ep = self.endpoints.get(iid)
        if ep is None:
            return None
        try:
            if self.force != "object_store" and ep["node_id"] == self.node_id and ep.get("endpoint"):
                link = ShmLink(iid, ep["endpoint"], self.client_id, self.credential, self.pool.shm_name or "")
            else:
                link = RayLink(iid, ep["handle"], self.client_id, self.credential, int(ep.get("window", RAY_WINDOW)))
        except LinkDown as e:
            log.info("cannot reach %s: %s", iid, e)
            return None
        self.links[iid] = link
        return link

    def _route(self, s: Session, iid: str, epoch: int, state: str) -> None:
        """The session is at `iid`, at `epoch`, in `state` (live, pending, moving, unplaced)."""
        if epoch < s.epoch:
            return  # older than what an instance already told us
        if state in ("moving", "unplaced"):
            self._hold(s)
            self._locating[s.key] = s
            return
        link = self._link_to(iid)
        if link is None:
            self._hold(s)
            self._locating[s.key] = s
            return
        s.epoch, s.link = epoch, link
        s.part_of = None  # (its next frames go by the new route)
        self._locating.pop(s.key, None)
        if state == "pending" and s.restored != epoch:
            if not s.restoring:
                self._restore(s)
        elif s.hold and not s.restoring:
            s.hold = False
            if s.resend_from:
                self._resends[s.key] = s

    def _hold(self, s: Session) -> None:
        """Stop sending the session's frames (they stay in custody) until it has a route."""
        if not s.hold:
            s.hold = True
            s.resend_from = min(s.resend_from or s.seq + 1, s.seq + 1)
        s.link = None
        s.part_of = None  # (its next frames are held)

    def _restore(self, s: Session) -> None:
        """Restore the session on its (new) instance from custody, then re-send what followed."""
        assert s.link is not None
        snapshot, after = self.custody.restore_point(s.key)
        self._restore_ids += 1
        s.restoring = self._restore_ids
        s.hold = True
        s.part_of = None  # (its next frames are held)
        s.resend_from = after
        self.stats.restores += 1
        s.link.send_restore(channel.restore(s.restoring, s.key, s.epoch, s.emit, snapshot, s.config))

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

    # -- replies -------------------------------------------------------------------------------

    def service(self) -> None:
        """Take in what arrived and send the buffer if it should go now, without blocking. A
        sender in latency mode calls it after each burst of `send`s (an agent: each turn of its
        loop), and `wait`s for replies when it has nothing to send.

        With a batch delay set, a buffer goes as soon as fewer than `eager_inflight` batches are
        in flight (Nagle's rule: while the cluster works on a batch the next one fills, so light
        load gets small fast batches and heavy load big ones, and the batch rate clocks itself
        to the round trip), or when its first frame has waited `max_batch_delay_s`.
        """
        now = time.perf_counter()
        self._report(now)
        if now - self._last_poll >= POLL_EVERY_S:
            self._last_poll = now
            self.pump(0.0)
        if self._resends:
            self._resend()
        if (
            self.max_batch_delay_s is not None
            and self.outbox.frames
            and (
                self._buffers_out < self.eager_inflight
                or (now - self._batch_started >= self.max_batch_delay_s and self._buffers_out < self.max_inflight)
            )
        ):
            self.flush()

    def wait(self, timeout: float) -> None:
        """Block until something arrives (a reply, a route) or `timeout`; take it in."""
        self.pump(timeout)
        if self._resends:
            self._resend()

    def fds(self) -> list[int]:
        """What to watch for readiness (an event loop's readers): the same-node links and the route feed."""
        return [link.fileno() for link in self.links.values() if isinstance(link, ShmLink) and not link.down] + [
            self.feed.fileno()
        ]

    def needs_polling(self) -> bool:
        """Whether something has no file descriptor to wake on (cross-node calls, multiplexer
        answers, a rate limit's wait)."""
        return (
            bool(self._control)
            or (self.rate is not None and self.rate.wait_s(time.monotonic()) > 0)
            or any(isinstance(link, RayLink) and link.calls for link in self.links.values())
        )

    def pump(self, timeout: float = 0.0) -> None:
        """Read every link with something to read (waiting up to `timeout` for one), then act on it."""
        shm = [link for link in self.links.values() if isinstance(link, ShmLink) and not link.down]
        if self.needs_polling():
            timeout = min(timeout, 0.002)
        watched: list[Any] = [*shm, self.feed]
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # a link closed under us: read them all
            ready = watched
        for r in ready:
            if r is self.feed:
                for update in self.feed.take():
                    self._on_routes(update)
            else:
                self._read(r)
        for link in list(self.links.values()):
            if link.down:  # (a send failed on it: it is gone)
                self._link_lost(link, "sending failed")
            elif isinstance(link, RayLink) and link.calls:
                self._read(link)
        if self._control:
            self._check_control()
        self.feed.arm()
        self._relocate()

    def _read(self, link: Link) -> None:
        try:
            msgs = link.read()
        except LinkDown as e:
            msgs = e.args[1] if len(e.args) > 1 else []
            for m in msgs:
                self._on_message(link, m)
            self._link_lost(link, str(e.args[0]))
            return
        for m in msgs:
            self._on_message(link, m)

    def _on_message(self, link: Link, msg: channel.Message) -> None:
        if isinstance(msg, channel.Reply):
            mark = self._mark
            if msg.batch >= 0:
                now = time.perf_counter()
                if self._buffers_out:
                    self.stats.longest_reply_gap_s = max(self.stats.longest_reply_gap_s, now - self._last_reply)
                self._last_reply = now
                sent = link.answered(msg.batch)
                if sent is not None:
                    mark = sent.mark
                    if sent.buffer is not None:
                        self.batch_latencies.append(now - sent.t0)
                        self._part_done(sent.buffer)
            if msg.output:
                o = self.order
                o.deliver(msg.output, time.time_ns())
                st = self.stats
                st.outputs, st.repeated_outputs = o.outputs, o.repeated_outputs
                st.reordered_outputs, st.output_gaps = o.reordered_outputs, o.output_gaps
            for snap in msg.snapshots:
                self.custody.snapshot(snap.key, snap.seq, snap.blob)
            for r in msg.refusals:
                self._refused(link, r, mark)
        elif isinstance(msg, channel.Restored):
            s = self.sessions.get(msg.key)
            if s is None or s.restoring != msg.request:
                return
            s.restoring = 0
            if msg.error:
                log.info("restoring %s on %s failed: %s", msg.key, link.instance_id, msg.error)
                self._hold(s)
                self._locating[s.key] = s
                s.located = 0.0
            else:
                s.hold = False
                s.part_of = None  # (its next frames go by the new route)
                s.restored = s.epoch
                self._resends[s.key] = s
        elif isinstance(msg, str):
            self._link_lost(link, msg)

    def _part_done(self, buf: Buffer) -> None:
        left = self._open_parts[buf.index] - 1
        if left:
            self._open_parts[buf.index] = left
            return
        del self._open_parts[buf.index]
        self._buffers_out -= 1
        self.pool.release(buf)

    def _refused(self, link: Link, r: channel.Refusal, mark: int) -> None:
        """An instance did not apply some of a session's frames: learn what it says, and send
        them again - from custody, by the right route - from the first it refused."""
        s = self.sessions.get(r.key)
        if s is None:
            return
        self.stats.refused += 1
        newer = r.epoch > s.epoch
        if mark < s.resend_mark and not newer and r.seq >= s.resent_from:
            return  # sent before the last resend, which covered it
        s.resend_from = min(s.resend_from or r.seq, r.seq)
        if newer:
            if r.reason == MOVED:
                target = self._link_to(r.instance)
                if target is None:
                    self._hold(s)
                    self._locating[s.key] = s
                    return
                s.epoch, s.link = r.epoch, target
                s.part_of = None  # (its next frames go by the new route)
            elif r.reason in (STALE, PENDING):
                s.epoch, s.link = r.epoch, link
                s.part_of = None  # (its next frames go by the new route)
                if r.reason == PENDING and not s.restoring:
                    self._restore(s)
                    return
            self._locating.pop(s.key, None)
            if s.hold and not s.restoring:
                s.hold = False
                s.part_of = None  # (its next frames go by the new route)
        elif link is s.link and not s.hold:
            # from the route held now: it has a gap (re-send), or it is waiting for the session's
            # restore, or does not have it at all (ask the multiplexer where it is)
            if r.reason == PENDING and r.epoch == s.epoch:
                if not s.restoring:
                    self._restore(s)
                return
            if r.reason != GAP:
                self._hold(s)
                self._locating[s.key] = s
                return
        # (otherwise: frames sent by a route since replaced - they go again by the new one)
        if not s.hold:
            self._resends[s.key] = s

    def _resend(self) -> None:
        """Send sessions' frames again from custody (in order, at their current epoch), ahead of
        anything newer of theirs."""
        todo, self._resends = self._resends, {}
        self.flush()
        for s in todo.values():
            if s.hold or s.link is None or s.key not in self.sessions:
                continue
            frm, s.resend_from = s.resend_from, 0
            if not frm:
                continue
            s.resent_from, s.resend_mark = frm, self._mark
            for frame in self.custody.frames_from(s.key, frm):
                if not self._append_copy(s, frame):
                    # its link went down under the flush this frame waited for: the session is
                    # held, and goes on from this frame, from custody, once it has a route
                    seq = HEADER.unpack_from(frame)[8]
                    s.resend_from = min(s.resend_from or seq, seq)
                    break
        self.flush()

    def _append_copy(self, s: Session, frame: memoryview) -> bool:
        """Copy a frame from custody into the current buffer, for the session's link; False
        (nothing copied) if the session has no link, or lost it in the flush that made room."""
        if s.link is None:
            return False
        if self._buf is None:
            self._take_buffer()
        if self.outbox.copy(s, frame, s.epoch) < 0:
            self.flush()
            if s.link is None:
                return False
            self._take_buffer()
            self.outbox.copy(s, frame, s.epoch)
        self.stats.frames_resent += 1
        return True

    def _link_lost(self, link: Link, why: str) -> None:
        """An instance is gone (or shut this client out). Its answered batches were applied or
        refused there; the others go again, from custody, by their sessions' routes (those
        still routed there wait for their new home - the multiplexer is told - and are restored
        there if the instance died)."""
        if self.links.get(link.instance_id) is link:
            del self.links[link.instance_id]
        link.close()
        for sent in link.abandon():
            if sent.buffer is not None:
                self._part_done(sent.buffer)
            for key, first in sent.firsts:
                s = self.sessions.get(key)
                if s is not None:
                    s.resend_from = min(s.resend_from or first, first)
                    if s.link is not None and s.link is not link and not s.hold:
                        self._resends[key] = s
        self.stats.links_lost += 1
        log.info("link to %s lost: %s", link.instance_id, why)
        for s in self.sessions.values():
            if s.link is link:
                self._hold(s)
                self._locating[s.key] = s
                s.located = 0.0
        self._control.append(
            ("report", self.im.report_failure.remote(self.client_id, self.credential, link.instance_id))
        )

    # -- routes from the multiplexer -----------------------------------------------------------

    def _on_routes(self, update: dict[str, Any]) -> None:
        self.endpoints.update(update.get("instances", {}))
        routes: dict[Key, tuple[str, int, str]] = update.get("routes", {})
        for key, (iid, epoch, state) in routes.items():
            s = self.sessions.get(key)
            if s is not None:
                self._route(s, iid, epoch, state)
        if update.get("full"):
            # the multiplexer (re)started: a session it did not list may be one it lost (reclaimed
            # if `locate` says so) - or merely one opened after this answer was made
            for k, s in self.sessions.items():
                if k not in routes and s.opened < update.get("issued", 0.0):
                    self._locating[k] = s

    def _relocate(self) -> None:
        """Ask where the sessions without a usable route are (one question at a time)."""
        if not self._locating or any(kind == "locate" for kind, _ in self._control):
            return
        now = time.monotonic()
        keys = [k for k, s in self._locating.items() if now - s.located >= RELOCATE_AFTER_S]
        if not keys:
            return
        for k in keys:
            self._locating[k].located = now
        self.stats.relocations += len(keys)
        self._control.append(("locate", self.im.locate.remote(self.client_id, self.credential, keys)))

    def _reclaim(self, sessions: list[Session]) -> None:
        items = [(s.key, s.protocol, s.epoch) for s in sessions]
        for s in sessions:
            self._hold(s)
        self._control.append(("reclaim", self.im.reclaim.remote(self.client_id, self.credential, items)))

    def _check_control(self) -> None:
        ready, _ = ray.wait([ref for _, ref in self._control], num_returns=len(self._control), timeout=0)
        if not ready:
            return
        done = set(ready)
        keep = []
        for kind, ref in self._control:
            if ref not in done:
                keep.append((kind, ref))
                continue
            try:
                answer = ray.get(ref)
            except Exception as e:  # the multiplexer is down: the sessions ask again later
                log.debug("%s failed: %r", kind, e)
                continue
            if kind in ("locate", "reclaim"):
                self.endpoints.update(answer["instances"])
                unknown = []
                for key, route in answer["routes"].items():
                    s = self.sessions.get(key)
                    if s is None:
                        continue
                    if route is None:
                        unknown.append(s)
                    else:
                        self._route(s, *route)
                if unknown and kind == "locate":
                    self._reclaim(unknown)
        self._control = keep

    # -- load reports --------------------------------------------------------------------------

    def _report(self, now: float, wait: bool = False) -> None:
        """Tell the multiplexer the offered counts (at most every REPORT_EVERY_S, if changed, one
        report in flight at a time: a multiplexer that is down gets no pile of them); export the
        client's metrics (at most once a second)."""
        if wait or now - self._last_metrics >= 1.0:
            self._last_metrics = now
            self.metrics.sample(self.pool.in_use(), now, force=True)  # (kept alive while idle too)
            self.metrics.messages(
                {k: s.seq for k, s in self.sessions.items()}, {k[2]: s.protocol for k, s in self.sessions.items()}
            )
            self.metrics.batch_times(self.batch_latencies[self._latencies_exported :], self.stats.batches)
            if len(self.batch_latencies) > 100_000:
                del self.batch_latencies[:50_000]
            self._latencies_exported = len(self.batch_latencies)
        if not wait and now - self._last_report < REPORT_EVERY_S:
            return
        if self._report_ref is not None and not wait and not ray.wait([self._report_ref], timeout=0)[0]:
            return
        self._last_report = now
        offered: dict[str, int] = {}
        for pid, n in self.offered.items():
            name = self._protocols.get(pid, str(pid))
            offered[name] = offered.get(name, 0) + n
        if offered == self._offered_reported and not wait:
            return
        self._offered_reported = offered
        self._report_ref = self.im.report_offered.remote(self.client_id, self.credential, self._offered_reported)
        if wait:
            try:
                ray.get(self._report_ref, timeout=10)
            except Exception:  # the multiplexer is down: the counts are lost, not the frames
                log.debug("offered-load report failed", exc_info=True)

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

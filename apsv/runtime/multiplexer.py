"""The Intelligent Multiplexer (IM): routes batches of offload frames to stack instances.

* **Routing and affinity.** Every session has a route: the instance holding its state. A batch
  from a client is split by route, and each instance gets one call with the offsets of its
  frames in the client's buffer - the payload is not copied on its way: the instance reads the
  client's shared-memory buffer (same node) or the client's object-store object, in place.
* **Order.** Each client numbers its batches and they are dispatched strictly in that order, one
  dispatch at a time; every call to an instance comes from this actor, so Ray's per-caller
  ordering of a synchronous actor's tasks keeps each session's frames in order end to end,
  across pipelined batches, moves and recoveries.
* **Placement.** New sessions go to the less loaded of two sampled instances (`placement.py`),
  by live load: sessions, bytes in flight against the instance's buffer quota, and busy time.
* **Backpressure.** Payload bytes in flight to an instance are bounded by its quota; a batch that
  would exceed it waits (counted), so a slow instance slows its senders instead of growing memory.
* **Failure.** Instances snapshot their sessions periodically; the multiplexer keeps each
  session's last snapshot (by object reference) and the frames sent since (for a shared-memory
  batch, which its client reuses once the batch is done, that takes one copy of the batch - off
  the path to the stack, and counted). When an instance dies,
  its sessions are restored on others from those snapshots and the retained frames are delivered
  again; the hosts drop what they already applied (sequence numbers), clients drop repeated
  output (output sequence numbers). Nothing is lost or applied twice.
* **Moves.** A session is moved by holding its new frames, detaching it (snapshot) from its
  instance after everything already sent there, restoring it on the target, and releasing the
  held frames to the target.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.frame import HEADER, HEADER_LEN
from apsv.runtime.batchindex import BatchIndex, by_session, index_batch
from apsv.runtime.host import Key, SeqState
from apsv.runtime.placement import InstanceLoad, choose_instance, least_used, rebalance_moves
from apsv.runtime.shm import SHM_TAG, SegmentCache, ShmRef
from apsv.runtime.telemetry import MultiplexerMetrics

log = logging.getLogger("apsv.multiplexer")

METRICS_PERIOD_S = 1.0  # how often counted metrics are handed to Ray (its agent exports every few s)
MAX_CONCURRENT_MOVES = 64
MAX_QUEUED_OUTPUTS = 10_000  # output batches waiting for one client's next submit or poll
MAX_RETAINED_CHUNKS = 4096  # per session, between snapshots (a session is snapshot every 256 frames by default)


@dataclass
class InstanceState:
    instance_id: str
    handle: Any
    protocol: str
    quota_bytes: int
    max_sessions: int
    sessions: set[Key] = field(default_factory=set)
    inflight_bytes: int = 0
    inflight_frames: int = 0  # the instance's queue: sent to it, not yet applied
    busy: float = 0.0
    accepting: bool = True
    alive: bool = True
    frames: int = 0
    quota_waits: int = 0
    node_id: str = ""
    peak_bytes: int = 0  # most octets in flight since the last metrics export
    space: asyncio.Condition = field(default_factory=asyncio.Condition)

    def load(self) -> InstanceLoad:
        return InstanceLoad(
            self.instance_id,
            len(self.sessions),
            self.max_sessions,
            self.inflight_bytes,
            self.quota_bytes,
            self.busy,
            self.accepting and self.alive,
        )


class ShmBatch:
    """A batch in a client's shared-memory pool, and the copy kept for redelivery.

    Instances on this node read the client's buffer itself, but only while the batch's submit
    is running: after that the client reuses the buffer, so moved, held and redelivered frames
    are sent from the copy (put in the object store once, when first needed).
    """

    __slots__ = ("_ref", "copy", "length", "name", "node_id", "start")

    def __init__(self, name: str, start: int, length: int, copy: bytes, node_id: str) -> None:
        self.name, self.start, self.length, self.copy, self.node_id = name, start, length, copy, node_id
        self._ref: Any = None

    def in_place(self) -> ShmRef:
        return (SHM_TAG, self.name, self.start, self.length)

    def ref(self) -> Any:
        if self._ref is None:
            self._ref = ray.put(self.copy)
        return self._ref


# Frames as the multiplexer keeps them: a run of one session's frames from one client batch -
# (the batch: object ref or ShmBatch, their offsets in it, first seq, last seq, octets, session).
Held = tuple[Any, list[int], int, int, int, Key]


@dataclass
class Route:
    key: Key
    protocol: str
    instance_id: str
    config: dict[str, Any]
    emit_events: int  # host.EVENTS_*
    snapshot: tuple[Any, SeqState] | None = None  # (ref of {key: blob}, its sequence state)
    owner: str = ""  # the client that opened it: only its batches may address it
    retained: deque[Held] = field(default_factory=deque)  # sent since the snapshot
    moving: bool = False
    held: list[Held] = field(default_factory=list)  # arrived while moving or recovering
    frames: int = 0
    moves: int = 0
    # highest sequence number among frames dropped from `retained` (it is bounded): until a
    # snapshot covers it, what was sent to the instance is not all here to redeliver
    dropped_upto: int = 0
    # instances this session left ahead of their queue (`detach_now`): batches still queued
    # there may carry its old frames, so a restore there must wait its turn behind them
    left: set[str] = field(default_factory=set)
    migrating: bool = False  # a move owns it (detached, not yet restored): recoveries leave it be

    def retained_complete(self) -> bool:
        return self.dropped_upto == 0 or (self.snapshot is not None and self.snapshot[1].last_seq >= self.dropped_upto)


@dataclass
class Counters:
    batches: int = 0
    frames: int = 0
    unknown_session: int = 0
    quota_waits: int = 0
    quota_wait_seconds: float = 0.0
    moves: int = 0
    move_seconds: float = 0.0  # summed over moves: how long moved sessions' frames were held
    moves_in_order: int = 0  # moves that waited for the frames queued at their source (retained incomplete)
    move_not_found: int = 0  # sessions a move did not find on their source (never expected)
    move_redelivered: int = 0  # frames sent to a session's old instance, skipped there, applied at the new one
    recoveries: int = 0
    sessions_recovered: int = 0
    frames_redelivered: int = 0
    retained_dropped: int = 0
    bad_batches: int = 0
    payload_copies: int = 0  # frames whose batch did not arrive as a zero-copy object-store view
    shm_batches: int = 0  # batches read in place from a client's shared memory
    retention_copy_bytes: int = 0  # shared-memory batches copied for redelivery (off the stack's path)
    foreign_frames: int = 0  # frames addressing a session another client opened: dropped
    orphan_outputs: int = 0  # output frames of a session closed before they could be handed out
    outputs_dropped: int = 0  # queued output batches dropped for a client that never collects


Call = tuple[str, int, int, Any]  # (instance id, octets reserved, frames, the two object refs of process())


class Multiplexer:
    """Ray actor class (async). Create with `create_multiplexer`."""

    def __init__(self, seed: int = 0, max_retained_chunks: int = MAX_RETAINED_CHUNKS) -> None:
        if max_retained_chunks < 1:
            raise ValueError(f"max_retained_chunks must be at least 1, not {max_retained_chunks}")
        self.max_retained_chunks = max_retained_chunks
        self.instances: dict[str, InstanceState] = {}
        # Removed instances whose last calls may still be awaited (a drain returns once the
        # sessions left, not once every caller took its answer); bounded, oldest forgotten.
        self._retired: OrderedDict[str, InstanceState] = OrderedDict()
        self.arrived: dict[str, int] = {}  # frames received per protocol
        # Frames clients report offered (some may still wait on their side), per protocol id:
        # per live client, and the final counts of closed ones (so the sums never go back).
        self.offered: dict[str, dict[int, int]] = {}
        self._offered_closed: dict[int, int] = {}
        self._proto_names: dict[int, str] = {}
        self._owners: set[str] = set()
        self.routes: dict[Key, Route] = {}
        self.c = Counters()
        self.rng = random.Random(seed)
        self._client_next: dict[str, int] = {}
        self._turn_cv = asyncio.Condition()
        self._dispatch_lock = asyncio.Lock()
        self._collectors: set[asyncio.Task[None]] = set()  # output of moved sessions' released frames
        self._recovery_lock = asyncio.Lock()
        # Output produced outside a client's own submit (released or redelivered frames, timers),
        # split by the client that owns each frame's session: a client only ever gets its own.
        self._outputs: dict[str, deque[bytes]] = {}
        self.segments = SegmentCache()  # clients' shared-memory pools, mapped on first use
        self.node_id = ray.get_runtime_context().get_node_id()
        self.metrics = MultiplexerMetrics(seed=seed)
        self._metrics_task: asyncio.Task[None] | None = None

    # -- instances -----------------------------------------------------------------------------

    async def register_instance(
        self, instance_id: str, handle: Any, protocol: str, quota_bytes: int, max_sessions: int, node_id: str = ""
    ) -> None:
        self.instances[instance_id] = InstanceState(
            instance_id, handle, protocol, quota_bytes, max_sessions, node_id=node_id
        )
        self._start_metrics()

    async def node(self) -> str:
        """This actor's node: a client on the same node can hand batches over in shared memory."""
        return str(self.node_id)

    async def instance_loads(self) -> dict[str, dict[str, Any]]:
        return {
            iid: {
                "protocol": s.protocol,
                "sessions": len(s.sessions),
                "inflight_bytes": s.inflight_bytes,
                "inflight_frames": s.inflight_frames,
                "quota_bytes": s.quota_bytes,
                "busy": round(s.busy, 4),
                "accepting": s.accepting,
                "alive": s.alive,
                "frames": s.frames,
                # its sessions' frames so far: its share of the traffic, by the weights rebalance uses
                "session_frames": sum(r.frames for k in s.sessions if (r := self.routes.get(k)) is not None),
                "quota_waits": s.quota_waits,
            }
            for iid, s in self.instances.items()
        }

    # -- sessions ------------------------------------------------------------------------------

    async def open_sessions(self, specs: list[tuple[Key, str, dict[str, Any], int]], owner: str = "") -> dict[Key, str]:
        """Place and open sessions: (key, protocol, config, emit events). Returns key -> instance,
        or key -> 'error: ...' for a session that was refused. Only `owner` may send to them."""
        placed: dict[str, list[tuple[Key, dict[str, Any], int]]] = {}
        result: dict[Key, str] = {}
        for key, protocol, config, emit in specs:
            if key in self.routes:
                result[key] = f"error: session {key} already open"
                continue
            cands = [s.load() for s in self.instances.values() if s.protocol == protocol]
            iid = choose_instance(cands, self.rng)
            if iid is None:
                result[key] = f"error: no {protocol} instance can take a session"
                continue
            self.instances[iid].sessions.add(key)  # count it now so the next choice sees it
            self.routes[key] = Route(key, protocol, iid, dict(config), emit, owner=owner)
            self._proto_names[key[2]] = protocol
            self._owners.add(owner)
            placed.setdefault(iid, []).append((key, dict(config), emit))
            result[key] = iid
        calls = {iid: self.instances[iid].handle.open_sessions.remote(items) for iid, items in placed.items()}
        for iid, ref in calls.items():
            errors = await ref
            for (key, _cfg, _emit), err in zip(placed[iid], errors, strict=True):
                if err is not None:
                    self.routes.pop(key, None)
                    self.instances[iid].sessions.discard(key)
                    result[key] = f"error: {err}"
        # What the new sessions said on starting (BFD: its first transmission program) goes to
        # their owner with its next batch or poll.
        for iid in calls:
            out = await self.instances[iid].handle.tick.remote()
            if out:
                self._queue_output(bytes(out))
        return result

    async def close_sessions(self, keys: list[Key]) -> None:
        by_inst: dict[str, list[Key]] = {}
        for k in keys:
            r = self.routes.pop(k, None)
            if r is not None:
                by_inst.setdefault(r.instance_id, []).append(k)
                self.instances[r.instance_id].sessions.discard(k)
        await asyncio.gather(*(self.instances[i].handle.close_sessions.remote(ks) for i, ks in by_inst.items()))

    async def route_of(self, key: Key) -> str | None:
        r = self.routes.get(key)
        return None if r is None else r.instance_id

    async def routes_table(self) -> dict[str, list[Key]]:
        out: dict[str, list[Key]] = {}
        for k, r in self.routes.items():
            out.setdefault(r.instance_id, []).append(k)
        return out

    # -- ordering -------------------------------------------------------------------------------
    # Ray starts an async actor's tasks in no particular order, so arrival order means nothing:
    # each client numbers its batches and they are dispatched in that order, one dispatch at a
    # time (the dispatch lock, which moves and recoveries take too).

    async def _wait_client_turn(self, client_id: str, batch_seq: int) -> None:
        async with self._turn_cv:
            await self._turn_cv.wait_for(lambda: self._client_next.get(client_id, 0) == batch_seq)

    async def _end_client_turn(self, client_id: str) -> None:
        async with self._turn_cv:
            self._client_next[client_id] = self._client_next.get(client_id, 0) + 1
            self._turn_cv.notify_all()

    # -- the data path -------------------------------------------------------------------------

    async def submit(self, client_id: str, batch_seq: int, batch: Any, refs: list[Any]) -> list[bytes]:
        """Apply a client's batch number `batch_seq`, sent through the object store; return the output.

        `batch` is the client's object, (frames, their offsets), which Ray resolved before the call
        (a read-only view of the object store); refs[0] is the same object by reference, which is
        what the instances get - nobody copies the frames.
        """
        try:
            data, offsets = batch
            bi = index_batch(data, offsets)
            if data.flags.writeable:  # not the object store's own read-only buffer
                self.c.payload_copies += len(bi.offsets)
        except Exception:
            await self._skip_turn(client_id, batch_seq)
            raise
        return await self._apply(client_id, batch_seq, refs[0], bi)

    async def submit_shm(
        self, client_id: str, batch_seq: int, segment: str, start: int, length: int, offsets: bytes
    ) -> list[bytes]:
        """Apply a client's batch that sits in its shared-memory pool: `length` octets at `start`
        of `segment`, frames at `offsets` (u32 LE). Returns the output; the client may reuse the
        buffer once this returns."""
        try:
            view = self.segments.view(segment, start, length)
            data = np.frombuffer(view, dtype=np.uint8)
            bi = index_batch(data, np.frombuffer(offsets, dtype="<u4"))
            src = ShmBatch(segment, start, length, data.tobytes(), self.node_id)
            del data, view
        except Exception:
            await self._skip_turn(client_id, batch_seq)
            raise
        self.c.shm_batches += 1
        self.c.retention_copy_bytes += length
        return await self._apply(client_id, batch_seq, src, bi)

    async def _skip_turn(self, client_id: str, batch_seq: int) -> None:
        """A batch that could not be read: count it, and let the client's next batches through."""
        self.c.bad_batches += 1
        await self._wait_client_turn(client_id, batch_seq)
        await self._end_client_turn(client_id)

    async def _apply(self, client_id: str, batch_seq: int, src: Any, bi: BatchIndex) -> list[bytes]:
        t0 = time.perf_counter()
        await self._wait_client_turn(client_id, batch_seq)
        try:
            async with self._dispatch_lock:
                calls = await self._dispatch(client_id, src, bi)
        finally:
            await self._end_client_turn(client_id)
        outputs: list[bytes] = []
        for call in calls:
            out = await self._await_call(call)
            if out:
                outputs.append(out)
        mine = self._outputs.get(client_id)
        while mine:
            outputs.append(mine.popleft())
        self.metrics.batch(time.perf_counter() - t0)
        return outputs

    async def close_client(self, client_id: str, segment: str | None = None) -> None:
        """A client is done: forget its batch numbering and unmap its pool."""
        async with self._turn_cv:
            self._client_next.pop(client_id, None)
        self._owners.discard(client_id)
        for pid, n in self.offered.pop(client_id, {}).items():
            self._offered_closed[pid] = self._offered_closed.get(pid, 0) + n
        if segment:
            self.segments.drop(segment)

    async def report_offered(self, client_id: str, counts: dict[int, int]) -> None:
        """A client's cumulative frames offered per protocol id (see OffloadClient.offer)."""
        if client_id in self._owners:  # only clients that opened sessions (bounded by them)
            self.offered[client_id] = {int(k): int(v) for k, v in counts.items()}

    async def arrivals(self) -> dict[str, int]:
        """Frames offered per protocol so far: what clients report (including what backpressure
        still holds on their side), or what arrived here if that is more. A saturated
        instance's throughput would understate the demand exactly when it matters."""
        offered: dict[int, int] = dict(self._offered_closed)
        for counts in self.offered.values():
            for pid, n in counts.items():
                offered[pid] = offered.get(pid, 0) + n
        out = dict(self.arrived)
        for pid, n in offered.items():
            name = self._proto_names.get(pid)
            if name is not None:
                out[name] = max(out.get(name, 0), n)
        return out

    async def poll(self, client_id: str) -> list[bytes]:
        """A client's output produced outside its submits (timers, recoveries, released frames)."""
        mine = self._outputs.pop(client_id, None)
        return list(mine) if mine else []

    def _queue_output(self, out: bytes) -> None:
        """File output frames under the client owning each frame's session (frames of a session
        that is gone are dropped and counted). Rare paths only: a submit's own calls carry only
        that client's sessions and skip this."""
        view = memoryview(out)
        off, end = 0, len(view)
        parts: dict[str, list[bytes]] = {}
        while off + HEADER_LEN <= end:
            _m, _v, _k, proto, _f, tenant, vrouter, sid, _seq, _rx, _tx, n, _r = HEADER.unpack_from(view, off)
            r = self.routes.get((tenant, vrouter, proto, sid))
            if r is None:
                self.c.orphan_outputs += 1
            else:
                parts.setdefault(r.owner, []).append(bytes(view[off : off + HEADER_LEN + n]))
            off += HEADER_LEN + n
        for owner, frames in parts.items():
            q = self._outputs.setdefault(owner, deque())
            if len(q) >= MAX_QUEUED_OUTPUTS:
                q.popleft()  # bounded: a client that never polls loses its oldest (counted)
                self.c.outputs_dropped += 1
            q.append(b"".join(frames))

    async def _dispatch(self, client_id: str, ref: Any, bi: BatchIndex) -> list[Call]:
        """Group a batch's frames by session, then by instance, and send each group.

        Called under the dispatch lock, in each client's batch order.
        """
        groups: dict[str, list[Held]] = {}
        routes = self.routes
        arrived = self.arrived
        counted = self.metrics.pending  # frames per (protocol, tenant, vrouter), exported once a second
        seqs = bi.headers["seq"].tolist()
        offsets = bi.offsets.tolist()
        sizes = bi.sizes.tolist()
        for key, pos in by_session(bi):
            r = routes.get(key)
            if r is None:
                self.c.unknown_session += len(pos)
                continue
            if r.owner != client_id:
                self.c.foreign_frames += len(pos)  # another client's session: never delivered
                continue
            r.frames += len(pos)
            arrived[r.protocol] = arrived.get(r.protocol, 0) + len(pos)
            mk = (r.protocol, key[0], key[1])
            counted[mk] = counted.get(mk, 0) + len(pos)
            chunk = (ref, [offsets[i] for i in pos], seqs[pos[0]], seqs[pos[-1]], sum([sizes[i] for i in pos]), key)
            if r.moving:
                r.held.append(chunk)
                continue
            self._retain(r, chunk)
            g = groups.get(r.instance_id)
            if g is None:
                g = groups[r.instance_id] = []
            g.append(chunk)
        self.c.batches += 1
        self.c.frames += len(bi.offsets)
        calls = []
        for iid, chunks in groups.items():
            calls.append(await self._send(self.instances[iid], ref, chunks, live=True))
        return calls

    def _retain(self, r: Route, chunk: Held) -> None:
        if len(r.retained) >= self.max_retained_chunks:
            gone = r.retained.popleft()  # bounded; a snapshot is overdue (counted)
            r.dropped_upto = max(r.dropped_upto, gone[3])
            self.c.retained_dropped += 1
        r.retained.append(chunk)

    async def _send(
        self, inst: InstanceState, src: Any, chunks: list[Held], live: bool = False, wait_quota: bool = True
    ) -> Call:
        """One process() call with these chunks (all from batch `src`), in order.

        `live`: sent from within the batch's own submit, while its client still holds the buffer.
        """
        nbytes = sum(c[4] for c in chunks)
        if wait_quota:
            await self._reserve(inst, nbytes)
        else:
            inst.inflight_bytes += nbytes
        inst.peak_bytes = max(inst.peak_bytes, inst.inflight_bytes)
        offs = chunks[0][1] if len(chunks) == 1 else sorted(o for c in chunks for o in c[1])  # batch order
        inst.frames += len(offs)
        inst.inflight_frames += len(offs)
        n = len(offs)
        packed = np.array(offs, dtype="<u4").tobytes()  # the cheapest argument Ray serializes
        if not isinstance(src, ShmBatch):
            return (inst.instance_id, nbytes, n, inst.handle.process.remote(src, packed))
        if live and inst.node_id == src.node_id:
            # In place: the client can still write there, so the instance is told whose frames to take.
            allowed = list({c[5] for c in chunks})
            return (inst.instance_id, nbytes, n, inst.handle.process.remote(src.in_place(), packed, allowed))
        return (inst.instance_id, nbytes, n, inst.handle.process.remote(src.ref(), packed))

    async def _reserve(self, inst: InstanceState, nbytes: int) -> None:
        if inst.inflight_bytes + nbytes <= inst.quota_bytes or inst.inflight_bytes == 0:
            inst.inflight_bytes += nbytes
            return
        self.c.quota_waits += 1
        inst.quota_waits += 1
        t0 = time.perf_counter()
        async with inst.space:
            await inst.space.wait_for(
                lambda: inst.inflight_bytes + nbytes <= inst.quota_bytes or inst.inflight_bytes == 0 or not inst.alive
            )
        inst.inflight_bytes += nbytes
        self.c.quota_wait_seconds += time.perf_counter() - t0

    async def _release(self, inst: InstanceState, nbytes: int, nframes: int) -> None:
        inst.inflight_bytes = max(0, inst.inflight_bytes - nbytes)
        inst.inflight_frames = max(0, inst.inflight_frames - nframes)
        async with inst.space:
            inst.space.notify_all()

    async def _await_call(self, call: Call) -> bytes:
        iid, nbytes, nframes, (result_ref, blobs_ref) = call
        inst = self.instances.get(iid) or self._retired[iid]
        t0 = time.perf_counter()
        try:
            out, index = await result_ref
        except (RayActorError, RayTaskError) as e:
            if not _instance_failure(e):
                raise
            await self._release(inst, nbytes, nframes)
            ray.kill(inst.handle)  # a container-backed instance whose container died: end the actor too
            await self._recover(iid)
            return b""  # its frames were redelivered; their output comes through self._outputs
        inst.busy = 0.9 * inst.busy + 0.1 * min((time.perf_counter() - t0) * 10, 2.0)  # rough, smoothed
        await self._release(inst, nbytes, nframes)
        for key, st in index:
            r = self.routes.get(tuple(key))
            # (replies from one instance can be handled out of order: never go back to an older snapshot)
            if r is not None and r.instance_id == iid and (r.snapshot is None or st.last_seq >= r.snapshot[1].last_seq):
                r.snapshot = (blobs_ref, st)
                while r.retained and r.retained[0][3] <= st.last_seq:
                    r.retained.popleft()
        return bytes(out)

    async def _send_in_order(self, r: Route, chunks: list[Held]) -> list[Call]:
        """Send chunks of one route to its instance (caller holds the dispatch lock)."""
        inst = self.instances[r.instance_id]
        calls = []
        for chunk in chunks:
            self._retain(r, chunk)
            # no quota wait: these calls are collected only after all are sent, so waiting here
            # (under the dispatch lock) for their own quota would never end
            calls.append(await self._send(inst, chunk[0], [chunk], wait_quota=False))
        return calls

    async def _collect(self, calls: list[Call]) -> None:
        for call in calls:
            out = await self._await_call(call)
            if out:
                self._queue_output(out)

    # -- moves ---------------------------------------------------------------------------------

    async def move_session(self, key: Key, dst: str, reason: str = "manual") -> None:
        """Move a live session to instance `dst` without losing or reordering a frame. `reason`
        (rebalance, drain, manual) only labels the move in the metrics."""
        await self.move_sessions([key], dst, reason)

    async def move_sessions(self, keys: list[Key], dst: str, reason: str = "manual") -> None:
        """Move live sessions of one instance to instance `dst` (see `move_session`).

        The sessions are taken from their source between two batches, ahead of the batches
        queued there (`detach_now`): their frames in those are skipped at the source and sent
        again, from `retained`, to `dst` - each applied once, by sequence number. So sessions
        leave an overloaded instance in milliseconds, their backlog with them, instead of after
        that backlog (seconds: exactly when scaling out must relieve the instance). Only when a
        session's `retained` is incomplete (it overflowed since its last snapshot) do the moves
        wait their turn there instead."""
        routes = [self.routes[k] for k in keys if k in self.routes]
        # (a session being moved or recovered already is left to that)
        routes = [r for r in routes if r.instance_id != dst and not r.moving]
        if not routes:
            return
        sources = {r.instance_id for r in routes}
        if len(sources) > 1:  # (a recovery may have moved some since the caller grouped them)
            for sid in sorted(sources):
                await self.move_sessions([r.key for r in routes if r.instance_id == sid], dst, reason)
            return
        src = self.instances[routes[0].instance_id]
        target = self.instances[dst]
        t0 = time.perf_counter()
        async with self._dispatch_lock:
            # again under the lock: a recovery may have taken some while this waited for it
            routes = [r for r in routes if r.instance_id == src.instance_id and not r.moving]
            if not routes or not src.alive:
                return
            for r in routes:
                r.moving = True  # from here on their frames are held
                r.migrating = True
            fast = all(r.retained_complete() for r in routes)
            # else in order: sent under the lock, so after every process() already sent to src
            detached = (src.handle.detach_now if fast else src.handle.detach).remote([r.key for r in routes])
        try:
            await self._finish_move(routes, src, target, fast, detached, reason)
        finally:
            for r in routes:
                r.migrating = False
        # summed per session moved: how long its frames were held
        self.c.move_seconds += (time.perf_counter() - t0) * sum(1 for r in routes if r.instance_id == dst)

    async def _finish_move(
        self, routes: list[Route], src: InstanceState, target: InstanceState, fast: bool, detached: Any, reason: str
    ) -> None:
        try:
            states: list[tuple[bytes, SeqState] | None] = await detached
        except (RayActorError, RayTaskError) as e:
            for r in routes:
                r.migrating = False
            if not _instance_failure(e):
                for r in routes:
                    r.moving = False
                    await self._release_held(r)
                raise
            ray.kill(src.handle)
            await self._recover(src.instance_id)  # picks up the held frames too
            return
        # a session its source did not have (e.g. its open was still queued there): it stays
        lost = [r for r, st in zip(routes, states, strict=True) if st is None]
        moved = [(r, st) for r, st in zip(routes, states, strict=True) if st is not None]
        # From here the detached states are the sessions: bookkeeping before any await.
        for r, (blob, st) in moved:
            src.sessions.discard(r.key)
            r.snapshot = (ray.put({r.key: blob}), st)
            if fast:
                # what src had not applied when the session left: to the target, ahead of the held frames
                again = [c for c in r.retained if c[3] > st.last_seq]
                r.held = again + r.held
                r.left.add(src.instance_id)
                self.c.move_redelivered += sum(len(c[1]) for c in again)
            else:
                self.c.moves_in_order += 1
            r.retained.clear()
            r.dropped_upto = 0
        for r in lost:
            self.c.move_not_found += 1
            r.migrating = False
            r.moving = False
            await self._release_held(r, wait=False)
        if moved:
            try:
                await self._restore(target, [r for r, _ in moved], [st for _, st in moved])
            except (RayActorError, RayTaskError) as e:
                # The target failed them: the sessions are the states just taken - put them on
                # another instance (and if the target died, recover its own sessions too).
                for r, _ in moved:
                    r.migrating = False
                if _instance_failure(e):
                    ray.kill(target.handle)
                    await self._recover(target.instance_id)
                for r, _ in moved:
                    await self._recover_session(r)
                if not _instance_failure(e):
                    raise
                return
        for r, _ in moved:
            target.sessions.add(r.key)
            r.instance_id = target.instance_id
            r.moves += 1
            self.c.moves += 1
            self.metrics.moved(r.protocol, reason)
        for r, _ in moved:
            r.migrating = False
            await self._release_held(r, wait=False)
        if lost:
            raise RuntimeError(f"{len(lost)} sessions were not on {src.instance_id} to move (first {lost[0].key})")

    async def _restore(self, target: InstanceState, routes: list[Route], states: list[tuple[bytes, SeqState]]) -> None:
        """Restore sessions on `target`: ahead of its queue (no batch queued there names them:
        their frames are held), unless one of them left `target` ahead of its queue earlier -
        then its old frames may still be queued there, and the restore waits its turn."""
        items = [(r.key, blob, st, r.emit_events) for r, (blob, st) in zip(routes, states, strict=True)]
        behind = any(target.instance_id in r.left for r in routes)
        await (target.handle.restore_in_order if behind else target.handle.restore_sessions).remote(items)
        if behind:
            for r in routes:
                r.left.discard(target.instance_id)

    async def _release_held(self, r: Route, wait: bool = True) -> None:
        """Send a route's held frames to its (new) instance, in order, then let new ones flow.
        `wait`: until they are applied; else their output is collected in the background (a
        move is over once the frames flow again, however long the new instance takes)."""
        async with self._dispatch_lock:
            held, r.held = r.held, []
            r.moving = False
            calls = await self._send_in_order(r, held)
        if wait:
            await self._collect(calls)
        elif calls:
            task = asyncio.get_running_loop().create_task(self._collect(calls))
            self._collectors.add(task)  # held here until done (the loop keeps only weak references)
            task.add_done_callback(self._collected)

    def _collected(self, task: asyncio.Task[None]) -> None:
        self._collectors.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("output of released frames lost: %r", task.exception())

    async def drain_instance(self, instance_id: str) -> int:
        """Move every session off an instance (to the others of its protocol). Returns how many."""
        inst = self.instances[instance_id]
        inst.accepting = False
        others = [s for s in self.instances.values() if s.protocol == inst.protocol and s.instance_id != instance_id]
        planned: dict[str, int] = {}  # sessions headed to each target, counted before they arrive
        moves: list[tuple[Any, str]] = []
        for key in list(inst.sessions):
            cands = [replace(s.load(), sessions=s.load().sessions + planned.get(s.instance_id, 0)) for s in others]
            dst = choose_instance(cands, self.rng)
            if dst is None:
                inst.accepting = True
                raise RuntimeError(f"no other {inst.protocol} instance can take sessions from {instance_id}")
            planned[dst] = planned.get(dst, 0) + 1
            moves.append((key, dst))
        await self._move_all(moves, "drain")
        return len(moves)

    async def rebalance(self, protocol: str, by_load: bool = True) -> int:
        """Even out a protocol's instances by moving live sessions: by load - each session's
        frames so far, since sessions' rates are skewed (a busy router's weigh more) - or by
        session counts (`by_load` False, or while no session has sent anything)."""
        insts = [s for s in self.instances.values() if s.protocol == protocol and s.alive]
        by: dict[str, list[Any]] = {s.instance_id: sorted(s.sessions) for s in insts}
        weights = {k: float(r.frames) for s in insts for k in s.sessions if (r := self.routes.get(k)) is not None}
        busy = by_load and any(weights.values())
        n = sum(len(v) for v in by.values())
        moves = rebalance_moves(
            [s.load() for s in insts],
            by,
            weight_of={k: w + 1.0 for k, w in weights.items()} if busy else None,
            max_moves=max(8, n // 4) if busy else None,
        )
        await self._move_all(moves, "rebalance")
        return len(moves)

    async def _move_all(self, moves: list[tuple[Any, str]], reason: str) -> None:
        """Make the moves, those from one instance to another together (one detach there, one
        restore here), the groups concurrently (at most MAX_CONCURRENT_MOVES at once). Raises the
        first failure after every move has ended."""
        gate = asyncio.Semaphore(MAX_CONCURRENT_MOVES)
        groups: dict[tuple[str, str], list[Key]] = {}
        for key, dst in moves:
            groups.setdefault((self.routes[key].instance_id, dst), []).append(key)

        async def one(keys: list[Key], dst: str) -> None:
            async with gate:
                await self.move_sessions(keys, dst, reason)

        results = await asyncio.gather(*(one(ks, d) for (_s, d), ks in groups.items()), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def remove_instance(self, instance_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            return
        if inst.sessions and inst.alive:
            raise RuntimeError(f"instance {instance_id} still holds {len(inst.sessions)} sessions; drain it first")
        del self.instances[instance_id]
        for r in self.routes.values():
            r.left.discard(instance_id)
        self._retired[instance_id] = inst
        while len(self._retired) > 1024:
            self._retired.popitem(last=False)
        self.metrics.instance_gone(instance_id, inst.protocol)

    async def set_accepting(self, instance_id: str, accepting: bool) -> None:
        """Open or close an instance to new and moved sessions (closed while it waits to be drained)."""
        self.instances[instance_id].accepting = accepting

    async def moved_sessions(self) -> int:
        """How many sessions have been moved live at least once."""
        return sum(1 for r in self.routes.values() if r.moves)

    async def least_used(self, protocol: str) -> str | None:
        return least_used([s.load() for s in self.instances.values() if s.protocol == protocol])

    # -- failure -------------------------------------------------------------------------------

    async def report_dead(self, instance_id: str) -> None:
        """Someone else (the VPSM) found an instance dead: recover its sessions now rather than
        on the next call that fails."""
        inst = self.instances.get(instance_id)
        if inst is not None and inst.alive:
            await self._recover(instance_id)

    async def _recover(self, instance_id: str) -> None:
        """An instance died: restore its sessions elsewhere and redeliver what it had not made durable."""
        async with self._recovery_lock:
            inst = self.instances.get(instance_id)
            if inst is None or not inst.alive:
                return
            async with self._dispatch_lock:
                inst.alive = False
                inst.accepting = False
                keys = [k for k, r in self.routes.items() if r.instance_id == instance_id and not r.migrating]
                for key in keys:
                    r = self.routes[key]
                    r.moving = True  # later frames wait; earlier ones are in `retained`
                    r.held = list(r.retained) + r.held  # redeliver what was not snapshot, in order
                    r.retained.clear()
                    r.dropped_upto = 0
            self.c.recoveries += 1
        async with inst.space:
            inst.space.notify_all()
        log.warning("instance %s died: recovering %d sessions", instance_id, len(keys))
        # Outside the lock: a recovery that hits another dead instance recovers that one too.
        for key in keys:
            await self._recover_session(self.routes[key])
        inst.sessions.clear()

    async def _recover_session(self, r: Route) -> None:
        cands = [s.load() for s in self.instances.values() if s.protocol == r.protocol]
        dst = choose_instance(cands, self.rng)
        if dst is None:
            raise RuntimeError(f"no live {r.protocol} instance to recover session {r.key} on")
        target = self.instances[dst]
        if r.snapshot is not None:
            blobs_ref, st = r.snapshot
            blobs = await blobs_ref
            await self._restore(target, [r], [(blobs[r.key], st)])
        else:
            errors = await target.handle.open_sessions.remote([(r.key, r.config, r.emit_events)])
            if errors[0] is not None:
                raise RuntimeError(f"could not reopen session {r.key} on {dst}: {errors[0]}")
        target.sessions.add(r.key)
        r.instance_id = dst
        self.c.sessions_recovered += 1
        self.metrics.moved(r.protocol, "recovery")
        self.c.frames_redelivered += sum(len(c[1]) for c in r.held)
        await self._release_held(r)

    # -- stats ---------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        c = self.c
        return {
            "instances": len(self.instances),
            "sessions": len(self.routes),
            "batches": c.batches,
            "frames": c.frames,
            "unknown_session": c.unknown_session,
            "quota_waits": c.quota_waits,
            "quota_wait_seconds": round(c.quota_wait_seconds, 4),
            "moves": c.moves,
            "move_seconds": round(c.move_seconds, 4),
            "moves_in_order": c.moves_in_order,
            "move_redelivered": c.move_redelivered,
            "move_not_found": c.move_not_found,
            "recoveries": c.recoveries,
            "sessions_recovered": c.sessions_recovered,
            "frames_redelivered": c.frames_redelivered,
            "retained_dropped": c.retained_dropped,
            "bad_batches": c.bad_batches,
            "payload_copies": c.payload_copies,
            "shm_batches": c.shm_batches,
            "retention_copy_bytes": c.retention_copy_bytes,
            "retained_frames": sum(len(c[1]) for r in self.routes.values() for c in r.retained),
            "moving_sessions": sum(1 for r in self.routes.values() if r.moving),
            "held_frames": sum(len(c[1]) for r in self.routes.values() for c in r.held),
            "collecting": len(self._collectors),  # moved sessions' released frames, output pending
            "foreign_frames": c.foreign_frames,
            "orphan_outputs": c.orphan_outputs,
            "outputs_dropped": c.outputs_dropped,
        }

    async def tick(self) -> int:
        """Run due timers on every instance; their output waits for the next submit or poll."""
        alive = [s for s in self.instances.values() if s.alive]
        outs = await asyncio.gather(*(s.handle.tick.remote() for s in alive), return_exceptions=True)
        n = 0
        for o in outs:
            if isinstance(o, (bytes, bytearray)) and o:
                self._queue_output(bytes(o))
                n += 1
        return n

    # -- metrics -------------------------------------------------------------------------------
    # The data path only adds to dicts (per batch); this loop hands the sums to Ray once a second.

    def _start_metrics(self) -> None:
        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(self._export_metrics())

    async def _export_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PERIOD_S)
            try:
                self.flush_metrics()
            except Exception:  # metrics must never take the multiplexer down
                log.exception("exporting metrics")

    def flush_metrics(self) -> None:
        quotas = []
        for s in self.instances.values():
            quotas.append((s.instance_id, s.protocol, s.peak_bytes, s.quota_bytes))
            s.peak_bytes = s.inflight_bytes  # the next interval's peak starts from what is in flight now
        self.metrics.flush(quotas)


def _instance_failure(e: BaseException) -> bool:
    """An actor that died, or whose container did (the backend raised InstanceFailed)."""
    if isinstance(e, RayActorError):
        return True
    return "InstanceFailed" in type(getattr(e, "cause", None)).__name__ or "InstanceFailed" in str(e)


# Calls the multiplexer runs at once. Every batch a client has in flight holds one while it waits
# for its turn (a client's batches are applied in order, and Ray starts them out of order), so
# the clients' in-flight windows together must stay well below it: with 256, five clients of 240
# batches filled every slot with batches waiting for a turn that could then never start
# (found by a live replay that hung). Waiting coroutines cost little.
MAX_CONCURRENCY = 4096


def create_multiplexer(
    name: str = "apsv-multiplexer",
    *,
    namespace: str | None = None,
    seed: int = 0,
    detached: bool = False,
    max_retained_chunks: int = MAX_RETAINED_CHUNKS,
) -> Any:
    cls = ray.remote(Multiplexer)
    opts: dict[str, Any] = {"name": name, "max_concurrency": MAX_CONCURRENCY, "num_cpus": 0, "get_if_exists": True}
    if namespace:
        opts["namespace"] = namespace
    if detached:  # outlives the driver that made it (`apsv up` exits once deployed)
        opts["lifetime"] = "detached"
    return cls.options(**opts).remote(seed, max_retained_chunks)

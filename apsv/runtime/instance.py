"""The stack instance: a Ray actor hosting many sessions of one protocol.

All its calls come from the multiplexer, so Ray's per-caller ordering of actor tasks is the
session order: frames of a session are applied in the order the multiplexer routed them, and a
move (detach here, restore there) cannot overtake the frames sent before it. The actor is
synchronous on purpose: a batch is applied as a whole before the next call starts.

One exception, `detach_now` (its own thread): a session leaving an overloaded instance is taken
between two batches, ahead of the batches queued for it, instead of after the whole backlog. The
frames of it still queued here are then skipped (counted as departed) and the multiplexer
redelivers them, from what it retains, to the session's new instance - by sequence number, so
each is applied exactly once. A lock keeps a batch and a detach from interleaving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray

from apsv.runtime.backend import Backend, ProcessBackend
from apsv.runtime.docker_backend import InstanceFailed
from apsv.runtime.host import HostLimits, Key, SeqState
from apsv.runtime.shm import SegmentCache
from apsv.runtime.telemetry import InstanceMetrics, percentile


@dataclass(frozen=True)
class Allocation:
    """What the VPSM gives an instance: scheduling resources, container limits, buffer quota."""

    cpu: float = 0.5  # Ray num_cpus, and the container's CPU limit
    memory_bytes: int = 512 << 20  # Ray memory resource, and the container's memory limit
    buffer_quota_bytes: int = 8 << 20  # payload bytes in flight to this instance (multiplexer)
    max_sessions: int = 10_000

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StackInstance:
    """Ray actor class (wrapped with ray.remote by `create_instance`)."""

    def __init__(
        self,
        instance_id: str,
        protocol: str,
        backend: str,
        allocation: Allocation,
        snapshot_every: int = 256,
        image: str | None = None,
    ):
        self.instance_id = instance_id
        self.protocol = protocol
        self.allocation = allocation
        self.started = time.time()
        limits = HostLimits(max_sessions=allocation.max_sessions, snapshot_every=snapshot_every)
        self.backend: Backend
        if backend == "process":
            self.backend = ProcessBackend(protocol, limits)
        elif backend == "docker":
            from apsv.runtime.docker_backend import DockerBackend

            self.backend = DockerBackend(instance_id, protocol, limits, allocation, image=image)
        else:
            raise ValueError(f"unknown backend {backend!r} (process or docker)")
        self.metrics = InstanceMetrics(instance_id, protocol, self.backend.kind)
        self.payload_copies = 0
        self.segments = SegmentCache()  # senders' shared-memory pools, mapped on first use
        self._host_lock = threading.Lock()  # the data path vs detach_now's thread

    @ray.method(concurrency_group="control")
    def ready(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "backend": self.backend.kind,
            "protocol": self.protocol,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def open_sessions(self, specs: list[tuple[Key, dict[str, Any], int]]) -> list[str | None]:
        """Open sessions; returns, per spec, None or the error that refused it."""
        now = time.time()
        out: list[str | None] = []
        with self._host_lock:
            for key, config, emit in specs:
                try:
                    self.backend.open(key, config, now, emit)
                    out.append(None)
                except Exception as e:  # a bad config refuses that session, not the batch
                    out.append(f"{type(e).__name__}: {e}")
        return out

    @ray.method(num_returns=2)
    def process(
        self, batch: Any, offsets: bytes, allowed: list[Key] | None = None
    ) -> tuple[tuple[bytes, list[tuple[Key, SeqState]]], dict[Key, bytes]]:
        """Apply the frames at `offsets` (u32 LE, the multiplexer's selection) of a batch.

        `batch` is where the frames are, read in place: a sender's shared-memory buffer
        (`("shm", segment, start, length)`), or the sender's object from the object store (Ray
        resolved it to a read-only view), or a copy the multiplexer kept (a redelivery). For
        shared memory, which its writer can still change, `allowed` lists the sessions the
        multiplexer routed here: a frame naming any other is refused.

        Returns two objects: (the output frames, the snapshots made while applying it as
        (session, sequence state)), and the snapshot blobs by session - separate, so the
        multiplexer keeps the blobs by reference without fetching them.
        """
        offs = np.frombuffer(offsets, dtype="<u4").tolist()
        view: memoryview
        if isinstance(batch, tuple) and batch and isinstance(batch[0], str):
            _tag, name, start, length = batch
            view = self.segments.view(name, start, length)
        else:
            data = batch[0] if isinstance(batch, tuple) else batch
            if not _zero_copy(data):  # the object store hands out read-only views; anything else was copied
                self.payload_copies += len(offs)
            view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        with self._host_lock:
            t0 = time.perf_counter()
            out = self.backend.process(view, offs, time.time(), None if allowed is None else set(allowed))
            self.metrics.batch(len(offs), time.perf_counter() - t0)
            snaps = self.backend.take_snapshots()
        return (out, [(k, st) for k, (st, _b) in snaps.items()]), {k: b for k, (_st, b) in snaps.items()}

    @ray.method(concurrency_group="moves")
    def restore_sessions(self, items: list[tuple[Key, bytes, SeqState, int]]) -> None:
        """Take sessions in (moved or recovered), without waiting for the batches queued here:
        none of them can name these sessions - their frames are held until this returns."""
        self._restore(items)

    def restore_in_order(self, items: list[tuple[Key, bytes, SeqState, int]]) -> None:
        """`restore_sessions` after every batch already sent here (which may carry a session's
        old frames, from before it left this instance ahead of them: they must be skipped)."""
        self._restore(items)

    def _restore(self, items: list[tuple[Key, bytes, SeqState, int]]) -> None:
        with self._host_lock:
            for key, blob, seq, emit in items:
                self.backend.restore(key, blob, seq, emit)

    def detach(self, keys: list[Key]) -> list[tuple[bytes, SeqState] | None]:
        """Snapshot and remove sessions after every batch sent here before this call."""
        return self._detach(keys)

    @ray.method(concurrency_group="moves")
    def detach_now(self, keys: list[Key]) -> list[tuple[bytes, SeqState] | None]:
        """Snapshot and remove sessions now, between two batches, ahead of those still queued
        (see the module's docstring: the caller redelivers what follows each snapshot)."""
        return self._detach(keys)

    def _detach(self, keys: list[Key]) -> list[tuple[bytes, SeqState] | None]:
        # None for a session not detached (not here, or its snapshot failed: it stays here) - the
        # others still go, one bad key must not strand the sessions already detached
        out: list[tuple[bytes, SeqState] | None] = []
        with self._host_lock:
            for k in keys:
                try:
                    out.append(self.backend.detach(k))
                except InstanceFailed:
                    raise  # the container is gone: the caller recovers the instance
                except Exception:
                    out.append(None)
        return out

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        with self._host_lock:
            return self.backend.snapshot(key)

    def close_sessions(self, keys: list[Key]) -> None:
        now = time.time()
        with self._host_lock:
            for k in keys:
                self.backend.close(k, now)

    def tick(self) -> bytes:
        with self._host_lock:
            return self.backend.tick(time.time())

    def session_info(self, key: Key) -> dict[str, Any]:
        with self._host_lock:
            return self.backend.session_info(key)

    def session_table(self, key: Key, family: str = "ipv4-unicast") -> list[tuple[str, str | None, str]]:
        """The session's Loc-RIB rows (prefix, next hop, source) for a family."""
        with self._host_lock:
            return self.backend.session_table(key, family)

    @ray.method(concurrency_group="control")
    def load(self) -> dict[str, Any]:
        """Counters, resource use and the latencies seen since the last call (drained).

        In the control group (its own thread): the VPSM must see an overloaded instance's load
        now, not after the backlog of batches queued before its call - that is when scaling
        matters most. It only reads counters; a latency sample appended while it swaps the list
        may be missed."""
        load = self.backend.load()
        latencies = [float(x) for x in load.pop("latency_ns", [])]
        usage = self.backend.usage()
        self.metrics.usage(usage, load)
        self.metrics.observe_latencies([int(x) for x in latencies])
        ms = [x / 1e6 for x in latencies]
        return {
            "instance_id": self.instance_id,
            "protocol": self.protocol,
            "backend": self.backend.kind,
            "allocation": self.allocation.to_json(),
            "uptime_s": round(time.time() - self.started, 3),
            **load,
            **usage,
            "latency_p50_ms": percentile(ms, 50),
            "latency_p99_ms": percentile(ms, 99),
            "latency_max_ms": max(ms) if ms else None,
            "latency_samples": len(ms),
            # every sample (bounded by the host), so the VPSM can take a protocol-wide p99 over all
            # instances - a max of per-instance p99s is not one
            "latency_ms": np.asarray(ms, dtype=np.float32),
            "payload_copies": self.payload_copies,
        }

    def shutdown(self) -> None:
        self.backend.shutdown()


def _zero_copy(data: Any) -> bool:
    """A read-only numpy view is the object store's buffer itself (Ray's zero-copy read)."""
    flags = getattr(data, "flags", None)
    return flags is not None and not flags.writeable and not flags.owndata


def create_instance(
    instance_id: str,
    protocol: str,
    backend: str,
    allocation: Allocation,
    *,
    snapshot_every: int = 256,
    resources: Mapping[str, float] | None = None,
    image: str | None = None,
) -> Any:
    """Start a stack instance actor with the allocation's resources (CPU, memory)."""
    # load and readiness in a group of their own, beside the data path, and out-of-turn detaches
    # in another (groups are not settable in options())
    cls = ray.remote(concurrency_groups={"control": 1, "moves": 1})(StackInstance)  # type: ignore[call-overload]
    opts: dict[str, Any] = {
        "name": f"apsv-instance-{instance_id}",
        "num_cpus": allocation.cpu,
        "memory": allocation.memory_bytes,
        "max_restarts": 0,  # a dead instance's sessions are recovered elsewhere by the multiplexer
        "max_concurrency": 1,  # the data path: batches, moves and snapshots in call order
    }
    if resources:
        opts["resources"] = dict(resources)
    return cls.options(**opts).remote(instance_id, protocol, backend, allocation, snapshot_every, image)

"""The stack instance: a Ray actor hosting many sessions of one protocol.

Frames do not come to it through Ray. Each client on its node connects to its data-plane
socket (`apsv.runtime.dataplane`) and names batches in its shared-memory pool; a thread of this
process applies them in place and answers on the same socket. A client on another node calls
`rx_batch` instead, with the batch in the object store; both go through one `dp_batch`, under
one lock with everything else that touches the sessions, so a batch is applied as a whole.

What the instance checks (fencing, apsv.runtime.host): a frame is applied only for a session
held here, at the epoch the frame names, from the client that owns it, in sequence. Anything else
is refused with what the instance knows, and the client re-sends it where it belongs.

The multiplexer (the control plane) calls it through Ray: to open, close or expect sessions,
and to hand sessions over to another instance (`hand_over`, in its own thread: a session leaves
between two batches, ahead of what is queued here; the target's `adopt` runs in a group of its
own so two instances handing over to each other cannot wait on each other).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray

from apsv.gc_tuning import tune_gc
from apsv.runtime import channel
from apsv.runtime.backend import Backend, ProcessBackend
from apsv.runtime.credentials import deployment_key, verify
from apsv.runtime.dataplane import DataPlaneServer, socket_directory
from apsv.runtime.docker_backend import InstanceFailed
from apsv.runtime.host import HostLimits, Key, SeqState
from apsv.runtime.metrics import InstanceMetrics, percentile

log = logging.getLogger("apsv.instance")

# (session, snapshot blob, its sequence state, emit events, owner, epoch): a session in transit
Adoptee = tuple[Key, bytes, SeqState, int, str, int]


@dataclass(frozen=True)
class Allocation:
    """What the VPSM gives an instance: scheduling resources, container limits, buffer quota."""

    cpu: float = 0.5  # Ray num_cpus, and the container's CPU limit
    memory_bytes: int = 512 << 20  # Ray memory resource, and the container's memory limit
    buffer_quota_bytes: int = 8 << 20  # payload octets one client may have in flight to it
    max_sessions: int = 10_000
    # docker backend: a call the container has not answered in this long (paused, hung) ends
    # the instance - its sessions are restored elsewhere, and the container is removed
    call_deadline_s: float = 30.0

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
        deployment: str = "",
        namespace: str | None = None,
    ):
        tune_gc()  # this process holds sessions' state (RIBs): long-lived objects, no cycles
        self.instance_id = instance_id
        self.deployment, self.namespace = deployment, namespace
        self.protocol = protocol
        self.allocation = allocation
        self.started = time.time()
        limits = HostLimits(max_sessions=allocation.max_sessions, snapshot_every=snapshot_every)
        self.backend: Backend
        if backend == "process":
            self.backend = ProcessBackend(protocol, limits)
        elif backend == "docker":
            from apsv.runtime.docker_backend import DockerBackend

            docker = DockerBackend(instance_id, protocol, limits, allocation, image=image)
            docker.on_failure = self._die
            self.backend = docker
        else:
            raise ValueError(f"unknown backend {backend!r} (process or docker)")
        self.metrics = InstanceMetrics(instance_id, protocol, self.backend.kind)
        self.payload_copies = 0
        # a container has its own IPC namespace: it cannot map the clients' pools, so each batch
        # is relayed to it over its socket (one copy, counted in payload_copies)
        self.relays = self.backend.kind == "docker"
        self._lock = threading.Lock()  # the sessions: data plane, Ray calls, hand-overs
        # Hand-overs go before the next batch: a session leaves between two batches, ahead of
        # the queue (a data-plane thread about to take the lock waits while one is waiting).
        self._handing_over = 0
        self._hand_over_done = threading.Condition()
        self._key = deployment_key(f"{namespace}/{deployment}")
        self.path = _DataPath(self)
        self.dp = DataPlaneServer(instance_id, socket_directory(), self._key, self.path, allocation.buffer_quota_bytes)
        self.dp.on_error = self._die
        self.dp.start()

    def _die(self, why: str) -> None:
        """The instance cannot go on (its container died, or its data plane failed): end the
        process, so that everyone sees it dead at once - its clients' connections close, Ray
        reports the actor gone - and its sessions are restored elsewhere from custody. Limping
        on half-alive would leave them waiting on it."""
        log.error("instance %s ends: %s", self.instance_id, why)
        with contextlib.suppress(Exception):
            self.backend.shutdown()
        os._exit(70)

    # -- the data path -------------------------------------------------------------------------

    def dp_batch(self, owner: str, data: memoryview, offsets: list[int], snapshot_keys: list[Key]) -> channel.Reply:
        return self.path.dp_batch(owner, data, offsets, snapshot_keys)

    def dp_restore(self, owner: str, msg: channel.Restore) -> str:
        return self.path.dp_restore(owner, msg)

    def _tell_restored(self, key: Key) -> None:
        """The multiplexer marks the session live again (it placed it here as waiting)."""
        try:
            mux = ray.get_actor(self.deployment, namespace=self.namespace)
            mux.restored.remote(self.instance_id, [key])
        except Exception:  # the multiplexer is restarting: it rebuilds from sessions_report anyway
            log.debug("could not tell the multiplexer %s was restored", key, exc_info=True)

    def rx_batch(
        self, client: str, credential: bytes, batch: Any, offsets: bytes, batch_id: int, snapshot_keys: list[Key]
    ) -> bytes:
        """A batch from a client on another node: `batch` is its object from the object store
        (Ray resolved it to a read-only view, read in place). Returns the REPLY, followed by any
        output held for this client."""
        self._check(client, credential)
        data = b"" if batch is None else batch  # (None: a batch of no frames, asking for snapshots)
        if len(offsets) and not _zero_copy(data):  # the object store hands out read-only views
            self.payload_copies += len(offsets) // 4
        view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        reply = self.dp_batch(client, view, channel.offsets_list(offsets), list(snapshot_keys))
        reply.batch = batch_id
        msgs, dropped = channel.reply_messages(reply)
        self.dp.c.snapshots_dropped += dropped
        return b"".join(msgs + self.dp.take_waiting(client))

    def rx_restore(self, client: str, credential: bytes, message: bytes) -> bytes:
        """RESTORE from a client on another node; returns RESTORED."""
        self._check(client, credential)
        msg = channel.decode(message[4:])
        if not isinstance(msg, channel.Restore):
            raise ValueError("rx_restore takes a RESTORE message")
        return channel.restored(msg.request, msg.key, self.dp_restore(client, msg))

    def rx_poll(self, client: str, credential: bytes) -> bytes:
        """Output held for a client on another node (produced outside its batches)."""
        self._check(client, credential)
        return b"".join(self.dp.take_waiting(client))

    def _check(self, client: str, credential: bytes) -> None:
        if not verify(self._key, client, credential):
            raise PermissionError(f"credential refused for client {client!r}")

    def _send(self, outputs: dict[str, bytes]) -> None:
        """Output produced outside a batch, to each owning client (now, or when it connects)."""
        for owner, out in outputs.items():
            for msg in channel.output_messages(out):
                self.dp.send_output(owner, msg)

    # -- the control plane's calls -------------------------------------------------------------

    @ray.method(concurrency_group="control")
    def ready(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "backend": self.backend.kind,
            "protocol": self.protocol,
            "node_id": ray.get_runtime_context().get_node_id(),
            "endpoint": str(self.dp.path),
        }

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    def open_sessions(self, specs: list[tuple[Key, dict[str, Any], int, str, int]]) -> list[str | None]:
        """Open sessions (key, config, emit events, owner, epoch); per spec, None or the error
        that refused it. What they say on starting goes to their owners."""
        now = time.time()
        out: list[str | None] = []
        with self._lock:
            for key, config, emit, owner, epoch in specs:
                try:
                    self.backend.open(key, config, now, emit, owner, epoch)
                    out.append(None)
                except InstanceFailed:
                    raise
                except Exception as e:  # a bad config refuses that session, not the batch
                    out.append(f"{type(e).__name__}: {e}")
            outputs = self.backend.collect()
        self._send(outputs)
        return out

    def expect_sessions(self, items: list[tuple[Key, str, int]]) -> list[str | None]:
        """Hold places for sessions (key, owner, epoch) whose clients will restore them from
        custody (their instance died); per item, None or why not."""
        out: list[str | None] = []
        with self._lock:
            for key, owner, epoch in items:
                try:
                    self.backend.expect(key, owner, epoch)
                    out.append(None)
                except InstanceFailed:
                    raise
                except Exception as e:
                    out.append(f"{type(e).__name__}: {e}")
        return out

    def close_sessions(self, keys: list[Key]) -> None:
        now = time.time()
        with self._lock:
            for k in keys:
                self.backend.close(k, now)
            outputs = self.backend.collect()
        self._send(outputs)

    @ray.method(concurrency_group="moves")
    def hand_over(self, moves: list[tuple[Key, int]], target: Any, target_id: str) -> list[tuple[str | None, int]]:
        """Move sessions (key, new epoch) to instance `target` now, between two batches: each is
        detached (its later frames here are refused, naming `target_id` at the new epoch) and
        adopted by the target. The state never has two homes, and never none while this
        instance lives. Per move: (None, new epoch) when moved; otherwise why not and the epoch
        the session has here now - its old one, or, when the target failed to adopt it, one past
        the new one (its client may have followed a refusal to the new epoch already, and must
        see the route back here as newer still)."""
        results: dict[Key, tuple[str | None, int]] = {}
        sent: list[Adoptee] = []
        with self._hand_over_done:
            self._handing_over += 1
        try:
            with self._lock:
                for key, epoch in moves:
                    held = self.backend.holding(key)
                    if held is None:
                        results[key] = ("not here", 0)
                        continue
                    owner, old_epoch, emit = held
                    try:
                        blob, seq = self.backend.detach(key, target_id, epoch)
                    except InstanceFailed:
                        raise
                    except Exception as e:  # its snapshot failed: it stays
                        results[key] = (f"{type(e).__name__}: {e}", old_epoch)
                        continue
                    sent.append((key, blob, seq, emit, owner, epoch))
        finally:
            with self._hand_over_done:
                self._handing_over -= 1
                self._hand_over_done.notify_all()
        if sent:
            try:
                errors: list[str | None] = ray.get(target.adopt.remote(sent))
            except Exception as e:  # the target died or failed: every one stays
                errors = [f"{type(e).__name__}: {e}"] * len(sent)
            with self._lock:
                for (key, blob, seq, emit, owner, epoch), err in zip(sent, errors, strict=True):
                    if err is None:
                        results[key] = (None, epoch)
                    else:
                        self.backend.restore(key, blob, seq, emit, owner, epoch + 1)
                        results[key] = (err, epoch + 1)
        return [results[k] for k, _ in moves]

    @ray.method(concurrency_group="adopt")
    def adopt(self, items: list[Adoptee]) -> list[str | None]:
        """Take sessions in from another instance's `hand_over`; per item, None or why not."""
        out: list[str | None] = []
        with self._lock:
            for key, blob, seq, emit, owner, epoch in items:
                try:
                    self.backend.restore(key, blob, seq, emit, owner, epoch)
                    out.append(None)
                except InstanceFailed:
                    raise
                except Exception as e:
                    out.append(f"{type(e).__name__}: {e}")
        return out

    def snapshot(self, key: Key) -> tuple[bytes, SeqState]:
        with self._lock:
            return self.backend.snapshot(key)

    def session_info(self, key: Key, digest: bool = True) -> dict[str, Any]:
        with self._lock:
            return self.backend.session_info(key, digest)

    def session_infos(self, keys: list[Key], digest: bool = True) -> dict[Key, dict[str, Any] | None]:
        """Several sessions' info at once (None for one not held here)."""
        with self._lock:
            out: dict[Key, dict[str, Any] | None] = {}
            for k in keys:
                try:
                    out[k] = self.backend.session_info(k, digest)
                except KeyError:
                    out[k] = None
            return out

    def session_table(self, key: Key, family: str = "ipv4-unicast", detail: bool = False) -> list[tuple[Any, ...]]:
        """The session's Loc-RIB rows (prefix, next hop, source) for a family; with `detail`,
        each route's attributes too (BgpSession.route_rows)."""
        with self._lock:
            return self.backend.session_table(key, family, detail)

    @ray.method(concurrency_group="control")
    def sessions_report(self) -> list[tuple[Key, str, int, bool]]:
        """(session, owner, epoch, pending) for every session here: a restarted multiplexer's
        routes are rebuilt from these."""
        with self._lock:
            return self.backend.sessions_report()

    @ray.method(concurrency_group="control")
    def session_weights(self) -> dict[Key, int]:
        """Frames each session has applied here: the weights rebalancing evens out."""
        with self._lock:
            return self.backend.session_weights()

    @ray.method(concurrency_group="control")
    def load(self) -> dict[str, Any]:
        """Counters, resource use and the latencies seen since the last call (drained).

        In the control group (its own thread): the VPSM must see an overloaded instance's load
        now, not after the batches queued before its call - that is when scaling matters most."""
        load = self.backend.load()
        latencies = [float(x) for x in load.pop("latency_ns", [])]
        usage = self.backend.usage()
        self.metrics.usage(usage, load)
        self.metrics.observe_latencies([int(x) for x in latencies])
        queued = max(0, self.dp.queued_frames)
        self.metrics.queue(queued, self.allocation.buffer_quota_bytes)
        ms = [x / 1e6 for x in latencies]
        dp = self.dp.c
        return {
            "instance_id": self.instance_id,
            "protocol": self.protocol,
            "backend": self.backend.kind,
            "allocation": self.allocation.to_json(),
            "uptime_s": round(time.time() - self.started, 3),
            **load,
            **usage,
            "queue_depth": queued,
            "session_frames": sum(self.backend.session_weights().values()),
            "clients": len(self.dp.connected()),
            "dp_batches": dp.batches,
            "dp_dropped_connections": dp.dropped_connections,
            "dp_refused_connections": dp.refused_connections,
            "dp_bad_messages": dp.bad_messages,
            "dp_waiting_dropped": dp.waiting_dropped,
            "dp_snapshots_dropped": dp.snapshots_dropped,
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
        self.dp.stop()
        with self._lock:
            self.backend.shutdown()


class _DataPath:
    """What the data-plane thread (and `rx_batch`) runs for each batch. A plain object, not the
    actor class, whose methods Ray wraps (tracing hooks) on every call."""

    def __init__(self, inst: StackInstance) -> None:
        self.inst = inst

    def dp_batch(self, owner: str, data: memoryview, offsets: list[int], snapshot_keys: list[Key]) -> channel.Reply:
        """Apply a client's frames (at `offsets` of `data`, read in place); the REPLY."""
        inst = self.inst
        if inst._handing_over:
            with inst._hand_over_done:
                inst._hand_over_done.wait_for(lambda: not inst._handing_over)
        with inst._lock:
            out, refused = inst.backend.process(data, offsets, time.time(), owner, snapshot_keys)
            inst.metrics.batch()
            if inst.relays:  # (a container: the batch crossed its socket once more)
                inst.payload_copies += len(offsets)
            snaps = inst.backend.take_snapshots() if inst.backend.snapshots_waiting() else {}
        return channel.Reply(
            0,
            out,
            [channel.Refusal(*r) for r in refused] if refused else [],
            [channel.Snapshot(k, st, blob) for k, (st, blob) in snaps.items()],
        )

    def dp_restore(self, owner: str, msg: channel.Restore) -> str:
        """A client restores a session held here for it, from its custody ("" when done)."""
        inst = self.inst
        with inst._lock:
            try:
                inst.backend.restore_pending(
                    msg.key, owner, msg.epoch, msg.snapshot, msg.config, msg.emit_events, time.time()
                )
            except InstanceFailed:
                raise
            except Exception as e:
                return f"{type(e).__name__}: {e}"
            out = inst.backend.collect()
        inst._send(out)
        inst._tell_restored(msg.key)
        return ""


def _zero_copy(data: Any) -> bool:
    """A read-only numpy view is the object store's buffer itself (Ray's zero-copy read)."""
    flags = getattr(data, "flags", None)
    return flags is not None and not flags.writeable and not flags.owndata


def instance_actor_name(instance_id: str) -> str:
    return f"apsv-instance-{instance_id}"


def create_instance(
    instance_id: str,
    protocol: str,
    backend: str,
    allocation: Allocation,
    *,
    deployment: str,
    snapshot_every: int = 256,
    resources: Mapping[str, float] | None = None,
    image: str | None = None,
    namespace: str | None = None,
) -> Any:
    """Start a stack instance actor with the allocation's resources (CPU, memory).

    Detached: an instance must outlive the VPSM that started it (a VPSM that restarts finds its
    instances again by name), so whoever starts one also stops it (`VPSM.shutdown`)."""
    # load and readiness in a group of their own, beside the data path; hand-overs in another,
    # and adoptions in a third (two instances handing over to each other must not deadlock)
    cls = ray.remote(concurrency_groups={"control": 1, "moves": 1, "adopt": 1})(StackInstance)  # type: ignore[call-overload]
    opts: dict[str, Any] = {
        "name": instance_actor_name(instance_id),
        "num_cpus": allocation.cpu,
        "memory": allocation.memory_bytes,
        "max_restarts": 0,  # a dead instance's sessions are restored elsewhere from their clients' custody
        "max_concurrency": 1,  # the Ray-called data path and control calls, in call order
        "lifetime": "detached",
    }
    if namespace:
        opts["namespace"] = namespace
    if resources:
        opts["resources"] = dict(resources)
    # over the nodes that can take it (those of its role): a host lost takes fewer sessions with it
    opts["scheduling_strategy"] = "SPREAD"
    return cls.options(**opts).remote(
        instance_id, protocol, backend, allocation, snapshot_every, image, deployment, namespace
    )

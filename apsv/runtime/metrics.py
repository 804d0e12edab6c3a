"""Ray metrics of APSV's processes - stack instances, the multiplexer, offload clients - for the
dashboard and Grafana: they go through `ray.util.metrics`, which Ray exports on each node's
metrics endpoint (Prometheus format, names prefixed ``ray_``). The names are documented in
docs/telemetry.md; the Parquet rows are `apsv.runtime.telemetry`'s.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0]


def start_at_zero(counter: Any, tags: Mapping[str, str] | None = None) -> None:
    """Put a counter's series on the endpoint at 0 before its first event (Prometheus'
    convention: a rate over "no data" is no data, over 0 it is 0). Ray's `Counter.inc` refuses
    0, so the value goes through the metric's own record call, which `inc` ends in."""
    record = getattr(counter, "_record", None)
    if record is not None:
        record(0, tags=dict(tags) if tags else None)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    idx = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[idx]


class InstanceMetrics:
    """Ray metrics of one stack instance (created in the actor's process)."""

    def __init__(self, instance_id: str, protocol: str, backend: str) -> None:
        from ray.util import metrics

        # `stack_instance`, not `instance`: Prometheus gives `instance` to the scrape target
        self.tags = {"stack_instance": instance_id, "protocol": protocol, "backend": backend}
        keys = tuple(self.tags)
        self.frames = metrics.Counter("apsv_instance_frames", "Frames applied by a stack instance", tag_keys=keys)
        self.batches = metrics.Counter("apsv_instance_batches", "Batches applied by a stack instance", tag_keys=keys)
        self.sessions = metrics.Gauge("apsv_instance_sessions", "Sessions hosted by a stack instance", tag_keys=keys)
        self.rss = metrics.Gauge("apsv_instance_rss_bytes", "Resident memory of a stack instance", tag_keys=keys)
        self.cpu = metrics.Gauge("apsv_instance_cpu_seconds", "CPU time used by a stack instance", tag_keys=keys)
        self.latency = metrics.Histogram(
            "apsv_message_latency_ms",
            "Agent receive to applied by the stack, per message",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=keys,
        )
        self.queued = metrics.Gauge(
            "apsv_instance_queue_frames", "Frames of batches a stack instance has read and not yet applied", keys
        )
        self.quota = metrics.Gauge(
            "apsv_buffer_quota_bytes", "Payload octets one client may have in flight to a stack instance", keys
        )
        self._batches = 0
        self._applied = 0
        start_at_zero(self.frames, self.tags)
        start_at_zero(self.batches, self.tags)

    def batch(self) -> None:
        """Counted here, handed to Ray with the next `usage` (the control loop's poll): a Ray
        metric call costs microseconds, a batch may be a few frames."""
        self._batches += 1

    def _flush_counts(self, applied: int) -> None:
        if self._batches:
            self.batches.inc(self._batches, self.tags)
            self._batches = 0
        if applied > self._applied:  # frames applied (not those refused or repeated)
            self.frames.inc(applied - self._applied, self.tags)
            self._applied = applied

    def queue(self, frames: int, quota_bytes: int) -> None:
        """Frames of batches read and not yet applied (its queue), and each client's window."""
        self.queued.set(float(frames), self.tags)
        self.quota.set(float(quota_bytes), self.tags)

    def usage(self, usage: Mapping[str, float], load: Mapping[str, Any]) -> None:
        self._flush_counts(int(load.get("applied", 0)))
        self.rss.set(usage.get("rss_bytes", 0.0), self.tags)
        self.cpu.set(usage.get("cpu_seconds", 0.0), self.tags)
        self.sessions.set(float(load.get("sessions", 0)), self.tags)

    def observe_latencies(self, latencies_ns: list[int]) -> None:
        for ns in latencies_ns[:4096]:
            self.latency.observe(ns / 1e6, self.tags)


# -- the multiplexer's and the clients' metrics -----------------------------------------------
# Counted in plain dicts on the data path (per batch, never per frame) and handed to Ray at most
# once a second: a Ray metric call costs microseconds, a batch carries thousands of frames, and
# Ray's agent only exports every few seconds anyway.

BATCH_LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 5000.0]
MAX_VROUTER_LABELS = 100  # virtual routers with a label of their own (per client); the rest count as "other"
MAX_FOLDED_TRACKED = 100_000  # distinct folded virtual routers remembered (to count each once)
MAX_BATCH_SAMPLES = 256  # batch latencies observed per export (a uniform sample of the batches)
OTHER_VROUTER = "other"
MOVE_REASONS = ("rebalance", "drain", "manual", "recovery")


class MultiplexerMetrics:
    """Ray metrics of the multiplexer (created in its actor process): ``apsv_session_moves``
    {protocol, reason} - live session moves (rebalance, drain, manual) and sessions placed again
    after their instance died (recovery)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.moves = metrics.Counter(
            "apsv_session_moves", "Sessions moved live or recovered", tag_keys=("protocol", "reason")
        )
        self._protocols: set[str] = set()

    def protocol_known(self, protocol: str) -> None:
        """A protocol's move counters at 0 (its first instance registered)."""
        if protocol not in self._protocols:
            self._protocols.add(protocol)
            for reason in MOVE_REASONS:
                start_at_zero(self.moves, {"protocol": protocol, "reason": reason})

    def moved(self, protocol: str, reason: str, n: int = 1) -> None:
        if n:
            self.moves.inc(n, {"protocol": protocol, "reason": reason})

    def instance_gone(self, instance: str, protocol: str) -> None:
        """(Per-instance gauges are the instances' own; nothing of the instance is kept here.)"""


class ClientMetrics:
    """An offload client's metrics, exported from its own process at most once a second:

    * ``apsv_client_buffers_in_use`` / ``apsv_client_buffers`` {client}: pool slots holding frames
      not yet answered, and the slot count. `client` is the label its owner gives (stable across
      restarts: "agent", "apsv-replay", ...), so restarts do not multiply series;
    * ``apsv_messages`` {protocol, vrouter}: frames sent, by protocol and virtual router
      ("tenant/vrouter"). Only the first `max_vrouters` virtual routers get a label - labels never
      change afterwards, so series do not churn - and the rest are summed under vrouter="other";
      ``apsv_vrouters_folded`` counts the virtual routers folded so;
    * ``apsv_client_batches`` and ``apsv_client_batch_latency_ms``: batches sent to instances and
      their round trip (send to reply), sampled.
    """

    def __init__(self, client: str, slots: int, max_vrouters: int = MAX_VROUTER_LABELS, seed: int = 0) -> None:
        from ray.util import metrics

        self.tags = {"client": client}
        self.in_use = metrics.Gauge(
            "apsv_client_buffers_in_use", "Buffer pool slots of an offload client in use", ("client",)
        )
        self.total = metrics.Gauge("apsv_client_buffers", "Buffer pool slots of an offload client", ("client",))
        self.messages_total = metrics.Counter(
            "apsv_messages", "Frames sent into the cluster", tag_keys=("protocol", "vrouter")
        )
        self.folded = metrics.Counter(
            "apsv_vrouters_folded", 'Virtual routers counted under vrouter="other" (beyond the label limit)'
        )
        self.batches = metrics.Counter("apsv_client_batches", "Batches sent to stack instances")
        self.batch_latency = metrics.Histogram(
            "apsv_client_batch_latency_ms",
            "A batch's round trip, client to instance and back (sampled)",
            boundaries=BATCH_LATENCY_BOUNDARIES_MS,
        )
        self.slots = slots
        self.total.set(float(slots), self.tags)
        start_at_zero(self.folded)
        start_at_zero(self.batches)
        self.max_vrouters = max_vrouters
        self._last = 0.0
        self._peak = 0
        self._sent: dict[tuple[int, int, int, int], int] = {}  # frames per session at the last export
        self._labels: dict[tuple[int, int], str] = {}
        self._folded: set[tuple[int, int]] = set()
        self._rng = random.Random(seed)
        self._batches_seen = 0
        self._exported_batches = 0

    def sample(self, in_use: int, now: float, force: bool = False) -> None:
        """Record pool use; exported as the peak since the last export, once a second (or `force`).
        Both gauges are set on every export: Ray drops a gauge not set for about 25 s, and an
        idle client's pool is still there."""
        self._peak = max(self._peak, in_use)
        if force or now - self._last >= 1.0:
            self.in_use.set(float(self._peak), self.tags)
            self.total.set(float(self.slots), self.tags)
            self._peak = in_use
            self._last = now

    def vrouter_label(self, tenant: int, vrouter: int) -> str:
        k = (tenant, vrouter)
        label = self._labels.get(k)
        if label is not None:
            return label
        if len(self._labels) < self.max_vrouters:
            label = self._labels[k] = f"{tenant}/{vrouter}"
            return label
        if k not in self._folded and len(self._folded) < MAX_FOLDED_TRACKED:
            self._folded.add(k)
            self.folded.inc(1)
        return OTHER_VROUTER

    def messages(self, seqs: Mapping[tuple[int, int, int, int], int], names: Mapping[int, str]) -> None:
        """Frames sent per session so far (their sequence numbers): what is new since the last
        call, counted by protocol (`names`: protocol id -> name) and virtual router."""
        by_label: dict[tuple[str, str], int] = {}
        sent = self._sent
        for key, seq in seqs.items():
            n = seq - sent.get(key, 0)
            if n > 0:
                sent[key] = seq
                k = (names.get(key[2], str(key[2])), self.vrouter_label(key[0], key[1]))
                by_label[k] = by_label.get(k, 0) + n
        for (protocol, label), n in by_label.items():
            self.messages_total.inc(n, {"protocol": protocol, "vrouter": label})

    def batch_times(self, latencies: list[float], total: int) -> None:
        """Batches sent so far (`total`) and the round trips recorded since the last call."""
        if total > self._exported_batches:
            self.batches.inc(total - self._exported_batches)
            self._exported_batches = total
        pick = latencies if len(latencies) <= MAX_BATCH_SAMPLES else self._rng.sample(latencies, MAX_BATCH_SAMPLES)
        for sec in pick:
            self.batch_latency.observe(sec * 1e3)

"""Telemetry: per-instance rows to Parquet, and Ray metrics for the dashboard.

Rows follow `INSTANCE_SCHEMA` (documented in docs/telemetry.md) and are written by the VPSM,
which polls every instance each control interval, under ``<root>/hour=YYYY-MM-DDTHH/`` so a
reader (the forecaster's retraining job) can take the last N hours by directory. Metrics go
through `ray.util.metrics`, which Ray exports on each node's metrics endpoint (Prometheus
format, names prefixed ``ray_``) - the endpoint the Ray dashboard and Grafana read.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LATENCY_BOUNDARIES_MS = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0]

INSTANCE_SCHEMA = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("sessions", pa.int64(), nullable=False),
        pa.field("cpu_seconds", pa.float64(), nullable=False),  # cumulative, process or container
        pa.field("cpu_percent", pa.float64(), nullable=False),  # over the last interval, 100 = one core
        pa.field("rss_bytes", pa.int64(), nullable=False),
        pa.field("frames_in", pa.int64(), nullable=False),  # cumulative
        pa.field("frames_out", pa.int64(), nullable=False),
        pa.field("msgs_per_s", pa.float64(), nullable=False),  # inbound frames over the last interval
        pa.field("queue_depth", pa.int64(), nullable=False),  # frames sent to it, not yet applied
        pa.field("latency_p50_ms", pa.float64(), nullable=True),  # agent receive -> applied, this interval
        pa.field("latency_p99_ms", pa.float64(), nullable=True),
        pa.field("latency_max_ms", pa.float64(), nullable=True),
        pa.field("duplicates", pa.int64(), nullable=False),
        pa.field("errors", pa.int64(), nullable=False),
        pa.field("alloc_cpu", pa.float64(), nullable=False),
        pa.field("alloc_memory_bytes", pa.int64(), nullable=False),
    ]
)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    idx = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[idx]


class TelemetryWriter:
    """Buffers rows and writes hour-partitioned Parquet files. Bounded: flushes at `max_rows`."""

    def __init__(self, root: str | Path, max_rows: int = 10_000) -> None:
        self.root = Path(root)
        self.max_rows = max_rows
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.files_written = 0
        self.rows_written = 0

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            self._rows.extend(dict(r) for r in rows)
            full = len(self._rows) >= self.max_rows
        if full:
            self.flush()

    def flush(self) -> list[Path]:
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return []
        by_hour: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_hour.setdefault(r["ts"].strftime("%Y-%m-%dT%H"), []).append(r)
        written = []
        for hour, part in by_hour.items():
            d = self.root / f"hour={hour}"
            d.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist(part, schema=INSTANCE_SCHEMA)
            path = d / f"part-{time.time_ns()}-{os.getpid()}.parquet"
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp)
            tmp.rename(path)  # readers never see half a file
            written.append(path)
            self.files_written += 1
            self.rows_written += len(part)
        return written


def read_telemetry(root: str | Path, hours: int | None = None) -> pa.Table:
    """All rows under `root` (the last `hours` hour partitions if given)."""
    root = Path(root)
    parts = sorted(p for p in root.glob("hour=*") if p.is_dir())
    if hours is not None:
        parts = parts[-hours:]
    files = [f for p in parts for f in sorted(p.glob("*.parquet"))]
    if not files:
        return INSTANCE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=INSTANCE_SCHEMA) for f in files])


def now_utc() -> datetime:
    return datetime.now(UTC)


class InstanceMetrics:
    """Ray metrics of one stack instance (created in the actor's process)."""

    def __init__(self, instance_id: str, protocol: str, backend: str) -> None:
        from ray.util import metrics

        self.tags = {"instance": instance_id, "protocol": protocol, "backend": backend}
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

    def batch(self, frames: int, seconds: float) -> None:
        self.batches.inc(1, self.tags)
        if frames:
            self.frames.inc(frames, self.tags)

    def usage(self, usage: Mapping[str, float], load: Mapping[str, Any]) -> None:
        self.rss.set(usage.get("rss_bytes", 0.0), self.tags)
        self.cpu.set(usage.get("cpu_seconds", 0.0), self.tags)
        self.sessions.set(float(load.get("sessions", 0)), self.tags)

    def observe_latencies(self, latencies_ns: list[int]) -> None:
        for ns in latencies_ns[:4096]:
            self.latency.observe(ns / 1e6, self.tags)

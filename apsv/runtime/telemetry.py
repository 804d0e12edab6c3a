"""Telemetry: per-instance rows to Parquet (the Ray metrics are `apsv.runtime.metrics`').

Rows follow `INSTANCE_SCHEMA` (documented in docs/telemetry.md) and are written by the VPSM,
which polls every instance each control interval, under ``<root>/hour=YYYY-MM-DDTHH/`` so a
reader (the forecaster's retraining job) can take the last N hours by directory. Partitions
older than the retention are removed as new ones are written: the disk it takes is bounded.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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


class TelemetryWriter:
    """Buffers rows and writes hour-partitioned Parquet files. Bounded: flushes at `max_rows`, and
    keeps the last `retention_hours` hour partitions (None: all of them)."""

    def __init__(self, root: str | Path, max_rows: int = 10_000, retention_hours: int | None = None) -> None:
        if retention_hours is not None and retention_hours < 1:
            raise ValueError("telemetry retention must be at least one hour")
        self.root = Path(root)
        self.max_rows = max_rows
        self.retention_hours = retention_hours
        self.partitions_removed = 0
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
        self.expire(now_utc())
        return written

    def expire(self, now: datetime) -> list[Path]:
        """Remove the hour partitions older than the retention (by their names: UTC hours)."""
        if self.retention_hours is None:
            return []
        oldest = (now - timedelta(hours=self.retention_hours)).strftime("%Y-%m-%dT%H")
        gone = [p for p in self.root.glob("hour=*") if p.is_dir() and p.name[len("hour=") :] < oldest]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        self.partitions_removed += len(gone)
        return gone


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

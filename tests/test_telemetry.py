"""Telemetry on disk: hour-partitioned Parquet, and the retention that bounds it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from apsv.runtime.telemetry import TelemetryWriter, read_telemetry
from tests.conftest import telemetry_row


def test_partitions_past_the_retention_are_removed_as_new_ones_are_written(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(minute=30)
    old = TelemetryWriter(tmp_path)  # no retention: every hour stays
    old.append(telemetry_row(now - timedelta(hours=h)) for h in range(10))
    old.flush()
    assert len(list(tmp_path.glob("hour=*"))) == 10
    w = TelemetryWriter(tmp_path, retention_hours=3)
    w.append([telemetry_row(now)])
    w.flush()
    # the hours within the retention stay (this one and the three before it), the rest go
    hours = sorted(p.name for p in tmp_path.glob("hour=*"))
    assert hours == [f"hour={(now - timedelta(hours=h)).strftime('%Y-%m-%dT%H')}" for h in (3, 2, 1, 0)]
    assert w.partitions_removed == 6
    assert read_telemetry(tmp_path).num_rows == 5  # 4 hours of the first writer's, 1 of the second's
    assert w.expire(now) == []  # nothing more to remove


def test_a_retention_below_an_hour_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one hour"):
        TelemetryWriter(tmp_path, retention_hours=0)

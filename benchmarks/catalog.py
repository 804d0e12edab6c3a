"""The repository's real load series, as the benchmarks read them (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

TS = "timeseries"


class Entry(NamedTuple):
    path: str  # under the data directory
    season: int | None  # in samples; None: the timestamps' day
    step_s: float | None  # the sampling step; None: the timestamps'
    max_gap: int | None  # missing samples interpolated across, at most; None: the reader's default


# Every series of ../shared/data/timeseries
SERIES: list[Entry] = [
    Entry(f"{TS}/cortez-internet-traffic/A5M.txt", 288, 300.0, None),
    Entry(f"{TS}/cortez-internet-traffic/A1H.txt", 24, 3600.0, None),
    Entry(f"{TS}/cortez-internet-traffic/A1D.txt", 7, 86400.0, None),
    Entry(f"{TS}/nab-cloud-metrics/Twitter_volume_AAPL.csv", None, None, None),
    Entry(f"{TS}/nab-cloud-metrics/Twitter_volume_GOOG.csv", None, None, None),
    Entry(f"{TS}/nab-cloud-metrics/cpu_utilization_asg_misconfiguration.csv", None, None, None),
    Entry(f"{TS}/nab-cloud-metrics/ec2_network_in_257a54.csv", None, None, None),
    Entry(f"{TS}/nab-cloud-metrics/ec2_request_latency_system_failure.csv", None, None, None),
    Entry(f"{TS}/nab-cloud-metrics/iio_us-east-1_i-a2eb1cd9_NetworkIn.csv", None, None, None),
    Entry(f"{TS}/prophet-wikipedia-pageviews/example_wp_log_R.csv", None, None, 31),
    Entry(f"{TS}/prophet-wikipedia-pageviews/example_wp_log_peyton_manning.csv", None, None, 31),
    Entry(f"{TS}/web-request-rates/nasa_requests_per_minute.csv", 1440, 60.0, None),
]


def shared_data() -> Path:
    env = os.environ.get("APSV_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"

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


# Held out: series never used while the policies were built or tuned, from the Numenta Anomaly
# Benchmark (github.com/numenta/NAB, read at commit ea702d7). The rule, fixed before any was run:
# every NAB real-world series that counts traffic - tweets, requests, passengers, bytes received
# or written - and is not in ../shared/data (CPU, latency, temperature, price and road series
# are not load). Paths are under a NAB checkout (`--heldout DIR`, or APSV_NAB_DATA).
NAB_COMMIT = "ea702d75cc2258d9d7dd35ca8e5e2539d71f3140"
HELDOUT: list[Entry] = [
    *(
        Entry(f"data/realTweets/Twitter_volume_{s}.csv", None, None, None)
        for s in ("AMZN", "CRM", "CVS", "FB", "IBM", "KO", "PFE", "UPS")
    ),
    Entry("data/realAWSCloudwatch/elb_request_count_8c0756.csv", None, None, None),
    Entry("data/realAWSCloudwatch/ec2_network_in_5abac7.csv", None, None, None),
    Entry("data/realAWSCloudwatch/ec2_disk_write_bytes_1ef3de.csv", None, None, None),
    Entry("data/realAWSCloudwatch/ec2_disk_write_bytes_c0d644.csv", None, None, None),
    Entry("data/realKnownCause/nyc_taxi.csv", None, None, None),
]

# A second held-out set, left unrun while a change was chosen after the first had been seen (the
# fallbacks' hedge at low trust, `predictive.hedge_below`), to judge that change on: every NAB
# series whose name says it measures CPU utilization and is not in ../shared/data.
HELDOUT_CPU: list[Entry] = [
    *(
        Entry(f"data/realAWSCloudwatch/ec2_cpu_utilization_{s}.csv", None, None, None)
        for s in ("24ae8d", "53ea38", "5f5533", "77c1ca", "825cc2", "ac20cd", "c6585a", "fe7f93")
    ),
    *(Entry(f"data/realAWSCloudwatch/rds_cpu_utilization_{s}.csv", None, None, None) for s in ("cc0c53", "e47b3b")),
]
HELDOUT_SETS = {"traffic": HELDOUT, "cpu": HELDOUT_CPU}


def nab_data() -> Path | None:
    """A NAB checkout for the held-out series (APSV_NAB_DATA), or None."""
    env = os.environ.get("APSV_NAB_DATA")
    return Path(env) if env else None


def shared_data() -> Path:
    env = os.environ.get("APSV_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"

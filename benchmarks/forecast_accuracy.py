"""Forecast accuracy over every series in ../shared/data/timeseries and MRT-derived BGP churn.

python benchmarks/forecast_accuracy.py [--steps 600] [--windows 20] [--quick] [--plots DIR]
                                        [--out benchmarks/results/forecast_accuracy.json]

Rolling-origin backtests (apsv.forecast.backtest) of seasonal naive, ETS, the LSTM and the
Transformer; relative scores are against seasonal naive measured in the same run, combined by
geometric mean over series (as the Chronos papers report). Also records training wall time.
Seasons: the sampling step's day (a week for daily data); the Cortez files and the NASA trace
carry no timestamps, so their periods are given here (5-minute: 288, hourly: 24, daily: 7,
per-minute: 1440). The Peyton Manning page views have a real 19-day hole: up to 31 missing days
are interpolated (and counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from catalog import SERIES, shared_data

from apsv.forecast.backtest import SeriesBacktest, summarize
from apsv.forecast.datasets import from_mrt
from apsv.forecast.model_backtest import default_horizon, read_series, result_json, run_backtest
from apsv.forecast.series import Series, clean

MRT = ["mrt/bgpdump-testdata/updates.20070211.0141.gz", "mrt/bgpdump-testdata/updates.20160811.1600.gz"]


def load_all(data: Path, quick: bool) -> list[Series]:
    out = [read_series(data / e.path, season=e.season, max_gap=e.max_gap) for e in SERIES]
    for m in MRT:
        # all peers together, plus the busiest peer: per-second announced + withdrawn prefixes
        for s in from_mrt(data / m, top=1):
            out.append(clean(s)[0])
    return out[:3] + out[-2:] if quick else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="five series, 100 steps")
    ap.add_argument("--plots", type=Path, default=None, help="write one PNG per series here")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "forecast_accuracy.json")
    a = ap.parse_args()
    steps = 100 if a.quick else a.steps
    series = load_all(shared_data(), a.quick)
    results: list[SeriesBacktest] = []
    t0 = time.perf_counter()
    for s in series:
        h = default_horizon(s.season)
        r = run_backtest(s, h, a.windows, steps=steps)
        results.append(r)
        row = " ".join(f"{n}={sc.relative_mase:.3f}" for n, sc in r.scores.items())
        print(f"{s.name:48s} n={len(s):6d} m={s.season:5d} h={h:3d}  relMASE {row}", flush=True)
        if a.plots is not None:
            from apsv.forecast.plots import plot_backtest

            plot_backtest(r, a.plots / f"{s.name.replace(':', '_')}.png")
    summary = summarize(results)
    doc: dict[str, Any] = {
        "benchmark": "forecast_accuracy",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"steps": steps, "windows": a.windows, "quantiles": [0.1, 0.5, 0.9, 0.99]},
        "models": summary,
        "series": [result_json(r) for r in results],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({"models": summary}, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()

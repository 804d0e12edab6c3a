"""What `apsv forecast backtest` and the accuracy benchmark share: reading any supported file into
series, choosing defaults, building the four models, and the JSON shape of a result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apsv.forecast.backtest import SeriesBacktest, backtest_series
from apsv.forecast.baselines import ExponentialSmoothing, Forecaster, SeasonalNaive
from apsv.forecast.datasets import from_mrt, load_file
from apsv.forecast.neural import NeuralForecaster, TrainConfig
from apsv.forecast.series import Series, clean

MODEL_NAMES = ("seasonal_naive", "ets", "lstm", "transformer")
_MRT_SUFFIXES = (".gz", ".bz2", ".mrt", ".dump")


def is_mrt(path: Path) -> bool:
    if path.name.endswith(_MRT_SUFFIXES):
        return True
    head = path.read_bytes()[:64]
    return b"\x00" in head  # MRT headers carry zero octets; text series never do


def read_series(
    path: str | Path, column: str | None = None, season: int | None = None, *, max_gap: int | None = None
) -> Series:
    """A cleaned series from a CSV / one-value-per-line file, or from an MRT update dump (all
    peers' announced+withdrawn prefixes per second; `column` may be `prefixes` or `updates`)."""
    p = Path(path)
    if p.is_file() and is_mrt(p):
        s = from_mrt(p, measure=column or "prefixes", per_peer=False)[0]
        if season:
            s = Series(s.name, s.values, s.step, s.start, season, s.meta)
    else:
        s = load_file(p, column, season=season)
    return clean(s, max_gap=max_gap)[0]


def default_horizon(season: int) -> int:
    """A day ahead for hourly data (24), two hours for 5-minute data, a week for daily data;
    10 steps for series without a season."""
    if season <= 1:
        return 10
    return min(season, 24)


def make_models(
    horizon: int, names: tuple[str, ...] = MODEL_NAMES, *, steps: int = 600, seed: int = 0
) -> list[Forecaster]:
    train = TrainConfig(steps=steps, seed=seed)
    table: dict[str, Forecaster] = {
        "seasonal_naive": SeasonalNaive(),
        "ets": ExponentialSmoothing(),
        "lstm": NeuralForecaster("lstm", horizon, train=train),
        "transformer": NeuralForecaster("transformer", horizon, train=train),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
    if "seasonal_naive" not in names:
        names = ("seasonal_naive", *names)  # relative scores need the baseline
    return [table[n] for n in names]


def run_backtest(
    series: Series, horizon: int, windows: int, names: tuple[str, ...] = MODEL_NAMES, *, steps: int = 600
) -> SeriesBacktest:
    return backtest_series(series, make_models(horizon, names, steps=steps), horizon, windows)


def result_json(r: SeriesBacktest) -> dict[str, Any]:
    return {
        "series": r.series,
        "length": r.length,
        "season": r.season,
        "horizon": r.horizon,
        "windows": len(r.origins),
        "models": {name: s.to_json() for name, s in r.scores.items()},
    }

"""A load time series and the explicit rules for cleaning it.

Everything the forecaster trains on or predicts from passes through `clean()`: it refuses what
cannot be forecast (empty, too short, mostly missing, negative load) with a `SeriesError` that says
what and where, and repairs what can be repaired (short gaps) while counting what it did, so a
backtest table can show how much of a series was filled in rather than observed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Seasonal period (in steps) implied by a sampling step: one day for sub-daily data, a week for daily.
_SEASON_BY_STEP = [(1.0, 60), (60.0, 1440), (300.0, 288), (900.0, 96), (3600.0, 24), (86400.0, 7)]


class SeriesError(ValueError):
    """A series that cannot be used as given; the message names the series and the problem."""


@dataclass(frozen=True)
class Series:
    """One univariate series sampled on a regular grid.

    `start` and `step` (seconds) place the samples in time when the source has timestamps (they feed
    the calendar covariates); without them the series is just a sequence and `season` carries its
    periodicity.
    """

    name: str
    values: FloatArray
    step: float | None = None
    start: float | None = None  # unix seconds of values[0]
    season: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def head(self, n: int) -> Series:
        return replace(self, values=self.values[:n])

    def timestamps(self) -> FloatArray | None:
        if self.start is None or self.step is None:
            return None
        return self.start + self.step * np.arange(len(self), dtype=np.float64)


def default_season(step: float | None) -> int:
    """The daily (weekly for daily data) period for a sampling step; 1 when unknown."""
    if step is None:
        return 1
    for s, season in _SEASON_BY_STEP:
        if abs(step - s) <= 0.01 * s:
            return season
    if step < 86400:
        return max(1, round(86400 / step))
    return 1


@dataclass(frozen=True)
class CleanReport:
    filled: int  # missing points filled by interpolation


def clean(
    series: Series,
    *,
    max_gap: int | None = None,
    max_missing_fraction: float = 0.2,
    allow_negative: bool = False,
    min_length: int = 2,
) -> tuple[Series, CleanReport]:
    """Validate and repair a series; raises SeriesError when it cannot be used.

    - empty / shorter than `min_length` -> error;
    - non-finite values (NaN, inf) are missing; more than `max_missing_fraction` missing -> error;
      a run of missing points longer than `max_gap` (default: one season, at least 12) -> error
      naming where it starts; shorter runs are linearly interpolated (edges take the nearest value);
    - negative values -> error (load cannot be negative) unless `allow_negative`.
    """
    v = np.asarray(series.values, dtype=np.float64)
    name = series.name
    if v.ndim != 1:
        raise SeriesError(f"{name}: expected one value per step, got an array of shape {v.shape}")
    if v.size == 0:
        raise SeriesError(f"{name}: the series is empty")
    if v.size < min_length:
        raise SeriesError(f"{name}: {v.size} values, at least {min_length} needed")
    missing = ~np.isfinite(v)
    n_missing = int(missing.sum())
    if n_missing == v.size:
        raise SeriesError(f"{name}: every value is missing (NaN or infinite)")
    if n_missing > max_missing_fraction * v.size:
        raise SeriesError(
            f"{name}: {n_missing} of {v.size} values are missing (NaN or infinite), "
            f"more than {max_missing_fraction:.0%}"
        )
    gap_limit = max_gap if max_gap is not None else max(12, series.season)
    if n_missing:
        idx = np.flatnonzero(missing)
        # runs of consecutive missing indices
        breaks = np.flatnonzero(np.diff(idx) != 1)
        starts = np.concatenate([[idx[0]], idx[breaks + 1]])
        ends = np.concatenate([idx[breaks], [idx[-1]]])
        longest = int(np.argmax(ends - starts))
        if ends[longest] - starts[longest] + 1 > gap_limit:
            raise SeriesError(
                f"{name}: {ends[longest] - starts[longest] + 1} consecutive missing values from index "
                f"{starts[longest]}, more than the {gap_limit} that may be interpolated"
            )
        ok = np.flatnonzero(~missing)
        v = v.copy()
        v[missing] = np.interp(idx, ok, v[ok])
    neg = v < 0
    if neg.any() and not allow_negative:
        first = int(np.flatnonzero(neg)[0])
        raise SeriesError(
            f"{name}: {int(neg.sum())} negative values (first at index {first}: {v[first]!r}); "
            "a load series cannot be negative"
        )
    return replace(series, values=v), CleanReport(filled=n_missing)


def regularize(times: FloatArray, values: FloatArray, step: float | None = None) -> tuple[FloatArray, float, float]:
    """Put timestamped samples on a regular grid: the step is the commonest spacing unless given,
    missing grid points become NaN (for `clean` to judge), duplicates keep the last sample."""
    if times.size == 0:
        return np.zeros(0), step or 1.0, 0.0
    order = np.argsort(times, kind="stable")
    t = times[order]
    v = values[order]
    if step is None:
        d = np.diff(t)
        d = d[d > 0]
        if d.size:
            vals, counts = np.unique(d, return_counts=True)
            step = float(vals[int(np.argmax(counts))])  # ties: the smallest spacing
        else:
            step = 1.0
    start = float(t[0])
    slots = np.rint((t - start) / step).astype(np.int64)
    grid = np.full(int(slots[-1]) + 1, np.nan)
    grid[slots] = v  # later samples overwrite earlier ones in the same slot
    return grid, step, start

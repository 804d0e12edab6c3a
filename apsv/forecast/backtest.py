"""Rolling-origin backtests.

The last `windows` non-overlapping horizons of a series are the test set. Each model is fitted once
on everything before the first origin, then forecasts from every origin with the history up to
it (the data it would have had live). Scores per model: MASE (scaled by the seasonal naive
in-sample error of the training part), weighted quantile loss, p90 coverage, and both relative to
seasonal naive; over many series the relative scores are combined by geometric mean.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apsv.forecast.baselines import Forecaster
from apsv.forecast.metrics import MEDIAN, coverage, geometric_mean, pinball, seasonal_scale, wql
from apsv.forecast.series import FloatArray, Series, SeriesError


@dataclass
class ModelScore:
    mase: float
    wql: float
    p90_coverage: float
    p99_coverage: float
    relative_mase: float = float("nan")
    relative_wql: float = float("nan")
    fit_seconds: float = 0.0
    predict_seconds: float = 0.0
    fallback: bool = False  # the model could not be trained on this series: seasonal naive answered

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class SeriesBacktest:
    series: str
    length: int
    season: int
    horizon: int
    origins: list[int]
    scores: dict[str, ModelScore]
    actual: FloatArray = field(repr=False)
    forecasts: dict[str, FloatArray] = field(repr=False)  # model -> (windows, horizon, Q)


def rolling_origins(n: int, horizon: int, windows: int, min_train: int) -> list[int]:
    """Origins of the last `windows` horizons, as many as fit after `min_train` points of history."""
    fit = max(0, (n - min_train) // horizon)
    k = min(windows, fit)
    if k < 1:
        raise SeriesError(f"{n} values leave no test window of {horizon} steps after {min_train} values of history")
    return [n - horizon * (k - i) for i in range(k)]


def backtest_series(
    series: Series,
    models: Sequence[Forecaster],
    horizon: int,
    windows: int = 10,
    *,
    min_train: int | None = None,
) -> SeriesBacktest:
    season = series.season
    min_train = min_train if min_train is not None else max(2 * season + 1, 3 * horizon, 20)
    origins = rolling_origins(len(series), horizon, windows, min_train)
    train = series.head(origins[0])
    scale = seasonal_scale(train.values, season)
    actual = np.stack([series.values[o : o + horizon] for o in origins])
    histories = [series.head(o) for o in origins]
    scores: dict[str, ModelScore] = {}
    forecasts: dict[str, FloatArray] = {}
    for m in models:
        t0 = time.perf_counter()
        m.fit([train])
        t1 = time.perf_counter()
        q = m.predict(histories, horizon)
        t2 = time.perf_counter()
        forecasts[m.name] = q
        report = getattr(m, "report", None)
        scores[m.name] = ModelScore(
            mase=float(np.abs(actual - q[..., MEDIAN]).mean() / scale),
            wql=wql(actual, q),
            p90_coverage=coverage(actual, q, 0.9),
            p99_coverage=coverage(actual, q, 0.99),
            fit_seconds=t1 - t0,
            predict_seconds=t2 - t1,
            fallback=bool(report is not None and getattr(report, "skipped", None)),
        )
    base = scores.get("seasonal_naive")
    if base is not None:
        for s in scores.values():
            s.relative_mase = s.mase / base.mase if base.mase > 0 else float("nan")
            s.relative_wql = s.wql / base.wql if base.wql > 0 else float("nan")
    return SeriesBacktest(series.name, len(series), season, horizon, origins, scores, actual, forecasts)


def summarize(results: Sequence[SeriesBacktest]) -> dict[str, dict[str, float]]:
    """Per model over all series: geometric-mean relative MASE / WQL, pooled p90/p99 coverage,
    arithmetic-mean MASE and WQL, and total fit time."""
    names: list[str] = []
    for r in results:
        names.extend(n for n in r.scores if n not in names)
    out: dict[str, dict[str, float]] = {}
    for n in names:
        rs = [r for r in results if n in r.scores]
        points = [r.actual.size for r in rs]
        total = max(sum(points), 1)
        out[n] = {
            "mase": float(np.mean([r.scores[n].mase for r in rs])),
            "relative_mase": geometric_mean([r.scores[n].relative_mase for r in rs]),
            "wql": float(np.mean([r.scores[n].wql for r in rs])),
            "relative_wql": geometric_mean([r.scores[n].relative_wql for r in rs]),
            "p90_coverage": sum(r.scores[n].p90_coverage * p for r, p in zip(rs, points, strict=True)) / total,
            "p99_coverage": sum(r.scores[n].p99_coverage * p for r, p in zip(rs, points, strict=True)) / total,
            "fit_seconds": float(sum(r.scores[n].fit_seconds for r in rs)),
            "series": float(len(rs)),
        }
    return out


def holdout_score(model: Forecaster, series: Sequence[Series], holdout: int, horizon: int) -> dict[str, float]:
    """Score an already fitted model on the last `holdout` steps of each series (origins every
    `horizon` steps, history up to each origin): pooled WQL, mean MASE and p90 coverage."""
    num = 0.0
    den = 0.0
    mases: list[float] = []
    covered = 0.0
    points = 0
    for s in series:
        n = len(s)
        origins = list(range(n - holdout, n - horizon + 1, horizon))
        if not origins or origins[0] < 2:
            continue
        y = np.stack([s.values[o : o + horizon] for o in origins])
        q = model.predict([s.head(o) for o in origins], horizon)
        num += float(2 * pinball(y, q).mean())
        den += float(np.abs(y).sum())
        mases.append(float(np.abs(y - q[..., MEDIAN]).mean() / seasonal_scale(s.values[: origins[0]], s.season)))
        covered += coverage(y, q, 0.9) * y.size
        points += y.size
    if not points:
        raise SeriesError(f"no series is long enough for a hold-out of {holdout} steps with horizon {horizon}")
    return {
        "wql": num / max(den, 1e-12),
        "mase": float(np.mean(mases)),
        "p90_coverage": covered / points,
        "points": float(points),
    }

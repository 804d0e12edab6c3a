"""Forecast accuracy measures (pure numpy).

- MASE: mean absolute error of the median forecast, scaled by the in-sample mean absolute error
  of the seasonal naive forecast on the history the forecast was made from (Hyndman & Koehler).
- WQL: weighted quantile loss, 2 * sum of pinball losses / sum |y|, averaged over quantile levels.
- Aggregation over series: the geometric mean of each model's score relative to seasonal naive,
  as the Chronos papers report (a ratio per series, so no series dominates by its scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apsv.forecast.series import FloatArray

QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99)
MEDIAN = QUANTILES.index(0.5)


def seasonal_scale(history: FloatArray, season: int) -> float:
    """In-sample MAE of the seasonal naive forecast (falls back to lag 1 when the history is
    shorter than two seasons); a tiny positive floor keeps constant series defined."""
    m = season if history.size > season else 1
    if history.size <= m:
        return 1e-8
    d = np.abs(history[m:] - history[:-m])
    return max(float(d.mean()), 1e-8)


def pinball(y: FloatArray, q_pred: FloatArray, levels: Sequence[float] = QUANTILES) -> FloatArray:
    """Pinball loss per quantile level: y (..., H), q_pred (..., H, Q) -> (Q,) summed over points."""
    diff = y[..., None] - q_pred
    lv = np.asarray(levels)
    loss = np.maximum(lv * diff, (lv - 1.0) * diff)
    return np.asarray(loss.reshape(-1, len(lv)).sum(axis=0), dtype=np.float64)


def wql(y: FloatArray, q_pred: FloatArray, levels: Sequence[float] = QUANTILES) -> float:
    denom = float(np.abs(y).sum())
    if denom <= 0:
        denom = 1e-8
    return float((2.0 * pinball(y, q_pred, levels) / denom).mean())


def coverage(y: FloatArray, q_pred: FloatArray, level: float, levels: Sequence[float] = QUANTILES) -> float:
    """Fraction of points at or below the forecast quantile `level`."""
    k = list(levels).index(level)
    return float((y <= q_pred[..., k]).mean())


def geometric_mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan")
    return float(np.exp(np.log(np.maximum(v, 1e-12)).mean()))

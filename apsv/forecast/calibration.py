"""The forecaster's band calibration, a split-conformal step: each quantile's distance from the
median is scaled by the factor that minimises its pinball loss on forecasts whose outcome is
known (the training hold-out; a series' recent backcasts). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from apsv.forecast.metrics import MEDIAN, QUANTILES
from apsv.forecast.series import FloatArray


def calibrate(q: FloatArray, y: FloatArray, default: FloatArray | None = None) -> FloatArray:
    """Per quantile level, the factor on its distance from the median that fits forecasts `q`
    (..., Q) to outcomes `y`; `default` (else 1) where too few points have a band."""
    med = q[..., MEDIAN]
    out = np.ones(len(QUANTILES)) if default is None else default.copy()
    for k, level in enumerate(QUANTILES):
        if k == MEDIAN:
            continue
        d = q[..., k] - med
        ok = np.abs(d) > 1e-9
        if ok.sum() < 10:
            continue
        r = ((y - med)[ok]) / d[ok]
        # The factor s that minimises the pinball loss of med + s (q - med) at this level:
        # the level's quantile of r (upper; lower, d < 0: 1 - level's) weighted by |d|. Unweighted,
        # points with a near-zero band (an intermittent series' quiet windows) would dominate,
        # and their rare bursts set a factor that inflates the band everywhere else.
        s = _weighted_quantile(r, np.abs(d[ok]), level if k > MEDIAN else 1.0 - level)
        out[k] = float(np.clip(s, 0.0, 8.0))  # 0: the band collapses onto the median (zero-inflated series)
    return out


def _weighted_quantile(values: FloatArray, weights: FloatArray, level: float) -> float:
    """The smallest value whose cumulative weight reaches `level` of the total."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    i = int(np.searchsorted(cum, level * cum[-1], side="left"))
    return float(values[order][min(i, values.size - 1)])


def blend_factors(global_factors: FloatArray, series_factors: FloatArray) -> FloatArray:
    """Per-series band factors from a few backcasts are noisy: take the wider of the series'
    and the global (hold-out) factor, so a series that has been more erratic than the hold-out
    widens its band and a calm one keeps the calibrated width; at most twice as wide, because a
    single burst among the backcasts (zero-inflated BGP churn) would otherwise blow the upper
    quantiles up for everything after it."""
    return np.clip(series_factors, global_factors, 2.0 * global_factors)


def apply_calibration(q: FloatArray, factors: FloatArray) -> FloatArray:
    """`q` with each quantile's distance from the median scaled by its factor, kept ordered."""
    med = q[..., MEDIAN : MEDIAN + 1]
    out = med + (q - med) * factors
    # keep the quantiles ordered after per-level scaling
    upper = np.maximum.accumulate(out[..., MEDIAN:], axis=-1)
    lower = np.minimum.accumulate(out[..., : MEDIAN + 1][..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([lower[..., :MEDIAN], upper], axis=-1)

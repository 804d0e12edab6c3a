"""Baseline forecasters: seasonal naive and exponential smoothing (statsmodels Holt-Winters).

Every forecaster answers `predict(histories, horizon) -> (n, horizon, len(QUANTILES))`, the same
shape as the neural models, so backtests, serving and the VPSM treat them alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from apsv.forecast.metrics import QUANTILES
from apsv.forecast.series import FloatArray, Series

# Quantile offsets come from the last this-many in-sample errors: recent behaviour, bounded cost.
_ERROR_WINDOW = 2000


class Forecaster(Protocol):
    name: str

    def fit(self, train: Sequence[Series]) -> object: ...  # what it returns is a report, if anything

    def predict(self, histories: Sequence[Series], horizon: int) -> FloatArray: ...


def _floor_nonnegative(history: FloatArray, q: FloatArray) -> FloatArray:
    # A load that has never been negative will not become negative: clip, do not shift.
    return np.maximum(q, 0.0) if history.size and float(history.min()) >= 0 else q


def seasonal_naive_quantiles(history: FloatArray, season: int, horizon: int) -> FloatArray:
    """(horizon, Q): the last season repeated as the median, with the empirical quantiles of the
    in-sample seasonal errors (widened by sqrt(k) for the k-th season ahead) as the band."""
    q: FloatArray = seasonal_naive_rows(np.asarray(history, dtype=np.float64)[None, :], season, horizon)[0]
    return q


def seasonal_naive_rows(values: FloatArray, season: int, horizon: int) -> FloatArray:
    """(n, horizon, Q): `seasonal_naive_quantiles` of each row of an (n, T) array of histories of
    one length, computed for all rows at once (a serving request's thousand series); each row's
    band from its own errors, each row floored at 0 where it has never been negative."""
    v = np.asarray(values, dtype=np.float64)
    n, length = v.shape
    if length == 0:
        raise ValueError("seasonal naive needs at least one value")
    m = season if length > season else 1
    steps = np.arange(horizon)
    base = v[:, length - m + (steps % m)]
    errs = (v[:, m:] - v[:, :-m])[:, -_ERROR_WINDOW:] if length > m else np.zeros((n, 1))
    qs = np.quantile(errs, QUANTILES, axis=1).T  # (n, Q)
    offs = qs - np.quantile(errs, 0.5, axis=1)[:, None]
    k = np.sqrt(steps // m + 1.0)
    q = base[:, :, None] + k[None, :, None] * offs[:, None, :]
    nonneg = v.min(axis=1) >= 0
    q[nonneg] = np.maximum(q[nonneg], 0.0)
    return np.asarray(q, dtype=np.float64)


class SeasonalNaive:
    name = "seasonal_naive"

    def fit(self, train: Sequence[Series]) -> None:
        return None

    def predict(self, histories: Sequence[Series], horizon: int) -> FloatArray:
        return np.stack([seasonal_naive_quantiles(h.values, h.season, horizon) for h in histories])


class ExponentialSmoothing:
    """Additive-error exponential smoothing (statsmodels ETSModel, state space), per series.

    `fit` estimates each training series' parameters by maximum likelihood: ETS(A,N,A), additive
    seasonality when two seasons are there, no trend (on these load series a damped trend won on
    AIC yet extrapolated day-long swings and forecast far worse, e.g. 3.9x seasonal naive's MASE
    on Cortez A1H against 1.4x without trend);
    `predict` re-runs the filter with those parameters over the given history (no re-optimisation
    per origin). Data are divided by their mean level first: the optimiser is not scale-free.
    """

    name = "ets"

    def __init__(self, max_history: int = 10_000) -> None:
        self.max_history = max_history
        self.fitted: dict[str, tuple[dict[str, Any], FloatArray]] = {}

    def _tail(self, s: Series) -> FloatArray:
        return s.values[-max(self.max_history, 3 * s.season) :]

    @staticmethod
    def _spec(y: FloatArray, season: int, trend: bool) -> dict[str, Any]:
        seasonal = season > 1 and y.size >= 2 * season + 10
        spec: dict[str, Any] = {"error": "add", "trend": "add" if trend else None, "damped_trend": trend}
        if seasonal:
            spec.update(seasonal="add", seasonal_periods=season)
            if season > 168:
                # estimating hundreds of initial seasonal states by MLE takes minutes: use the
                # classical decomposition start instead
                spec["initialization_method"] = "heuristic"
        return spec

    def _fit_one(self, y: FloatArray, season: int) -> tuple[dict[str, Any], FloatArray]:
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        best: tuple[float, dict[str, Any], FloatArray] | None = None
        for trend in (False,):
            spec = self._spec(y, season, trend)
            res = ETSModel(y, **spec).fit(disp=False)
            aic = float(res.aic)
            if best is None or (np.isfinite(aic) and aic < best[0]):
                best = (aic, spec, np.asarray(res.params, dtype=np.float64))
        assert best is not None
        return best[1], best[2]

    def fit(self, train: Sequence[Series]) -> None:
        for s in train:
            y = self._tail(s)
            if y.size < 10:
                continue
            level = max(float(np.abs(y).mean()), 1e-12)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    self.fitted[s.name] = self._fit_one(y / level, s.season)
                except (ValueError, np.linalg.LinAlgError):
                    continue

    def predict(self, histories: Sequence[Series], horizon: int) -> FloatArray:
        return np.stack([self._predict_one(h, horizon) for h in histories])

    def _predict_one(self, s: Series, horizon: int) -> FloatArray:
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        y = self._tail(s)
        if y.size < 10:
            return seasonal_naive_quantiles(s.values, s.season, horizon)
        level = max(float(np.abs(y).mean()), 1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                spec, params = self.fitted.get(s.name) or self._fit_one(y / level, s.season)
                if spec.get("seasonal_periods") and y.size < 2 * s.season + 10:
                    spec, params = self._fit_one(y / level, s.season)
                res = ETSModel(y / level, **spec).smooth(params)
                mean = np.asarray(res.forecast(horizon), dtype=np.float64) * level
                resid = np.asarray(res.resid, dtype=np.float64)[-_ERROR_WINDOW:] * level
                alpha = float(params[0])
            except (ValueError, IndexError, np.linalg.LinAlgError):
                return seasonal_naive_quantiles(s.values, s.season, horizon)
        if not np.all(np.isfinite(mean)):
            return seasonal_naive_quantiles(s.values, s.season, horizon)
        resid = resid[np.isfinite(resid)]
        if resid.size == 0:
            resid = np.zeros(1)
        offs = np.quantile(resid, QUANTILES) - np.quantile(resid, 0.5)
        # Variance of an h-step error under simple exponential smoothing: sigma^2 (1 + (h-1) alpha^2).
        widen = np.sqrt(1.0 + np.arange(horizon) * alpha**2)
        q = mean[:, None] + widen[:, None] * offs[None, :]
        return _floor_nonnegative(s.values, np.asarray(q, dtype=np.float64))

"""The TPE on Ray Serve: forecasts for many series per call, model versions hot-swapped.

A request carries any number of series (`{"series": {id: [values...]}, ...}`); concurrent requests
are gathered by `@serve.batch` into one forward pass. The model comes from the registry named in
the deployment's `user_config` and is swapped in `reconfigure`. When only user_config changes
(`serve deploy` of an edited config file) Serve calls it on the running replicas in place; a
`serve.run` from Python rolls new replicas in before the old ones stop. Either way the new model
is loaded completely before one reference assignment replaces the old, so requests in flight
finish on the model they started with and none is dropped. A version that fails to load leaves
the serving one in place (a fresh replica takes the registry's promoted version instead) and is
reported in `status()`. With no usable model at all, and for series with too little history,
the answer is seasonal naive, and the response says so.

Request keys: `series` (id -> values, oldest first) or, for histories of one length, `values`
(one (n, T) array - through a handle one buffer instead of n lists, the fast path - with `ids`,
default "0".."n-1"), `season` (int, default 1, or for `series` a map id -> int), `horizon`
(default: the model's), `start`/`step` (unix seconds of the first value and the sampling step,
for calendar covariates; optional, per request).
Response keys: `model` (version or "seasonal_naive"), `horizon`, `quantiles`, `forecasts` (id ->
horizon x quantiles, as lists over HTTP, a numpy array through a handle), `fallback` (ids
answered by seasonal naive), `errors` (id -> why a series was refused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from ray import serve

from apsv.forecast.baselines import seasonal_naive_quantiles, seasonal_naive_rows
from apsv.forecast.metrics import QUANTILES
from apsv.forecast.model_error import ModelLoadError
from apsv.forecast.registry import ModelRegistry
from apsv.forecast.series import FloatArray, Series, SeriesError, clean

if TYPE_CHECKING:
    from apsv.forecast.neural import NeuralForecaster

log = logging.getLogger(__name__)

MAX_BATCH = 32  # requests per forward pass; max_ongoing_requests must be at least this
MAX_SERIES_PER_REQUEST = 100_000
MAX_HISTORY = 10_000  # values kept per series (the model reads its context from the tail)
DEFAULT_HORIZON = 12


class RequestError(ValueError):
    """A request the service refuses as a whole (not a series it can answer with a fallback)."""


def parse_array_request(payload: Mapping[str, Any]) -> tuple[list[str], FloatArray, dict[str, str], int | None, int]:
    """(ids, (n, T) histories, per-id errors, horizon, season) from a `values` request; rows
    with a value that is not finite or negative are refused by id (as `series` requests' are)."""
    try:
        values = np.asarray(payload["values"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RequestError(f"values: expected an (n, T) array of numbers: {e}") from None
    if values.ndim != 2 or values.shape[1] == 0:
        raise RequestError(f"values: expected an (n, T) array with T >= 1, got shape {values.shape}")
    if values.shape[0] > MAX_SERIES_PER_REQUEST:
        raise RequestError(f"{values.shape[0]} series in one request, at most {MAX_SERIES_PER_REQUEST}")
    ids = [str(i) for i in payload.get("ids", range(values.shape[0]))]
    if len(ids) != values.shape[0]:
        raise RequestError(f"ids: {len(ids)} ids for {values.shape[0]} rows of values")
    season = payload.get("season", 1)
    if not isinstance(season, int) or season < 1:
        raise RequestError(f"season must be a positive integer for a values request, not {season!r}")
    horizon = payload.get("horizon")
    if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
        raise RequestError(f"horizon must be a positive integer, not {horizon!r}")
    values = values[:, -MAX_HISTORY:]  # (a request's `start` moves with the cut: see predict_values)
    finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(values).all(axis=1))
    lows = values.min(axis=1) if finite.all() else np.where(finite[:, None], values, 0.0).min(axis=1)
    usable: npt.NDArray[np.bool_] = finite & (lows >= 0)
    errors = {
        ids[i]: f"{ids[i]}: a value is {'not finite' if not finite[i] else 'negative'}" for i in np.flatnonzero(~usable)
    }
    if errors:
        values = values[usable]
        ids = [ids[i] for i in np.flatnonzero(usable)]
    return ids, values, errors, horizon, season


def parse_request(payload: Mapping[str, Any]) -> tuple[list[str], list[Series], dict[str, str], int | None]:
    """(ids, cleaned series, per-id errors, horizon) from a request payload."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("series"), Mapping):
        raise RequestError(
            "the request must be an object with a 'series' map of id -> list of values, or a 'values' array"
        )
    series_map: Mapping[str, Any] = payload["series"]
    if len(series_map) > MAX_SERIES_PER_REQUEST:
        raise RequestError(f"{len(series_map)} series in one request, at most {MAX_SERIES_PER_REQUEST}")
    horizon = payload.get("horizon")
    if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
        raise RequestError(f"horizon must be a positive integer, not {horizon!r}")
    season = payload.get("season", 1)
    start, step = payload.get("start"), payload.get("step")
    ids: list[str] = []
    out: list[Series] = []
    errors: dict[str, str] = {}
    for sid, values in series_map.items():
        m = season.get(sid, 1) if isinstance(season, Mapping) else season
        try:
            if not isinstance(m, int) or m < 1:
                raise SeriesError(f"{sid}: season must be a positive integer, not {m!r}")
            full = np.asarray(values, dtype=np.float64)
            arr = full[-MAX_HISTORY:]
            s = Series(str(sid), arr, step=step, start=start, season=m)
            # the common case (finite, non-negative, non-empty) needs none of clean()'s repairs
            if not (arr.ndim == 1 and arr.size and np.isfinite(arr).all() and arr.min() >= 0):
                s, _ = clean(s, min_length=1)
        except (SeriesError, ValueError, TypeError) as e:
            errors[str(sid)] = str(e)
            continue
        if start is not None and step is not None:
            # the history was cut to its tail: move the start with it
            s = Series(s.name, s.values, step=step, start=start + step * (full.size - len(s)), season=m)
        ids.append(str(sid))
        out.append(s)
    return ids, out, errors, horizon


class ForecastCore:
    """The replica's logic without Serve: model holder, swap, batched prediction."""

    def __init__(self) -> None:
        self.model: NeuralForecaster | None = None
        self.version = "seasonal_naive"
        self.config: dict[str, Any] = {}
        self.swaps = 0
        self.swap_errors: list[str] = []
        self.requests = 0
        self.series = 0

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        cfg = dict(config or {})
        root = cfg.get("registry")
        want = str(cfg.get("version", "current"))
        if not root:
            self.model, self.version, self.config = None, "seasonal_naive", cfg
            return
        registry = ModelRegistry(root)
        try:
            version, model = registry.load(want)
        except (ModelLoadError, ValueError, OSError) as e:
            # keep serving what we have; the error is visible in status() and the replica log
            msg = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} cannot load {want} from {root}: {e}"
            log.error(msg)
            self.swap_errors = [*self.swap_errors[-9:], msg]
            if self.model is not None or want == "current":
                return
            # a fresh replica with nothing to keep: the promoted version, else seasonal naive
            try:
                version, model = registry.load("current")
            except (ModelLoadError, ValueError, OSError) as e2:
                self.swap_errors = [*self.swap_errors[-9:], f"cannot load the promoted version either: {e2}"]
                return
        if "recent_windows" in cfg:
            # backcast calibration costs one more forward pass per window: latency-critical
            # deployments may turn it off (0) and keep the hold-out calibration alone
            model.recent_windows = int(cfg["recent_windows"])
        self.model, self.version, self.config = model, version, cfg  # one assignment each: the swap
        self.swaps += 1

    def predict_values(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """A `values` request: one (n, T) array, one forward pass, no per-series objects."""
        model, version = self.model, self.version
        try:
            ids, values, errs, h, season = parse_array_request(payload)
            horizon = h or (model.horizon if model is not None else DEFAULT_HORIZON)
            if model is not None and horizon > model.horizon:
                raise RequestError(f"horizon {horizon} exceeds the model's {model.horizon}")
        except RequestError as e:
            return {"error": str(e), "model": version}
        start, step = payload.get("start"), payload.get("step")
        cut = max(0, int(np.shape(payload["values"])[1]) - values.shape[1])
        if start is not None and step is not None:
            start = start + step * cut  # only the tail was kept
        if model is None or values.shape[1] < model.min_history():
            q = seasonal_naive_rows(values, season, horizon) if len(ids) else None
            fb = list(ids)
        else:
            q = model.predict_array(values, season, horizon, start=start, step=step)
            fb = []
        self.requests += 1
        self.series += len(ids)
        return {
            "model": version,
            "horizon": horizon,
            "quantiles": list(QUANTILES),
            "ids": ids,
            "forecasts": q if q is not None else np.zeros((0, horizon, len(QUANTILES))),
            "fallback": fb,
            "errors": errs,
        }

    def predict(self, payloads: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        model, version = self.model, self.version  # a consistent pair for the whole batch
        if any(isinstance(p, Mapping) and "values" in p for p in payloads):
            # array requests go one forward pass each; the rest share one below
            rest = [p for p in payloads if not (isinstance(p, Mapping) and "values" in p)]
            done = iter(self.predict(rest)) if rest else iter(())
            return [
                self.predict_values(p) if isinstance(p, Mapping) and "values" in p else next(done) for p in payloads
            ]
        parsed: list[tuple[list[str], list[Series], dict[str, str], int] | RequestError] = []
        for p in payloads:
            try:
                ids, ser, errs, h = parse_request(p)
                horizon = h or (model.horizon if model is not None else DEFAULT_HORIZON)
                if model is not None and horizon > model.horizon:
                    raise RequestError(f"horizon {horizon} exceeds the model's {model.horizon}")
                parsed.append((ids, ser, errs, horizon))
            except RequestError as e:
                parsed.append(e)
        # one forward pass over every series of every request in the batch
        flat: list[Series] = [s for p in parsed if not isinstance(p, RequestError) for s in p[1]]
        q_all = np.zeros((0, 0, len(QUANTILES)))
        fallback_all = np.zeros(0, dtype=bool)
        if flat and model is not None:
            max_h = max(p[3] for p in parsed if not isinstance(p, RequestError))
            fallback_all = np.array([len(s) < model.min_history() for s in flat])
            q_all = model.predict(flat, max_h)
        out: list[dict[str, Any]] = []
        k = 0
        for item in parsed:
            if isinstance(item, RequestError):
                out.append({"error": str(item), "model": version})
                continue
            ids, ser, errs, horizon = item
            if model is None:
                q = (
                    np.stack([seasonal_naive_quantiles(s.values, s.season, horizon) for s in ser])
                    if ser
                    else np.zeros((0, horizon, len(QUANTILES)))
                )
                fb = ids
            else:
                q = q_all[k : k + len(ser), :horizon]
                fb = [i for i, f in zip(ids, fallback_all[k : k + len(ser)], strict=True) if f]
            k += len(ser)
            self.requests += 1
            self.series += len(ser)
            out.append(
                {
                    "model": version,
                    "horizon": horizon,
                    "quantiles": list(QUANTILES),
                    "ids": ids,
                    "forecasts": q,
                    "fallback": fb,
                    "errors": errs,
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        return {
            "model": self.version,
            "config": self.config,
            "swaps": self.swaps,
            "swap_errors": list(self.swap_errors),
            "requests": self.requests,
            "series": self.series,
        }


class ForecastReplica:
    def __init__(self) -> None:
        self.core = ForecastCore()

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.core.reconfigure(config)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.002)
    async def _batched(self, payloads: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return self.core.predict(payloads)

    async def forecast(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Handle calls: forecasts as one (n, horizon, Q) numpy array, rows in `ids` order."""
        if isinstance(payload, Mapping) and "values" in payload:
            # An array request is one forward pass of its own: batching would only add its wait.
            return self.core.predict_values(payload)
        result: dict[str, Any] = await self._batched(payload)
        return result

    async def status(self) -> dict[str, Any]:
        return self.core.status()

    async def __call__(self, request: Any) -> dict[str, Any]:
        """HTTP: POST the request JSON; forecasts come back as id -> lists."""
        try:
            payload = await request.json()
        except ValueError:
            return {"error": "the body is not JSON"}
        r = await self._batched(payload)
        if "forecasts" in r:
            r = {**r, "forecasts": {i: r["forecasts"][j].tolist() for j, i in enumerate(r.pop("ids"))}}
        return r


# The Serve deployment (named ForecastService in configs and the dashboard).
ForecastService: Any = serve.deployment(
    name="ForecastService",
    max_ongoing_requests=2 * MAX_BATCH,
    ray_actor_options={"num_cpus": 1},
    user_config={},
)(ForecastReplica)


def build_app(args: dict[str, str] | None = None) -> Any:
    """`serve run apsv.forecast.serving:build_app registry=/path/to/models` (user_config from args)."""
    a = dict(args or {})
    return ForecastService.options(
        user_config={"registry": a.get("registry"), "version": a.get("version", "current")}
    ).bind()


app = ForecastService.bind()

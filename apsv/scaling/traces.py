"""Load traces for policy evaluation: message rates per step, built from real data.

* `from_series`: any load series (../shared/data/timeseries), scaled so its peak is a chosen
  message rate; each sample becomes one step (time-compressed: a day of 5-minute samples plays
  in 288 steps), the seasonal period kept in steps;
* `bgp_churn`: real BGP UPDATE arrivals per second from an MRT update dump, looped to length, with
  a session-reset storm: a full-table peer reconnecting re-announces its table, packed as densely
  as that dump packs prefixes into UPDATEs;
* `bfd_population`: a BFD session population following a daily shape with churn; each session
  sends one control packet per transmit interval.

`forecast_trace` trains a forecaster on the first part of a trace and produces the quantile
forecasts the predictive policy reads, for every `every` steps of the rest, in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from apsv.forecast.metrics import QUANTILES
from apsv.forecast.series import FloatArray, Series
from apsv.scaling.simulator import Forecasts


@dataclass
class Trace:
    name: str
    rates: FloatArray  # messages/s, one value per step
    protocol: str = "bgp"
    season: int = 1
    step_s: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    # Per step, the UPDATEs peers that reset are still expected to re-send (what the BGP stacks
    # know: the table a session had when it went down, less what it has re-sent since); None:
    # no table transfers in this trace.
    table_backlog: FloatArray | None = None
    # The load without the table transfers (what a forecaster should learn: a transfer is
    # announced by its session going down, not predicted from the past); None: all organic.
    organic: FloatArray | None = None

    def split(self, fraction: float) -> int:
        return int(self.rates.size * fraction)


def from_series(series: Series, peak_rate: float, *, protocol: str = "bgp") -> Trace:
    v = np.asarray(series.values, dtype=np.float64)
    top = float(v.max())
    if top <= 0:
        raise ValueError(f"{series.name}: the series is never positive; it cannot be scaled to a load")
    return Trace(
        series.name,
        v * (peak_rate / top),
        protocol,
        series.season,
        meta={"source": series.meta.get("path", series.name), "scaled_peak": peak_rate, "sample_step_s": series.step},
    )


def at_sample_step(trace: Trace) -> Trace:
    """The same trace played at its series' own sampling step (one decision per sample: a
    5-minute series scales every 5 minutes) instead of one sample per simulated second."""
    step = trace.meta.get("sample_step_s")
    if not step:
        raise ValueError(f"{trace.name}: the series has no sampling step (no timestamps, none given)")
    step = float(step)
    label = f"{step / 86400:g}d" if step >= 86400 else f"{step / 3600:g}h" if step >= 3600 else f"{step:g}s"
    return replace(trace, name=f"{trace.name}@{label}", step_s=step)


def bgp_churn(
    path: str | Path,
    *,
    length_s: int = 3600,
    storm_at_s: int | None = 1800,
    table_size: int = 900_000,
    storm_s: int = 60,
    reconnect_s: int = 10,
    scale: float = 1.0,
) -> Trace:
    """UPDATE messages per second from a real dump, looped to `length_s`, times `scale`, with a
    full-table re-announcement (`table_size` prefixes over `storm_s` seconds) at `storm_at_s`.

    The peers went down `reconnect_s` earlier (a reset session is re-established after the
    speakers' connect-retry / idle-hold delays - 5 s to 120 s by the daemons' defaults): from then
    on the table they had is the trace's `table_backlog`, shrinking as it is re-sent."""
    from apsv.forecast.datasets import from_mrt

    updates = from_mrt(path, measure="updates", per_peer=False)[0].values
    prefixes = from_mrt(path, measure="prefixes", per_peer=False)[0].values
    per_update = float(prefixes.sum() / max(updates.sum(), 1.0))
    reps = int(np.ceil(length_s / updates.size))
    rates = np.tile(updates, reps)[:length_s] * scale
    meta: dict[str, Any] = {"source": str(path), "prefixes_per_update": round(per_update, 3), "scale": scale}
    if storm_at_s is not None:
        if not 0 <= storm_at_s < length_s:
            raise ValueError(f"storm_at_s {storm_at_s} outside the trace (0..{length_s - 1})")
        msgs = table_size / max(per_update, 1.0)
        end = min(length_s, storm_at_s + storm_s)
        # a reconnecting peer sends fastest at first, then tails off
        shape = np.exp(-np.linspace(0.0, 3.0, end - storm_at_s))
        storm = msgs * shape / shape.sum()
        organic = rates.copy()
        rates[storm_at_s:end] += storm
        backlog = np.zeros(length_s)
        down = max(0, storm_at_s - reconnect_s)
        backlog[down:storm_at_s] = msgs
        # what is still to come after each step of the transfer (the VPSM decides at a step's end)
        backlog[storm_at_s:end] = np.maximum(msgs - np.cumsum(storm), 0.0)
        meta.update(
            storm_at_s=storm_at_s, storm_s=storm_s, storm_messages=round(msgs), reset_at_s=down, reconnect_s=reconnect_s
        )
        return Trace(f"{Path(path).name}+storm", rates, "bgp", 1, meta=meta, table_backlog=backlog, organic=organic)
    return Trace(Path(path).name, rates, "bgp", 1, meta=meta)


def bfd_population(
    peak_sessions: int = 20_000,
    *,
    length_s: int = 3600,
    day_s: int = 1200,
    tx_interval_ms: float = 300.0,
    churn: float = 0.02,
    seed: int = 0,
) -> Trace:
    """Control packets per second from a session population between 30 % and 100 % of the peak on
    a compressed day of `day_s` steps, with random churn (sessions coming and going)."""
    rng = np.random.default_rng(seed)
    t = np.arange(length_s)
    shape = 0.65 - 0.35 * np.cos(2 * np.pi * t / day_s)
    noise = np.cumsum(rng.normal(0.0, churn, length_s)) / np.sqrt(np.arange(1, length_s + 1))
    sessions = np.clip(peak_sessions * (shape + 0.05 * noise), 0, None)
    rates = sessions * 1000.0 / tx_interval_ms
    return Trace(
        f"bfd-{peak_sessions}",
        rates,
        "bfd",
        day_s,
        meta={"peak_sessions": peak_sessions, "tx_interval_ms": tx_interval_ms, "day_s": day_s},
    )


def forecast_trace(
    trace: Trace,
    *,
    start: int,
    horizon: int = 32,
    every: int = 5,
    steps: int = 600,
    kind: str = "transformer",
    seed: int = 0,
) -> tuple[Forecasts, dict[str, Any]]:
    """Train on `trace.rates[:start]`, then forecast from every `every`-th step of the rest with
    the history up to it. Returns the forecasts (indexed from `start`) and the fit report."""
    from apsv.forecast.neural import NeuralForecaster, TrainConfig

    # the forecaster learns the organic load: table transfers are announced, not predicted
    rates = trace.organic if trace.organic is not None else trace.rates
    hist = Series(trace.name, rates[:start], season=trace.season)
    model = NeuralForecaster(kind, horizon, train=TrainConfig(steps=steps, seed=seed))
    report = model.fit([hist])
    n = trace.rates.size - start
    origins = list(range(start, start + n, every))
    full = Series(trace.name, rates, season=trace.season)
    q = model.predict([full.head(o) for o in origins], horizon)
    values = {f"p{round(lv * 100)}": q[..., k] for k, lv in enumerate(QUANTILES)}
    info = {"kind": kind, "horizon": horizon, "every": every, "train_steps": start, "fit": report.__dict__}
    return Forecasts(every, values), info


def load_trace(
    spec: str, *, column: str | None = None, season: int | None = None, peak_rate: float = 20_000.0
) -> Trace:
    """A trace from what `apsv evaluate` and jobs/evaluate.py accept: `synthetic:bfd[:PEAK_SESSIONS]`,
    an MRT update dump (real churn with a reset storm), or a CSV / one-value-per-line series
    scaled to `peak_rate`. Raises ValueError (or SeriesError) with what is wrong."""
    from apsv.forecast.model_backtest import is_mrt, read_series

    if spec.startswith("synthetic:bfd"):
        parts = spec.split(":")
        return bfd_population(int(parts[2]) if len(parts) > 2 else 20_000)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{spec}: no such file")
    return bgp_churn(path) if is_mrt(path) else from_series(read_series(path, column, season), peak_rate)

"""Serve latency of the TPE: one request forecasting 1,000 series, against a bare Serve echo.

python benchmarks/forecast_serve.py [--series 1000] [--requests 200] [--out benchmarks/results/forecast_serve.json]

Measurements in the same run on the same local Ray cluster, for the request as a map of 1,000
series (id -> array) and as one (1000, 240) array (`values`, the fast path: `*_array`):
- `tpe`: handle.forecast(1,000 series of 240 one-second samples) -> (1000, 12, 4) quantiles;
- `echo`: a bare Serve deployment receiving the same payload and returning an array of the same
  shape (Serve + transport cost alone, the floor for any model);
- `model_only`: the same forecasts in-process, no Serve.
Also the wall time of training the served model and of a 4-trial Tune search on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tune/ lives at the repository root

from apsv.forecast.metrics import QUANTILES
from apsv.forecast.neural import NeuralForecaster, TrainConfig
from apsv.forecast.registry import ModelRegistry
from apsv.forecast.series import Series
from apsv.forecast.serving import ForecastService
from apsv.runtime.cluster import start_local_ray


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Echo:
    async def forecast(self, payload: dict[str, Any]) -> dict[str, Any]:
        n = len(payload["series"]) if "series" in payload else len(payload["values"])
        return {"forecasts": np.zeros((n, 12, len(QUANTILES)))}


def load_series(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """Per-second message rates with a minute cycle and bursts, like the telemetry series."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    out = []
    for _ in range(n):
        base = rng.uniform(50, 5000)
        v = base * (1 + 0.3 * np.sin(2 * np.pi * (t + rng.integers(60)) / 60)) + rng.normal(0, 0.05 * base, length)
        out.append(np.maximum(v, 0))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "n": len(xs),
    }


def timed(call: Any, payload: dict[str, Any], requests: int) -> list[float]:
    for _ in range(10):
        call(payload)
    out = []
    for _ in range(requests):
        t = time.perf_counter()
        call(payload)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tune-trials", type=int, default=4, help="0 skips the Ray Tune search")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "forecast_serve.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="apsv-fserve-"))
    start_local_ray(num_cpus=4, temp_dir=tmp / "ray")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})

    train = [Series(f"t{i}", v, step=1.0, season=60) for i, v in enumerate(load_series(8, 3000, seed=1))]
    t0 = time.perf_counter()
    # the serving configuration: 15 patches of 16 over a 240 s context, one narrow layer, and no
    # per-request backcasts (recent_windows 0): latency first
    model = NeuralForecaster("transformer", 12, patch_len=16, d_model=32, n_layers=1, train=TrainConfig(steps=600))
    model.fit(train)
    train_seconds = time.perf_counter() - t0
    reg = ModelRegistry(tmp / "models")
    reg.promote(reg.register(model, {"benchmark": "forecast_serve"}))

    hist = load_series(a.series, 240, seed=2)
    series_map = {f"s{i}": v for i, v in enumerate(hist)}
    payload: dict[str, Any] = {"series": series_map, "season": 60}
    # two CPUs: Ray sets the replica's OMP/torch threads from its num_cpus
    app = ForecastService.options(
        user_config={"registry": str(reg.root), "recent_windows": 0}, ray_actor_options={"num_cpus": 2}
    )
    tpe = serve.run(app.bind(), name="tpe-bench", route_prefix=None)
    echo = serve.run(Echo.bind(), name="echo-bench", route_prefix=None)
    r = tpe.forecast.remote(payload).result()
    assert r["forecasts"].shape == (a.series, 12, len(QUANTILES)) and not r["fallback"], r.get("errors")

    res: dict[str, Any] = {}
    res["tpe"] = percentiles(timed(lambda p: tpe.forecast.remote(p).result(), payload, a.requests))
    res["echo"] = percentiles(timed(lambda p: echo.forecast.remote(p).result(), payload, a.requests))
    series_objs = [Series(k, v, season=60) for k, v in series_map.items()]
    model.recent_windows = 0
    res["model_only"] = percentiles(timed(lambda _p: model.predict(series_objs, 12), payload, a.requests))
    res["tpe_over_echo_p50"] = round(res["tpe"]["p50_ms"] / res["echo"]["p50_ms"], 2)
    array = {"values": np.stack(hist), "ids": list(series_map), "season": 60}
    r = tpe.forecast.remote(array).result()
    assert np.allclose(r["forecasts"], model.predict(series_objs, 12)), "the array path answers differently"
    res["tpe_array"] = percentiles(timed(lambda p: tpe.forecast.remote(p).result(), array, a.requests))
    res["echo_array"] = percentiles(timed(lambda p: echo.forecast.remote(p).result(), array, a.requests))
    res["model_only_array"] = percentiles(timed(lambda p: model.predict_array(p["values"], 60, 12), array, a.requests))

    tune: dict[str, Any] | None = None
    if a.tune_trials > 0:
        from tune.forecaster_search import run_search

        t1 = time.perf_counter()
        _, best, trials = run_search(train, 12, num_samples=a.tune_trials, steps=300, storage_path=str(tmp / "tune"))
        tune = {"trials": len(trials), "steps": 300, "seconds": round(time.perf_counter() - t1, 1), "best": best}
    doc = {
        "benchmark": "forecast_serve",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "series_per_request": a.series,
        "history": 240,
        "horizon": 12,
        "model": model.cfg.to_dict() if model.cfg else None,
        "latency": res,
        "train_seconds": round(train_seconds, 2),
        "tune": tune,
    }
    print(json.dumps(doc, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's temp dir and the model registry


if __name__ == "__main__":
    main()

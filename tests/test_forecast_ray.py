"""The TPE on the shared local Ray cluster: Serve deployment, hot swap, Tune, retraining job."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apsv.forecast.metrics import QUANTILES
from apsv.forecast.neural import NeuralForecaster, TrainConfig
from apsv.forecast.registry import ModelRegistry
from apsv.forecast.series import Series

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def _series(n: int = 900, season: int = 24, seed: int = 0) -> Series:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    v = 100 + 30 * np.sin(2 * np.pi * t / season) + np.cumsum(rng.normal(0, 0.5, n)) + rng.normal(0, 2, n)
    return Series(f"s{seed}", v, season=season)


def _register(reg: ModelRegistry, steps: int, horizon: int = 12) -> str:
    m = NeuralForecaster(
        "transformer", horizon, d_model=32, train=TrainConfig(steps=steps, eval_every=max(1, steps // 2))
    )
    m.fit([_series()])
    return reg.register(m, {"note": f"{steps} steps"})


@pytest.fixture(scope="module")
def serve_instance(ray_cluster: Any) -> Any:
    from ray import serve

    from tests.conftest import _free_port

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield serve, port
    serve.shutdown()  # type: ignore[no-untyped-call]


def test_serve_answers_many_series_in_one_call_and_hot_swaps(serve_instance: Any, tmp_path: Path) -> None:
    from apsv.forecast.serving import ForecastService

    serve, port = serve_instance
    reg = ModelRegistry(tmp_path / "models")
    v1 = _register(reg, 20)
    v2 = _register(reg, 40)
    app = ForecastService.options(user_config={"registry": str(reg.root), "version": v1})
    handle = serve.run(app.bind(), name="tpe-test", route_prefix="/tpe-test")
    hist = {f"r{i}": _series(300, seed=i).values.tolist() for i in range(200)}
    hist["short"] = [1.0, 2.0, 3.0]
    r = handle.forecast.remote({"series": hist, "season": 24}).result()
    assert r["model"] == v1 and r["forecasts"].shape == (201, 12, len(QUANTILES))
    assert r["fallback"] == ["short"] and not r["errors"]
    # concurrent requests are batched into shared forward passes and all answered
    rs = [handle.forecast.remote({"series": {"a": hist["r1"]}, "season": 24}) for _ in range(40)]
    assert all(x.result()["forecasts"].shape == (1, 12, len(QUANTILES)) for x in rs)
    # an array request (answered outside the batch) gives the series map's forecasts, concurrently too
    ids = [f"r{i}" for i in range(200)]
    arr = {"values": np.asarray([hist[i] for i in ids]), "ids": ids, "season": 24}
    ra = [handle.forecast.remote(arr) for _ in range(4)]
    for x in ra:
        got = x.result()
        assert got["ids"] == ids and not got["fallback"]
        assert np.allclose(got["forecasts"], r["forecasts"][:200])

    # hot swap under continuous load: no request fails, both versions answer
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                seen.append(handle.forecast.remote({"series": {"a": hist["r2"]}, "season": 24}).result()["model"])
            except BaseException as e:
                failures.append(e)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    serve.run(
        app.options(user_config={"registry": str(reg.root), "version": v2}).bind(),
        name="tpe-test",
        route_prefix="/tpe-test",
    )
    deadline = time.time() + 30
    while time.time() < deadline and (not seen or seen[-1] != v2):
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for w in workers:
        w.join()
    assert not failures, failures[:3]
    assert v1 in seen and seen[-1] == v2 and len(seen) > 20
    st = handle.status.remote().result()
    assert st["model"] == v2 and st["swaps"] >= 1 and not st["swap_errors"]

    # a corrupt version is refused: the promoted one serves, and status says why
    reg.promote(v2)
    (reg.path(v1) / "weights.pt").write_bytes(b"corrupt")
    serve.run(
        app.options(user_config={"registry": str(reg.root), "version": v1}).bind(),
        name="tpe-test",
        route_prefix="/tpe-test",
    )
    st = handle.status.remote().result()
    assert st["model"] == v2 and "cannot load v0001" in st["swap_errors"][0]
    assert handle.forecast.remote({"series": {"a": hist["r3"]}, "season": 24}).result()["model"] == v2

    # over HTTP, bound to loopback
    import urllib.request

    body = json.dumps({"series": {"a": hist["r4"], "bad": [float("nan")] * 10}, "season": 24}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/tpe-test", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        doc = json.loads(resp.read())
    assert (
        len(doc["forecasts"]["a"]) == 12 and len(doc["forecasts"]["a"][0]) == len(QUANTILES) and "bad" in doc["errors"]
    )
    serve.delete("tpe-test")


def test_tune_search_with_two_trials(ray_cluster: Any, tmp_path: Path) -> None:
    from tune.forecaster_search import run_search

    model, config, trials = run_search(
        [_series(600, seed=s) for s in range(2)], 12, num_samples=2, steps=40, eval_every=20, storage_path=str(tmp_path)
    )
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    assert config["kind"] in ("transformer", "lstm") and model.cfg is not None
    assert model.predict([_series(300)], 12).shape == (1, 12, len(QUANTILES))


def test_retrain_job_promotes_only_a_better_model(ray_cluster: Any, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from jobs.retrain import main

    f = tmp_path / "load.csv"
    f.write_text("value\n" + "\n".join(f"{x:.3f}" for x in _series(1200, seed=7).values) + "\n")
    reg = tmp_path / "models"
    common = ["--series", str(f), "--season", "24", "--registry", str(reg), "--horizon", "12", "--samples", "2"]
    out1 = tmp_path / "r1.json"
    assert main([*common, "--steps", "300", "--eval-every", "100", "--output", str(out1)]) == 0
    r1 = json.loads(out1.read_text())
    assert r1["promoted"] and r1["serving"] == "v0001"  # beats seasonal naive on the hold-out
    # a two-step candidate is worse than the serving model: registered, traced, not promoted
    out2 = tmp_path / "r2.json"
    assert main([*common, "--steps", "2", "--eval-every", "1", "--output", str(out2)]) == 0
    r2 = json.loads(out2.read_text())
    assert r2["version"] == "v0002" and not r2["promoted"] and r2["serving"] == "v0001"
    assert r2["scores"]["candidate"]["wql"] > r2["scores"]["serving"]["wql"]
    registry = ModelRegistry(reg)
    card = registry.card("v0002")
    assert card["parent"] == "v0001" and card["data_window"]["holdout"] == 48
    assert [d["promoted"] for d in registry.decisions()] == [True, False]
    assert main(["--registry", str(reg)]) == 2  # no data named


def test_vpsm_reads_the_tpe_for_the_predictive_policy(serve_instance: Any, deployment: Any) -> None:
    import ray

    from apsv.forecast.serving import ForecastService
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import FORECAST_STALE_STEPS, ProtocolPlan

    serve, _ = serve_instance
    serve.run(ForecastService.bind(), name="tpe-vpsm", route_prefix=None)  # no registry: seasonal naive
    plan = ProtocolPlan(
        "bgp",
        min_instances=1,
        max_instances=2,
        allocation=Allocation(cpu=0.25, memory_bytes=512 << 20),
        policy="predictive",
        season=1,
    )
    dep = deployment([plan], run_loop=False, forecaster_app="tpe-vpsm")
    for _ in range(3):
        ray.get(dep.vpsm.step.remote())
    st = ray.get(dep.vpsm.status.remote())
    assert st["forecast_errors"] == 0 and set(st["forecasts"]["bgp"]) == {"p10", "p50", "p90", "p99"}
    assert st["protocols"]["bgp"]["instances"] == 1  # no load, no forecast load: the minimum
    # no window scored yet: the forecast is not trusted, and status says so
    assert st["protocols"]["bgp"]["forecast_trust"] == 0.0
    assert "forecast trusted at 0.00" in st["protocols"]["bgp"]["last_decision"]
    serve.delete("tpe-vpsm")
    ray.get(dep.vpsm.step.remote())  # the TPE is gone: counted, and the step goes on
    st = ray.get(dep.vpsm.status.remote())
    assert st["forecast_errors"] >= 1 and st["protocols"]["bgp"]["instances"] == 1
    assert st["forecaster"]["available"] and st["forecasts"]  # one miss: the last forecast still holds
    for _ in range(FORECAST_STALE_STEPS):
        ray.get(dep.vpsm.step.remote())
    st = ray.get(dep.vpsm.status.remote())
    # gone for good: its forecasts are dropped, the policy reacts to the live load, and says so
    assert st["forecaster"]["fallback"] == "reactive" and not st["forecaster"]["available"]
    assert st["forecasts"] == {} and st["protocols"]["bgp"]["forecast_trust"] == 0.0  # reacts only
    assert any(e["event"] == "forecaster-unavailable" for e in st["events"])
    serve.run(ForecastService.bind(), name="tpe-vpsm", route_prefix=None)  # back
    ray.get(dep.vpsm.step.remote())
    st = ray.get(dep.vpsm.status.remote())
    assert st["forecaster"]["available"] and st["forecasts"] and st["events"][-1]["event"] != "forecaster-unavailable"

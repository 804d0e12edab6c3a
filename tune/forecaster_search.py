"""Ray Tune search for the traffic forecaster: ASHA over architecture and training settings.

Each trial trains a `NeuralForecaster` on the training series and reports its hold-out pinball
loss every `eval_every` steps; ASHA stops the weak trials early. The trial's final model is saved
as a Tune checkpoint, so the best one can be read back wherever the trial ran.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Checkpoint
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from apsv.forecast.neural import NeuralForecaster, TrainConfig
from apsv.forecast.series import Series

SEARCH_SPACE: dict[str, Any] = {
    "kind": tune.choice(["transformer", "lstm"]),
    "d_model": tune.choice([32, 64]),
    "n_layers": tune.choice([1, 2]),
    "dropout": tune.choice([0.0, 0.1]),
    "lr": tune.loguniform(5e-4, 5e-3),
    "batch_size": tune.choice([32, 64]),
}


def _trainable(config: dict[str, Any], series: Sequence[Series], horizon: int, steps: int, eval_every: int) -> None:
    model = NeuralForecaster(
        config["kind"],
        horizon,
        d_model=int(config["d_model"]),
        n_heads=4,
        n_layers=int(config["n_layers"]),
        dropout=float(config["dropout"]),
        train=TrainConfig(
            steps=steps, lr=float(config["lr"]), batch_size=int(config["batch_size"]), eval_every=eval_every, threads=1
        ),
    )

    def report(step: int, loss: float) -> None:
        if step < steps:
            tune.report({"loss": loss, "step": step})

    fit = model.fit(series, report=report)
    with tempfile.TemporaryDirectory() as d:
        model.save(Path(d) / "model")
        loss = fit.holdout_loss if fit.skipped is None else float("inf")
        tune.report({"loss": loss, "step": fit.steps}, checkpoint=Checkpoint.from_directory(d))


def run_search(
    series: Sequence[Series],
    horizon: int,
    *,
    num_samples: int = 8,
    steps: int = 600,
    eval_every: int = 100,
    storage_path: str | None = None,
    seed: int = 0,
    space: dict[str, Any] | None = None,
) -> tuple[NeuralForecaster, dict[str, Any], list[dict[str, Any]]]:
    """Run the search; returns the best trial's trained model, its config, and every trial's result."""
    scheduler = ASHAScheduler(
        time_attr="step", max_t=steps, grace_period=max(eval_every, steps // 4), reduction_factor=2
    )
    trainable = tune.with_parameters(
        _trainable, series=list(series), horizon=horizon, steps=steps, eval_every=eval_every
    )
    trainable = tune.with_resources(trainable, {"cpu": 1})
    param_space = dict(space or SEARCH_SPACE)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="loss",
            mode="min",
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=tune.RunConfig(name="apsv-forecaster", storage_path=storage_path, verbose=0),
    )
    results = tuner.fit()
    every = [results[i] for i in range(len(results))]
    best = results.get_best_result(metric="loss", mode="min", scope="last")
    if best.checkpoint is None:
        raise RuntimeError(f"no trial finished with a model (errors: {[str(r.error) for r in every if r.error]})")
    with best.checkpoint.as_directory() as d:
        model = NeuralForecaster.load(Path(d) / "model")
    trials = [
        {
            "config": r.config,
            "loss": (r.metrics or {}).get("loss"),
            "step": (r.metrics or {}).get("step"),
            "error": str(r.error) if r.error else None,
        }
        for r in every
    ]
    return model, dict(best.config or {}), trials

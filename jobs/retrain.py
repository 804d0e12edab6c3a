"""Retrain the traffic forecaster from telemetry; promote the candidate only if it is better.

    ray job submit --working-dir . -- python jobs/retrain.py \
        --telemetry /var/lib/apsv/telemetry --hours 24 --registry /var/lib/apsv/models

1. reads the last N hours of instance telemetry (Parquet) into per-protocol load series
   (or `--series FILE`, repeatable, for generic series);
2. holds out the last `--holdout` steps of every series;
3. runs the Ray Tune search (tune/forecaster_search.py, ASHA) on the rest;
4. scores the best candidate and the serving model on the held-out window (pooled weighted
   quantile loss; seasonal naive stands in when nothing serves yet);
5. registers the candidate (weights, config, metrics, data window, trials) and promotes it only
   if it beats the serving model; the decision is appended to the registry's decisions.jsonl.

Prints one JSON object (also written to `--output`). Exit status 0 whether or not it promoted;
2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# The job's working_dir (the repository root) holds tune/; make it importable however we start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apsv.forecast.backtest import holdout_score
from apsv.forecast.baselines import SeasonalNaive
from apsv.forecast.datasets import from_telemetry
from apsv.forecast.model_backtest import read_series
from apsv.forecast.model_error import ModelLoadError
from apsv.forecast.registry import ModelRegistry
from apsv.forecast.series import Series, SeriesError, clean


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_argument_group("data")
    src.add_argument("--telemetry", help="telemetry root (Parquet written by the VPSM)")
    src.add_argument("--hours", type=int, default=24, help="hours of telemetry to read (default 24)")
    src.add_argument("--step", type=float, default=1.0, help="telemetry sampling step in seconds (default 1)")
    src.add_argument("--series", action="append", default=[], help="a generic series file (repeatable)")
    src.add_argument("--season", type=int, default=None, help="seasonal period in steps for --series files")
    p.add_argument("--registry", required=True, help="model registry directory")
    p.add_argument("--horizon", type=int, default=12, help="steps ahead (default 12)")
    p.add_argument("--holdout", type=int, default=None, help="held-out steps per series (default: 4 horizons)")
    p.add_argument("--samples", type=int, default=8, help="Tune trials (default 8)")
    p.add_argument("--steps", type=int, default=600, help="training steps per trial (default 600)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between hold-out evaluations (ASHA rungs)")
    p.add_argument("--min-gain", type=float, default=0.0, help="relative improvement required to promote")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="also write the result JSON here")
    return p.parse_args(argv)


def load_series(args: argparse.Namespace) -> tuple[list[Series], dict[str, Any]]:
    series: list[Series] = []
    window: dict[str, Any] = {"sources": []}
    if args.telemetry:
        from apsv.runtime.telemetry import read_telemetry

        table = read_telemetry(args.telemetry, hours=args.hours)
        window["sources"].append({"telemetry": str(args.telemetry), "hours": args.hours, "rows": table.num_rows})
        if table.num_rows:
            ts = table["ts"].to_pylist()
            window["start"], window["end"] = str(min(ts)), str(max(ts))
        for s in from_telemetry(table, step=args.step):
            try:
                series.append(clean(s)[0])
            except SeriesError as e:
                print(f"retrain: skipping {e}", file=sys.stderr)
    for f in args.series:
        series.append(read_series(f, season=args.season))
        window["sources"].append({"file": str(f)})
    window["series"] = {s.name: len(s) for s in series}
    return series, window


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.telemetry and not args.series:
        print("retrain: give --telemetry DIR and/or --series FILE", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        series, window = load_series(args)
    except (SeriesError, OSError) as e:
        print(f"retrain: {e}", file=sys.stderr)
        return 2
    horizon = args.horizon
    holdout = args.holdout or 4 * horizon
    usable = [s for s in series if len(s) >= holdout + 4 * horizon]
    if not usable:
        print(
            f"retrain: no series has the {holdout + 4 * horizon} values needed (hold-out {holdout} + 4 horizons of "
            f"training); lengths: {window['series']}",
            file=sys.stderr,
        )
        return 2
    train = [s.head(len(s) - holdout) for s in usable]

    import ray

    from tune.forecaster_search import run_search

    if not ray.is_initialized():
        ray.init()  # inside `ray job submit` this joins the cluster; alone, it starts a local one
    registry = ModelRegistry(args.registry)
    t1 = time.perf_counter()
    candidate, best_config, trials = run_search(
        train,
        horizon,
        num_samples=args.samples,
        steps=args.steps,
        eval_every=args.eval_every,
        storage_path=str(Path(args.registry).resolve() / "tune-runs"),
        seed=args.seed,
    )
    tune_seconds = time.perf_counter() - t1
    scores: dict[str, Any] = {
        "candidate": holdout_score(candidate, usable, holdout, horizon),
        "seasonal_naive": holdout_score(SeasonalNaive(), usable, holdout, horizon),
    }
    serving_version = registry.current()
    if serving_version is not None:
        try:
            _, serving = registry.load(serving_version)
            if serving.horizon < horizon:
                raise ModelLoadError(f"serving model {serving_version} forecasts {serving.horizon} < {horizon} steps")
            scores["serving"] = holdout_score(serving, usable, holdout, horizon)
        except ModelLoadError as e:
            print(f"retrain: serving model unusable, comparing against seasonal naive: {e}", file=sys.stderr)
    baseline = scores.get("serving", scores["seasonal_naive"])
    window.update(holdout=holdout, horizon=horizon)
    version = registry.register(
        candidate,
        {
            "data_window": window,
            "metrics": scores,
            "tune": {"best_config": best_config, "trials": trials, "seconds": round(tune_seconds, 2)},
            "parent": serving_version,
        },
    )
    decision = registry.decide(
        version, scores["candidate"]["wql"], baseline["wql"], metric="wql", min_gain=args.min_gain
    )
    result = {
        "version": version,
        "promoted": decision.promoted,
        "serving": registry.current(),
        "reason": decision.reason,
        "scores": scores,
        "best_config": best_config,
        "trials": len(trials),
        "tune_seconds": round(tune_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    text = json.dumps(result, default=str)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

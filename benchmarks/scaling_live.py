"""Scaling policies live against simulated: the same trace window through the real system.

python benchmarks/scaling_live.py [--policies reactive,predictive,oracle] [--steps 120]
                                  [--start 775] [--peak-rate 2000] [--speed 1]
                                  [--out benchmarks/results/scaling_live.json]
                                  [--plots benchmarks/results/scaling_plots]

The Cortez A5M trace as in scaling_policies.py (its first 3,000 samples, peak 20,000 msgs/s;
the first 30 % trains the forecaster and tunes `reactive` in the simulator). A window of the
evaluated part - by default the steepest rise, 3.4k to 16k msgs/s - is replayed through a local
Ray cluster (process backend, echo stacks with the per-message service time the calibration
measured) at `--peak-rate` live messages/s, policy by policy, and the simulator is run on the
same window with the measured service rate, latency floor and start latency (apsv/evaluation/live.py).
Reported per policy: live and simulated SLO-violation seconds, instance-seconds, scale actions,
lost messages, and their relative differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from catalog import shared_data

from apsv.evaluation.compare import evaluate
from apsv.evaluation.live import LiveConfig, evaluate_live, live_json, plot_live
from apsv.forecast.model_backtest import read_series
from apsv.runtime.cluster import start_local_ray
from apsv.scaling.simulator import Forecasts, SimConfig
from apsv.scaling.traces import from_series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="reactive,predictive,oracle")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--start", type=int, default=775, help="first step of the evaluated part (multiple of 5)")
    ap.add_argument("--peak-rate", type=float, default=1000.0)
    ap.add_argument("--speed", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling_live.json")
    ap.add_argument("--plots", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling_plots")
    a = ap.parse_args()
    policies = tuple(a.policies.split(","))
    a5m = read_series(shared_data() / "timeseries/cortez-internet-traffic/A5M.txt", season=288)
    trace = from_series(a5m.head(3000), 20_000.0)
    cfg = SimConfig(capacity=2000.0, start_latency_s=3.0, slo_ms=100.0, max_instances=24)
    t0 = time.perf_counter()
    doc = evaluate(trace, cfg, policies, forecaster_steps=300)
    test = doc["_test"][a.start :]
    fc = doc["_forecasts"]
    if fc is not None:
        fc = Forecasts(fc.every, {q: v[a.start // fc.every :] for q, v in fc.values.items()})
    start_local_ray(num_cpus=16)
    live = LiveConfig(speed=a.speed, peak_rate=a.peak_rate, max_steps=a.steps)
    tables = doc["_tables"][a.start :] if doc["_tables"] is not None else None
    res = evaluate_live(test, cfg, policies, live, configs=doc["policy_configs"], forecasts=fc, table_backlog=tables)
    out = live_json(f"{trace.name}[{a.start}:{a.start + a.steps}]", res)
    out["plots"] = [str(p) for p in plot_live(f"A5M-live-{a.start}", res, a.plots)]
    out["benchmark"] = "scaling_live"
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["offline_policy_configs"] = doc["policy_configs"]  # `policy_configs`: as run live
    # per step, live beside simulated: where they part
    out["timelines"] = {
        p: {
            "live_t": [round(float(x), 2) for x in r.timeline["t"]],
            "live_instances": [int(x) for x in r.timeline["instances"]],
            "live_p99_ms": [round(float(x), 1) for x in r.timeline["p99_ms"]],
            "sim_instances": [int(x) for x in res["sim"][p].timeline["instances"]],
            "sim_p99_ms": [round(float(x), 1) for x in res["sim"][p].timeline["p99_ms"]],
        }
        for p, r in res["live"].items()
    }
    print(f"calibration: {json.dumps(out['calibration'])}")
    for p, r in out["policies"].items():
        s = out["sim"][p]
        print(
            f"  {p:11s} viol live/sim={r['slo_violation_s']:5.0f}/{s['slo_violation_s']:5.0f}s "
            f"inst live/sim={r['instance_s']:6.0f}/{s['instance_s']:6.0f}s "
            f"actions={r['scale_actions']}/{s['scale_actions']} lost={r['lost']} agreement={out['agreement'][p]}"
        )
    print(f"claims (live): {out['claims']}  (sim): {out['sim_claims']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()

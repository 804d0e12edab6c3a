"""Scaling policies compared on the repository's traces, in the simulator, and its speed at scale.

python benchmarks/scaling_policies.py [--quick] [--out benchmarks/results/scaling_policies.json]
                                      [--plots benchmarks/results/scaling_plots]

Traces (each: the first 30 % trains the Transformer forecaster, the rest is evaluated):
- Cortez A5M ISP traffic (5-minute samples, one per simulated second), peak scaled to 20,000 msgs/s;
- NASA web requests per minute (one per simulated second, the last 20,000 minutes), peak 20,000/s;
- real BGP churn (RouteViews updates.20070211.0141, looped) x20, with a 900k-prefix reset storm;
- a BFD population of 20,000 sessions at 300 ms on a compressed day (SLO 10 ms).
Instance capacity 2,000 msgs/s, start latency 3 s, SLO 100 ms (BFD 10 ms), 1,000 virtual routers
(4 sessions each) on 100 nodes. `reactive` is the best of a grid tuned on each trace.
Scale: one simulated day (86,400 steps) at 10,000 virtual routers on 1,000 nodes, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from apsv.forecast.evaluate import read_series
from apsv.forecast.series import Series
from apsv.scaling.evaluate import claims, evaluate, plot, public
from apsv.scaling.simulator import SimConfig, simulate
from apsv.scaling.traces import Trace, bfd_population, bgp_churn, from_series


def shared_data() -> Path:
    env = os.environ.get("APSV_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def traces(data: Path, quick: bool) -> list[Trace]:
    a5m = read_series(data / "timeseries/cortez-internet-traffic/A5M.txt", season=288)
    nasa = read_series(data / "timeseries/web-request-rates/nasa_requests_per_minute.csv", season=1440)
    nasa = Series(nasa.name, nasa.values[-20_000:], season=1440, meta=nasa.meta)
    out = [
        from_series(a5m if not quick else a5m.head(3000), 20_000.0),
        from_series(nasa if not quick else nasa.head(3000), 20_000.0),
        bgp_churn(data / "mrt/bgpdump-testdata/updates.20070211.0141.gz", length_s=3600, scale=20.0),
        bfd_population(20_000, length_s=3600 if not quick else 1200),
    ]
    return out


def scale_test(quick: bool) -> dict[str, Any]:
    """One simulated day at 10,000 virtual routers (40,000 sessions) on 1,000 nodes."""
    steps = 86_400 if not quick else 8_640
    t = np.arange(steps)
    rng = np.random.default_rng(0)
    load = 1.2e6 + 0.8e6 * np.sin(2 * np.pi * t / 86_400) + rng.normal(0, 2e4, steps)
    cfg = SimConfig(
        capacity=2000.0,
        start_latency_s=3.0,
        vrouters=10_000,
        nodes=1000,
        instances_per_node=4,
        max_instances=2000,
        zipf=0.3,  # at this load a steeper skew gives single sessions more than an instance serves
    )
    t0 = time.perf_counter()
    load = np.maximum(load, 0)
    start = int(np.ceil(load[0] / (cfg.capacity * 0.6)))  # the day starts provisioned for its load
    r = simulate(load, "reactive", cfg, policy_config={"target_utilization": 0.6}, initial_instances=start)
    wall = time.perf_counter() - t0
    return {
        "steps": steps,
        "vrouters": cfg.vrouters,
        "sessions": cfg.vrouters * cfg.sessions_per_vrouter,
        "nodes": cfg.nodes,
        "wall_s": round(wall, 2),
        "simulated_s_per_wall_s": round(steps / wall, 1),
        "result": r.to_json(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--scale-only",
        action="store_true",
        help="only the simulator's speed at scale (run it on an idle machine); updates `scale` in --out",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling_policies.json")
    ap.add_argument("--plots", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling_plots")
    a = ap.parse_args()
    if a.scale_only:
        scale = scale_test(a.quick)
        print(f"scale: {json.dumps(scale)}")
        doc = json.loads(a.out.read_text()) if a.out.exists() else {"benchmark": "scaling_policies"}
        doc["scale"] = scale
        a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"saved {a.out}")
        return
    data = shared_data()
    rows = []
    for tr in traces(data, a.quick):
        cfg = SimConfig(
            capacity=2000.0, start_latency_s=3.0, slo_ms=10.0 if tr.protocol == "bfd" else 100.0, max_instances=64
        )
        t0 = time.perf_counter()
        doc = evaluate(tr, cfg, forecaster_steps=300 if a.quick else 600)
        plot(doc, a.plots)
        row = public(doc)
        row["claims"] = claims(doc)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{tr.name}: {json.dumps(row['claims'])}", flush=True)
        for p, r in row["policies"].items():
            print(
                f"  {p:11s} viol={r['slo_violation_s']:6.0f}s inst={r['instance_s']:9.0f}s "
                f"actions={r['scale_actions']:5d} lost={r['lost']:.0f}"
            )
    scale = scale_test(a.quick)
    print(f"scale: {json.dumps(scale)}")
    out = {
        "benchmark": "scaling_policies",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "traces": rows,
        "scale": scale,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()

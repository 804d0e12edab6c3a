"""The agent's event buffer under an operator's load: a BIRD peer with 10,000 real prefixes reset
again and again while nobody reads the events.

    python benchmarks/agent_events.py [--prefixes 10000] [--resets 60] [--baseline-resets 15]
                                      [--out benchmarks/results/agent_events.json]

Each reset (`birdc restart`) withdraws every prefix and announces them again: two `routes`
events of about a megabyte each, for a virtual router that never takes them. Two agents, each
in a deployment of its own (`apsv up`, one BGP instance): `bounded`, with the agent's default
`max_events` and `max_event_bytes`, and `unbounded`, with both bounds set out of reach - the
buffer as it is without a byte bound, the baseline in the same run. The JSON gives, per agent,
the agent actor's RSS after every reset, its growth per reset (a least-squares slope), and the
buffer's counters (`events_dropped`, `event_bytes_held`). Needs BIRD (../shared/peers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAIT_S = 120.0  # for a reset's session to come back with every prefix


def run_agent(name: str, agent_config: dict[str, Any], prefixes: int, resets: int) -> dict[str, Any]:
    import numpy as np
    import psutil
    import ray

    from apsv.bench import daemons as D
    from apsv.bench import deployed
    from apsv.bench.consolidation import real_routes
    from apsv.bench.live_scale import PORT, bird_slices, vrouters

    protocols = [
        {
            "protocol": "bgp",
            "min_instances": 1,
            "max_instances": 1,
            "policy": "fixed",
            "allocation": {"cpu": 0.5, "memory": "1GiB", "buffer_quota": "32MiB"},
        }
    ]
    cfg = deployed.config(protocols)
    cfg["forecaster"] = {"enabled": False}
    vrs = vrouters(1, 0, 1, 300)
    vrs[0]["bgp"][0]["events"] = "all"  # route changes too: what a virtual router is sent
    workdir = Path(tempfile.mkdtemp(prefix="apsv-bench-events-", dir="/tmp"))
    dep = bird = None
    try:
        dep = deployed.Deployed(cfg, vrs, workdir, f"apsv-bench-events-{name}", **agent_config)
        table, source = real_routes(prefixes)
        bird = bird_slices([r.bird() for r in table], prefixes, 1, PORT)
        birdc = [D.which("birdc"), "-s", str(bird.info["sock"])]
        agent = psutil.Process(ray.get(dep.agent.pid.remote(), timeout=60))

        def session() -> dict[str, Any]:
            infos = dep.session_infos()
            return infos[0] if infos else {}

        def converged(since: float | None) -> float:
            t0 = time.monotonic()
            while time.monotonic() - t0 < WAIT_S:
                D.poke_bird(bird)
                s = session()
                if (
                    s.get("state") == "Established"
                    and s.get("prefixes_received") == prefixes
                    and s.get("established_at") != since
                ):
                    return float(s["established_at"])
                time.sleep(0.5)
            raise RuntimeError(f"{name}: the session did not come back with {prefixes} prefixes in {WAIT_S:.0f} s")

        established = converged(None)
        rss0 = agent.memory_info().rss / 2**20
        points = []
        t_start = time.monotonic()
        for i in range(1, resets + 1):
            subprocess.run([*birdc, "restart", "r0"], check=True, capture_output=True, timeout=30)
            established = converged(established)
            counters = ray.get(dep.agent.status.remote(), timeout=60)["counters"]
            points.append(
                {
                    "reset": i,
                    "rss_mb": round(agent.memory_info().rss / 2**20, 1),
                    "events_dropped": counters.get("events_dropped"),
                    "event_bytes_held": counters.get("event_bytes_held"),
                }
            )
            print(f"{name}: reset {i}/{resets}: {points[-1]}", file=sys.stderr, flush=True)
        xs, ys = np.array([p["reset"] for p in points]), np.array([p["rss_mb"] for p in points])
        return {
            "agent_config": agent_config,
            "resets": resets,
            "seconds": round(time.monotonic() - t_start, 1),
            "routes_source": source,
            "rss_mb_before": round(rss0, 1),
            "rss_mb_after": points[-1]["rss_mb"],
            "rss_growth_mb_per_reset": round(float(np.polyfit(xs, ys, 1)[0]), 2) if len(points) > 2 else None,
            "events_dropped": points[-1]["events_dropped"],
            "event_bytes_held": points[-1]["event_bytes_held"],
            "points": points,
        }
    finally:
        if bird is not None:
            bird.stop()
        if dep is not None:
            dep.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=10_000)
    ap.add_argument("--resets", type=int, default=60)
    ap.add_argument("--baseline-resets", type=int, default=15, help="resets for the unbounded agent")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "agent_events.json")
    a = ap.parse_args()
    out = {
        "benchmark": "agent_events",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "prefixes": a.prefixes,
        "agents": {
            "bounded": run_agent("bounded", {}, a.prefixes, a.resets),
            "unbounded": run_agent(
                "unbounded", {"max_events": 10**9, "max_event_bytes": 1 << 40}, a.prefixes, a.baseline_resets
            ),
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    summary = {
        k: {f: v[f] for f in ("rss_mb_before", "rss_mb_after", "rss_growth_mb_per_reset", "events_dropped")}
        for k, v in out["agents"].items()
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

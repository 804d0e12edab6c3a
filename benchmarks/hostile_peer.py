"""A hostile BGP peer against the agent's listener, a well-behaved session timed throughout.

    python benchmarks/hostile_peer.py [--held 10000] [--flood-s 10] [--slowloris-s 1.0]
                                      [--quick] [--out benchmarks/results/hostile_peer.json]

An agent actor listens on 127.0.0.50:1797 for two passive sessions whose stacks run in a local
Ray cluster (two BGP instances). The attacker (`apsv/bench/hostile_peer.py`) plays one peer,
127.0.0.51: malformed OPENs and headers, maximal and over-long messages, a session split at
every byte, slowloris before and after the OPEN at one octet a second; then, from 127.1.0.0/16,
`--held` connections opened and held, and `--flood-s` seconds of connection attempts. The
bystander, 127.0.0.52, times route refresh -> End-of-RIB every 50 ms. `--quick` leaves out the
minute-long slow OPEN (the CI test runs that way, with fewer connections).

The JSON: each case's expected and received answer, the held connections the agent closed, the
flood's rate, the bystander's latency per case against the SLO (config.DEFAULT_SLO_MS), the
agent's RSS before and after, and its counters.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held", type=int, default=10_000)
    ap.add_argument("--flood-s", type=float, default=10.0)
    ap.add_argument("--slowloris-s", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "hostile_peer.json")
    a = ap.parse_args()

    from apsv.bench.hostile_peer import deployed_agent, run
    from apsv.bench.hostile_wire import Target
    from apsv.config import DEFAULT_SLO_MS
    from apsv.runtime.cluster import start_local_ray

    target = Target(("127.0.0.50", 1797), "127.0.0.51", "127.0.0.52", apsv_as=65010, peer_as=65020)
    start_local_ray(num_cpus=4)  # (its temp directory goes when this process ends)
    started = time.time()
    with deployed_agent(target) as hooks:
        result = run(
            target,
            held=a.held,
            flood_s=a.flood_s,
            slow=not a.quick,
            slowloris_s=a.slowloris_s,
            agent_rss_mb=hooks["agent_rss_mb"],
            agent_counters=hooks["agent_counters"],
            slo_ms=DEFAULT_SLO_MS["bgp"],
        )
        result["multiplexer"] = {k: v for k, v in hooks["mux_stats"]().items() if k in ("recoveries", "sessions")}
    result["seconds"] = round(time.time() - started, 1)
    result["machine"] = {"cpus": __import__("os").cpu_count(), "python": platform.python_version()}
    result["command"] = "python " + " ".join(sys.argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ok", "cases_ok", "cases_total", "seconds")}))
    print(json.dumps(result["bystander"], indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

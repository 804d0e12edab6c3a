"""What soft reconfiguration inbound costs: the memory of the kept pre-policy table per route, and
the time to apply a new import policy from it, against a session that keeps nothing.

    python benchmarks/soft_reconfig.py [--routes 100000] [--sets 100] [--out benchmarks/results/soft_reconfig.json]

Two in-process speakers: one announces --routes /24s in --sets attribute sets (communities
differ); the other receives them, once keeping nothing and once with
`soft_reconfiguration_inbound`. Memory is tracemalloc's, both speakers included, so the
difference is the kept table. Then a route map refusing a quarter of the routes and rewriting
the rest is put in force on the keeping session (`{"op": "policy"}`), timed.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apsv.bgp.config import Announcement, BgpSessionConfig
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import Send, StackEvent

SENDER = {"local_as": 65001, "router_id": "192.0.2.1", "peer_as": 65002, "next_hop_self": "198.51.100.1"}
RECEIVER = {"local_as": 65002, "router_id": "192.0.2.2", "peer_as": 65001, "passive": True}
POLICY = {
    "prefix_lists": {"QUARTER": {"entries": [{"action": "permit", "prefix": "10.0.0.0/8", "ge": 24, "le": 24}]}},
    "route_maps": {
        "IN": {
            "entries": [
                {"seq": 10, "action": "deny", "match": {"prefix_list": "QUARTER"}},
                {"seq": 20, "action": "permit", "set": {"local_preference": 200, "med": 7}},
            ]
        }
    },
}


def wire(events: list[StackEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def connect(a: BgpSession, b: BgpSession) -> None:
    ea = a.start(0.0) + a.connection_made(0.0)
    eb = b.start(0.0) + b.connection_made(0.0)
    for _ in range(10):
        na = a.data_received(wire(eb), 0.0) if wire(eb) else []
        nb = b.data_received(wire(ea), 0.0) if wire(ea) else []
        ea, eb = na, nb
        if not ea and not eb:
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--routes", type=int, default=100_000)
    ap.add_argument("--sets", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "soft_reconfig.json")
    a = ap.parse_args()
    per = a.routes // a.sets
    # a quarter of the sets in 10.0.0.0/8 (which the policy refuses), the rest from 11.0.0.0 on
    quarter = a.sets // 4
    anns = []
    for i in range(a.sets):
        base, idx = ("10.0.0.0", i) if i < quarter else ("11.0.0.0", i - quarter)
        start = int(ipaddress.IPv4Address(base)) + idx * per * 256
        prefixes = [f"{ipaddress.IPv4Address(start + j * 256)}/24" for j in range(per)]
        anns.append(Announcement(prefixes=prefixes, communities=[f"65001:{i}"]))
    sender = BgpSessionConfig.model_validate({**SENDER, "announce": [x.model_dump() for x in anns]})
    res: dict[str, Any] = {}
    for keep in (False, True):
        gc.collect()
        tracemalloc.start()
        b = BgpSession(BgpSessionConfig.model_validate({**RECEIVER, "soft_reconfiguration_inbound": keep}))
        connect(BgpSession(sender), b)
        gc.collect()
        mem, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        routes = b.prefix_count()
        res["kept" if keep else "plain"] = {"routes": routes, "bytes": mem}
        if keep:
            t = time.perf_counter()
            b.control({"op": "policy", "policy": POLICY, "import_policy": "IN"}, 1.0)
            res["apply_policy_s"] = round(time.perf_counter() - t, 3)
            res["after_policy_routes"] = b.prefix_count()
        del b
        gc.collect()
    n = res["kept"]["routes"]
    doc = {
        "benchmark": "soft_reconfig",
        "machine": {"platform": platform.platform()},
        "routes": n,
        "attribute_sets": a.sets,
        "bytes_per_route_plain": round(res["plain"]["bytes"] / n, 1),
        "bytes_per_route_kept": round(res["kept"]["bytes"] / n, 1),
        "kept_table_bytes_per_route": round((res["kept"]["bytes"] - res["plain"]["bytes"]) / n, 1),
        "apply_policy_s": res["apply_policy_s"],
        "routes_after_policy": res["after_policy_routes"],
    }
    print(json.dumps(doc, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

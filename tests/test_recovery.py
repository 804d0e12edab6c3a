"""Every instance of a protocol killed at once, under a real BGP peer (FRR bgpd, hold time 9 s).

With no instance left, the dead instances' sessions wait, unplaced, for the VPSM's replacements;
their clients hold the sessions' state in custody (last snapshot, frames since) and restore them
there as soon as one is up. FRR, 10,000 prefixes in, must see nothing: no reset, no withdrawal,
and APSV's Loc-RIB must hold its prefixes after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from apsv.agent.actor import create_agent_actor
from apsv.agent.config import parse_config
from apsv.runtime.cluster import NAMESPACE
from apsv.runtime.instance import Allocation
from apsv.runtime.vpsm import ProtocolPlan
from tests import peers

pytestmark = [pytest.mark.peer, pytest.mark.ray, pytest.mark.slow]

HOLD = 9
N4 = 10_000
KEY = (8, 1, 1, 1)
APSV_PREFIXES = peers.v4_prefixes("10.210.0.0", 100)


def test_every_instance_killed_at_once_under_frr(deployment: Any, tmp_path: Path) -> None:
    plan = ProtocolPlan(
        "bgp", min_instances=2, max_instances=2, policy="fixed", allocation=Allocation(cpu=0.25, memory_bytes=1 << 30)
    )
    dep = deployment([plan], run_loop=True, interval_s=0.5)
    spec = peers.SPECS["frr"]
    cfg = parse_config(
        {
            "tenant": KEY[0],
            "vrouters": [
                {
                    "id": KEY[1],
                    "bgp": [
                        {
                            "session": 1,
                            "listen": f"{peers.APSV_ADDR}:{peers.APSV_PORT + 20}",
                            "peer": spec.addr,
                            "local_as": peers.APSV_AS,
                            "peer_as": spec.asn,
                            "router_id": "10.0.0.10",
                            "hold_time": HOLD,
                            "families": ["ipv4-unicast"],
                            "next_hop_self": "198.51.100.10",
                            "announce_range": [{"start": "10.210.0.0/24", "count": len(APSV_PREFIXES)}],
                            "ebgp_requires_policy": False,  # everything both ways, as the peers have it
                        }
                    ],
                }
            ],
            "timer_interval_s": 0.25,
        }
    )
    agent = create_agent_actor(cfg, multiplexer_name=dep.multiplexer_name, namespace=NAMESPACE)
    frr = None
    try:
        ray.get(agent.start.remote())
        frr = peers.start_frr(tmp_path, N4, 0, target=(peers.APSV_ADDR, peers.APSV_PORT + 20), hold=HOLD)
        their4 = set(peers.v4_prefixes(spec.v4_base, N4))

        def apsv_rows() -> set[str]:
            iid = ray.get(dep.multiplexer.route_of.remote(KEY))
            h = ray.get(dep.vpsm.instance_handles.remote())[iid]
            return {r[0] for r in ray.get(h.session_table.remote(KEY, "ipv4-unicast"))}

        peers.wait_for("FRR Established", frr.established, timeout=60)
        peers.wait_for("APSV holds FRR's prefixes", lambda: apsv_rows() == their4, timeout=60)
        peers.wait_for("FRR holds APSV's prefixes", lambda: frr.received("ipv4-unicast") == set(APSV_PREFIXES), 60)
        since = frr.up_since()  # FRR's established/dropped connection counts

        handles = ray.get(dep.vpsm.instance_handles.remote())
        pids = ray.get([h.pid.remote() for h in handles.values()])
        t_kill = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # both at once: no instance of the protocol is left

        def restored() -> bool:
            iid = ray.get(dep.multiplexer.route_of.remote(KEY))
            return bool(iid) and iid not in handles and apsv_rows() == their4

        peers.wait_for("the session restored on a replacement", restored, timeout=HOLD)
        took = time.monotonic() - t_kill
        print(f"restored on a replacement {took:.2f} s after every instance was killed")
        time.sleep(2 * HOLD)  # two hold times more: FRR would have reset by now
        assert frr.established() and frr.up_since() == since, "FRR saw the session reset"
        assert frr.received("ipv4-unicast") == set(APSV_PREFIXES)
        assert apsv_rows() == their4
        stats = ray.get(dep.multiplexer.stats.remote())
        assert stats["recoveries"] == 2 and stats["sessions_unplaced"] >= 1
        status = ray.get(agent.status.remote())
        assert status["client"]["restores"] >= 1
    finally:
        if frr is not None:
            frr.stop()
        with contextlib.suppress(Exception):
            ray.get(agent.stop.remote(), timeout=30)
        ray.kill(agent)

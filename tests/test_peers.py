"""Real routing daemons peer with an APSV-offloaded BGP speaker and cannot tell.

FRR bgpd, BIRD, GoBGP and ExaBGP (installed by the test command) each connect, through a
relay that can damage a message, to the APSV agent on 127.0.0.10 - which runs as a Ray actor and
hands every session to BGP stack instances in the local Ray cluster. Each daemon announces
10,000 IPv4 prefixes (and 1,000 IPv6 prefixes, all but ExaBGP); APSV announces 1,000 back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from apsv import bgp_view
from apsv.agent.actor import create_agent_actor
from apsv.agent.config import parse_config
from apsv.runtime.cluster import NAMESPACE, Deployment, deploy
from apsv.runtime.instance import Allocation
from apsv.runtime.vpsm import ProtocolPlan
from tests import peers
from tests.bgp_proxy import Relay

pytestmark = [pytest.mark.peer, pytest.mark.ray, pytest.mark.slow]

N4, N6, OURS = 10_000, 1_000, 1_000
RELAY_ADDR = "127.0.0.11"
VROUTER = {"gobgp": 1, "bird": 2, "frr": 3, "exabgp": 4}
APSV_PREFIXES = peers.v4_prefixes("10.200.0.0", OURS)
SUFFIX = "-peers"


def agent_config() -> dict[str, Any]:
    vrouters = []
    for name, vr in VROUTER.items():
        spec = peers.SPECS[name]
        vrouters.append(
            {
                "id": vr,
                "name": f"vr-{name}",
                "bgp": [
                    {
                        "session": 1,
                        "listen": f"{peers.APSV_ADDR}:{peers.APSV_PORT}",
                        "peer": spec.addr,
                        "local_as": peers.APSV_AS,
                        "peer_as": spec.asn,
                        "router_id": "10.0.0.10",
                        "hold_time": peers.HOLD,
                        "families": ["ipv4-unicast", "ipv6-unicast"],
                        "next_hop_self": "198.51.100.10",
                        "next_hop_self_v6": "2001:db8:ffff::10",
                        "announce_range": [{"start": "10.200.0.0/24", "count": OURS}],
                        "idle_hold_time": 0.5,
                        "ebgp_requires_policy": False,  # everything both ways, as the daemons have it
                    }
                ],
            }
        )
    return {"tenant": 7, "vrouters": vrouters, "timer_interval_s": 0.25}


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[tuple[Deployment, Any]]:
    plan = ProtocolPlan(
        "bgp", min_instances=2, max_instances=4, policy="fixed", allocation=Allocation(cpu=0.25, memory_bytes=1 << 30)
    )
    dep = deploy([plan], suffix=SUFFIX, run_loop=False)
    cfg = parse_config(agent_config())
    agent = create_agent_actor(cfg, multiplexer_name=dep.multiplexer_name, namespace=NAMESPACE)
    placed = ray.get(agent.start.remote())
    assert not [v for v in placed.values() if v.startswith("error")], placed
    yield dep, agent
    with contextlib.suppress(Exception):
        ray.get(agent.stop.remote(), timeout=30)
    ray.kill(agent)
    dep.stop()


def key_of(name: str) -> tuple[int, int, int, int]:
    return (7, VROUTER[name], 1, 1)


def instance_of(dep: Deployment, key: tuple[int, int, int, int]) -> tuple[str, Any]:
    route = ray.get(dep.multiplexer.route_of.remote(key))
    return route, ray.get(dep.vpsm.instance_handles.remote())[route]


def apsv_table(dep: Deployment, key: tuple[int, int, int, int], family: str) -> set[str]:
    _, h = instance_of(dep, key)
    return {row[0] for row in ray.get(h.session_table.remote(key, family))}


def apsv_state(dep: Deployment, key: tuple[int, int, int, int]) -> dict[str, Any]:
    _, h = instance_of(dep, key)
    return dict(ray.get(h.session_info.remote(key)))


@pytest.fixture(params=list(VROUTER))
def daemon(request: Any, cluster: tuple[Deployment, Any], tmp_path_factory: Any) -> Iterator[tuple[Any, Relay]]:
    name = request.param
    spec = peers.SPECS[name]
    port = 1800 + VROUTER[name]
    relay = Relay((RELAY_ADDR, port), (peers.APSV_ADDR, peers.APSV_PORT), spec.addr).start()
    root: Path = tmp_path_factory.mktemp(f"peer-{name}")
    d = peers.LAUNCHERS[name](root, N4, N6 if spec.v6_base else 0, target=(RELAY_ADDR, port))
    yield d, relay
    d.stop()
    relay.stop()


def test_daemon_peers_with_apsv(cluster: tuple[Deployment, Any], daemon: tuple[Any, Relay]) -> None:
    dep, agent = cluster
    d, relay = daemon
    spec = d.spec
    key = key_of(spec.name)
    their4 = set(peers.v4_prefixes(spec.v4_base, N4))
    their6 = set(peers.v6_prefixes(spec.v6_base, N6)) if spec.v6_base else set()

    # Up, and each side holds exactly what the other announced.
    peers.wait_for(f"{spec.name} Established", d.established, timeout=60)
    peers.wait_for("APSV Established", lambda: apsv_state(dep, key)["state"] == "Established", timeout=30)
    peers.wait_for(f"APSV holds {spec.name}'s IPv4", lambda: apsv_table(dep, key, "ipv4-unicast") == their4, 60)
    peers.wait_for(f"APSV holds {spec.name}'s IPv6", lambda: apsv_table(dep, key, "ipv6-unicast") == their6, 30)
    peers.wait_for(f"{spec.name} holds APSV's prefixes", lambda: d.received("ipv4-unicast") == set(APSV_PREFIXES), 60)

    # The operator's view (`apsv bgp summary --json`, FRR's shape): the neighbour, up, with its prefixes.
    view = bgp_view.collect_summary(dep.multiplexer)
    families = view[f"{key[0]}/{key[1]}"]
    nbr = families["ipv4Unicast"]["peers"][spec.addr]
    assert nbr["state"] == "Established" and nbr["remoteAs"] == spec.asn and nbr["localAs"] == peers.APSV_AS
    assert nbr["pfxRcd"] == N4 and nbr["pfxSnt"] == OURS and nbr["peerUptimeMsec"] > 0 and nbr["msgRcvd"] > 0
    if their6:
        assert families["ipv6Unicast"]["peers"][spec.addr]["pfxRcd"] == N6
    rib = bgp_view.collect_routes(dep.multiplexer, dep.vpsm, f"{key[0]}/{key[1]}", "ipv4-unicast", None)
    assert set(rib["routes"]) == their4
    one = next(iter(sorted(their4)))
    (path,) = bgp_view.collect_routes(dep.multiplexer, dep.vpsm, str(key[1]), "ipv4-unicast", one)["routes"][one]
    assert path["peerId"] == spec.addr and path["path"].split()[0] == str(spec.asn) and path["bestpath"]

    # Withdrawals, both ways.
    ray.get(agent.command.remote(VROUTER[spec.name], 1, "bgp", {"op": "withdraw", "prefixes": APSV_PREFIXES[:100]}))
    peers.wait_for(
        f"{spec.name} sees APSV's withdrawals", lambda: d.received("ipv4-unicast") == set(APSV_PREFIXES[100:]), 30
    )
    gone = d.withdrawable
    assert len(gone) == 100
    d.withdraw(gone)
    peers.wait_for("APSV sees the withdrawals", lambda: apsv_table(dep, key, "ipv4-unicast") == their4 - set(gone), 30)

    # Three hold times, while the VPSM drains the instance under the session and then the
    # instance that took it over is killed: the daemon sees nothing happen.
    since = d.up_since()
    assert since not in ("", "0"), f"{spec.name} reports no established session to compare with"
    # A daemon that also connects actively may have opened a second connection at start-up,
    # closed by collision detection (RFC 4271 6.8); none may open while the session moves.
    connections = relay.connections
    t_end = time.monotonic() + 3 * peers.HOLD + 1
    first, _ = instance_of(dep, key)
    moved = ray.get(dep.vpsm.drain.remote(first))
    assert moved >= 1
    second, handle = instance_of(dep, key)
    assert second != first
    time.sleep(1.0)
    ray.kill(handle, no_restart=True)
    peers.wait_for("recovered elsewhere", lambda: instance_of(dep, key)[0] not in (first, second), timeout=20)
    assert second in ray.get(dep.vpsm.reap.remote())
    while time.monotonic() < t_end:
        time.sleep(0.5)
    assert d.established() and d.up_since() == since  # never reset
    st = apsv_state(dep, key)
    assert st["state"] == "Established" and st["gaps"] == 0
    assert apsv_table(dep, key, "ipv4-unicast") == their4 - set(gone)
    assert d.received("ipv4-unicast") == set(APSV_PREFIXES[100:])
    assert relay.connections == connections and relay.notifications_to_daemon == []

    # A protocol error on the wire (a damaged marker): APSV answers NOTIFICATION 1/1 and the
    # daemon records exactly that.
    relay.corrupt_next()
    peers.wait_for("APSV's NOTIFICATION on the wire", lambda: (1, 1) in relay.notifications_to_daemon, timeout=20)
    expect = {
        "gobgp": "Connection Not Synchronized",
        "bird": "Connection not synchronized",
        "frr": "Connection Not Synchronized",
        "exabgp": '"code": 1',
    }[spec.name]
    peers.wait_for(f"{spec.name} reports the NOTIFICATION", lambda: expect.lower() in d.last_error().lower(), 20)
    # ... and the session comes back by itself.
    peers.wait_for(f"{spec.name} re-established", d.established, timeout=60)

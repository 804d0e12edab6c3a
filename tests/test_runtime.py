"""The Ray runtime on a real local Ray cluster: replay, live moves, failures, backpressure, telemetry."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import ray

from apsv.frame import FrameKind, ProtocolId
from apsv.runtime.buffer_pool import BufferPool
from apsv.runtime.client import OffloadClient
from apsv.runtime.driver import ReplaySession, load_streams, local_digests, plan_sessions, replay
from apsv.runtime.instance import Allocation
from apsv.runtime.telemetry import INSTANCE_SCHEMA, read_telemetry
from apsv.runtime.vpsm import ProtocolPlan
from tests.conftest import shared_data_dir

pytestmark = pytest.mark.ray

DUMPS = ["mrt/bgpdump-testdata/updates.20070211.0141.gz", "mrt/bgpkit-ripe-fixtures/updates.20100227.1600.gz"]


def bgp_plan(n: int, backend: str = "process", **kw: Any) -> ProtocolPlan:
    return ProtocolPlan(
        "bgp",
        backend=backend,
        min_instances=n,
        max_instances=8,
        allocation=Allocation(cpu=0.25, memory_bytes=512 << 20),
        policy="fixed",
        **kw,
    )


@pytest.fixture(scope="module")
def replay_sessions() -> list[ReplaySession]:
    streams = load_streams([shared_data_dir() / d for d in DUMPS], min_messages=20)
    assert len(streams) >= 20
    return plan_sessions(streams, sessions=200, vrouters=20)


@pytest.fixture(scope="module")
def reference(replay_sessions: list[ReplaySession]) -> dict[Any, str]:
    return local_digests(replay_sessions)


def check_sessions(dep: Any, sessions: list[ReplaySession], reference: dict[Any, str]) -> dict[str, int]:
    """Every session: each frame applied exactly once, in order, and the same RIB as in-process."""
    handles = ray.get(dep.vpsm.instance_handles.remote())
    routes = ray.get(dep.multiplexer.routes_table.remote())
    infos = {}
    for iid, keys in routes.items():
        for k, info in zip(keys, ray.get([handles[iid].session_info.remote(k) for k in keys]), strict=True):
            infos[tuple(k)] = info
    totals = {"duplicates_dropped": 0}
    for s in sessions:
        info = infos[s.key]
        assert info["last_seq"] == len(s.stream.messages), s.key  # every frame, none lost
        assert info["frames"] == len(s.stream.messages), s.key  # applied exactly once
        assert info["gaps"] == 0, s.key  # in order
        assert info["rib_digest"] == reference[s.key], s.key
        totals["duplicates_dropped"] += info["duplicates"]
    return totals


def open_all(client: OffloadClient, sessions: list[ReplaySession]) -> dict[Any, str]:
    placed = client.open_sessions([(s.key, "bgp", s.config(), False) for s in sessions])
    assert not [v for v in placed.values() if v.startswith("error")]
    return placed


def test_replay_matches_in_process(deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str]) -> None:
    """≥200 sessions of ≥20 virtual routers on ≥3 instances end with the in-process RIBs."""
    dep = deployment([bgp_plan(3)], run_loop=False)
    client = OffloadClient(dep.multiplexer)
    placed = open_all(client, replay_sessions)
    assert len(set(placed.values())) == 3  # spread over every instance
    assert len({s.key[1] for s in replay_sessions}) == 20
    res = replay(client, replay_sessions)
    assert res.frames == sum(len(s.stream.messages) for s in replay_sessions)
    check_sessions(dep, replay_sessions, reference)
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["unknown_session"] == 0 and stats["frames"] == res.frames


def _replay_with(
    dep: Any, sessions: list[ReplaySession], actions: dict[float, Callable[[], Any]]
) -> tuple[OffloadClient, list[Any]]:
    """Replay, firing each action (without waiting for it) when that fraction of frames is sent."""
    client = OffloadClient(dep.multiplexer, BufferPool(slots=8, slot_bytes=64 << 10), max_inflight=4)
    open_all(client, sessions)
    total = sum(len(s.stream.messages) for s in sessions)
    pending = sorted(actions.items())
    fired: list[Any] = []

    def progress(sent: int, _total: int) -> None:
        while pending and sent >= pending[0][0] * total:
            _, act = pending.pop(0)
            fired.append(act())

    replay(client, sessions, on_progress=progress, progress_every=500)
    return client, fired


def test_scale_1_4_1_moves_every_session_live(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str]
) -> None:
    dep = deployment([bgp_plan(1)], run_loop=False)
    vpsm = dep.vpsm
    # Scale-ups and drains run while traffic flows: the calls are fired, not awaited, mid-replay.
    client, fired = _replay_with(
        dep,
        replay_sessions,
        {0.2: lambda: vpsm.scale_to.remote("bgp", 4), 0.55: lambda: vpsm.scale_to.remote("bgp", 1)},
    )
    assert ray.get(fired) == [4, 1]
    stats = ray.get(dep.multiplexer.stats.remote())
    status = ray.get(vpsm.status.remote())
    destroyed = [e for e in status["events"] if e["event"] == "destroy"]
    (rebalanced,) = [e for e in status["events"] if e["event"] == "rebalance"]
    assert len(destroyed) == 3
    # 1 -> 4 moved 3/4 of the sessions onto the new instances; 4 -> 1 drained the original
    # (oldest of equals) and two new ones: every session moved at least once, while traffic flowed.
    assert rebalanced["moved"] == 150 and sum(e["moved"] for e in destroyed) == 150
    assert stats["moves"] == 300
    moved = ray.get(dep.multiplexer.moved_sessions.remote())
    assert moved == len(replay_sessions)
    check_sessions(dep, replay_sessions, reference)
    assert client.stats.repeated_outputs == 0


def test_killed_instance_recovers_its_sessions(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str]
) -> None:
    dep = deployment([bgp_plan(3)], run_loop=False)
    handles = ray.get(dep.vpsm.instance_handles.remote())
    victim_id, victim = sorted(handles.items())[0]

    def kill() -> str:
        ray.kill(victim, no_restart=True)
        return victim_id

    _client, fired = _replay_with(dep, replay_sessions, {0.4: kill})
    assert fired == [victim_id]
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["recoveries"] == 1 and stats["sessions_recovered"] > 0
    loads = ray.get(dep.multiplexer.instance_loads.remote())
    assert loads[victim_id]["alive"] is False
    routes = ray.get(dep.multiplexer.routes_table.remote())
    assert victim_id not in routes  # every session now lives elsewhere
    totals = check_sessions(dep, replay_sessions, reference)
    # Redelivered frames the restored sessions had already applied were dropped, not applied twice.
    assert totals["duplicates_dropped"] <= stats["frames_redelivered"]


def test_overload_slows_the_sender_with_bounded_memory(deployment: Any) -> None:
    """A slow instance: the multiplexer's buffer quota and the client's pool hold memory flat,
    the sender waits (counted), and every frame still arrives."""
    plan = ProtocolPlan(
        "echo",
        min_instances=1,
        max_instances=1,
        allocation=Allocation(cpu=0.25, buffer_quota_bytes=64 << 10),
        policy="fixed",
    )
    dep = deployment([plan], run_loop=False)
    pool = BufferPool(slots=4, slot_bytes=32 << 10)
    client = OffloadClient(dep.multiplexer, pool, max_inflight=4)
    keys = [(7, 1, int(ProtocolId.ECHO), i) for i in range(1, 9)]
    client.open_sessions([(k, "echo", {"delay_ms": 0.2}, False) for k in keys])
    me = psutil.Process()
    payload = b"x" * 900
    rss = []
    t0 = time.perf_counter()
    for i in range(6000):
        client.send(keys[i % len(keys)], payload)
        if i % 1000 == 0:
            rss.append(me.memory_info().rss)
    client.drain()
    elapsed = time.perf_counter() - t0
    stats = ray.get(dep.multiplexer.stats.remote())
    assert client.stats.outputs == 6000  # every echo came back: nothing dropped
    assert pool.stats.max_in_use <= pool.slots and client.stats.inflight_waits > 0  # the sender was held back
    assert stats["quota_waits"] > 0  # the instance's quota did the holding
    assert elapsed > 6000 * 0.2e-3 * 0.9  # paced by the slow stack, not by the sender
    assert max(rss) - min(rss) < 64 << 20  # memory flat while 5 MB of payload went through
    loads = ray.get(dep.multiplexer.instance_loads.remote())
    assert all(v["inflight_bytes"] == 0 for v in loads.values())


def test_telemetry_parquet_and_metrics(ray_cluster: Any, deployment: Any, tmp_path: Path) -> None:
    dep = deployment([ProtocolPlan("echo", min_instances=2, max_instances=2, policy="fixed")], run_loop=False)
    client = OffloadClient(dep.multiplexer)
    keys = [(1, 1, int(ProtocolId.ECHO), i) for i in range(1, 5)]
    client.open_sessions([(k, "echo", {}, False) for k in keys])
    for i in range(2000):
        client.send(keys[i % 4], b"ping")
    client.drain()
    for _ in range(3):
        ray.get(dep.vpsm.step.remote())
        time.sleep(0.3)
    files = ray.get(dep.vpsm.flush_telemetry.remote())
    assert files and all(Path(f).parent.name.startswith("hour=") for f in files)
    table = read_telemetry(tmp_path / "telemetry")
    assert table.schema.equals(INSTANCE_SCHEMA)
    assert pq.read_table(files[0]).num_rows >= 2
    rows = table.to_pylist()
    assert {r["instance_id"] for r in rows} == set(ray.get(dep.vpsm.instance_handles.remote()))
    assert max(r["frames_in"] for r in rows) > 0 and all(r["rss_bytes"] > 0 for r in rows)
    # A custom metric on the node's metrics endpoint (the one the dashboard and Prometheus read).
    url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
    deadline = time.time() + 40
    body = ""
    while time.time() < deadline:
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            body = ""
        if "ray_apsv_instance_frames_total" in body and "ray_apsv_message_latency_ms" in body:
            break
        time.sleep(1)
    assert "ray_apsv_instance_frames_total" in body
    assert "ray_apsv_message_latency_ms_bucket" in body


def test_bad_session_config_is_refused_by_name(deployment: Any) -> None:
    dep = deployment([bgp_plan(1)], run_loop=False)
    client = OffloadClient(dep.multiplexer)
    key = (1, 1, int(ProtocolId.BGP), 1)
    placed = client.open_sessions([(key, "bgp", {"local_as": 65000, "router_id": "nope", "peer_as": 1}, False)])
    assert placed[key].startswith("error") and "router_id" in placed[key]
    # ... and a batch naming an unknown session is counted, not crashed on.
    client._seq[key] = 0  # the client's own numbering for the refused session
    client.send(key, b"\xff" * 19, FrameKind.DATA)
    client.drain()
    assert ray.get(dep.multiplexer.stats.remote())["unknown_session"] == 1


def test_concurrent_clients_do_not_interfere(deployment: Any) -> None:
    dep = deployment([ProtocolPlan("echo", min_instances=2, max_instances=2, policy="fixed")], run_loop=False)
    results: dict[int, int] = {}

    def run(tenant: int) -> None:
        client = OffloadClient(dep.multiplexer)
        keys = [(tenant, 1, int(ProtocolId.ECHO), i) for i in range(1, 4)]
        client.open_sessions([(k, "echo", {}, False) for k in keys])
        for i in range(3000):
            client.send(keys[i % 3], tenant.to_bytes(2, "big") + i.to_bytes(4, "big"))
        client.drain()
        results[tenant] = client.stats.outputs

    threads = [threading.Thread(target=run, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {1: 3000, 2: 3000}

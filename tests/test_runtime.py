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
from apsv.runtime.driver import (
    ReplaySession,
    load_streams,
    local_digests,
    plan_sessions,
    replay,
    session_infos,
    verify,
)
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
        **{"rebalance_by": "sessions", **kw},  # the tests count moves exactly
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
    infos = session_infos(dep)
    assert verify(sessions, infos, reference) == []
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


def test_replay_matches_in_process(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str]
) -> None:
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
    dep: Any, sessions: list[ReplaySession], actions: dict[float, Callable[[], Any]], transport: str = "shm"
) -> tuple[OffloadClient, list[Any]]:
    """Replay, firing each action (without waiting for it) when that fraction of frames is sent."""
    pool = BufferPool(slots=8, slot_bytes=64 << 10, shared=transport == "shm")
    client = OffloadClient(dep.multiplexer, pool, max_inflight=4)
    assert client.transport == transport
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


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_scale_1_4_1_moves_every_session_live(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str], transport: str
) -> None:
    dep = deployment([bgp_plan(1)], run_loop=False)
    vpsm = dep.vpsm
    # Scale-ups and drains run while traffic flows: the calls are fired, not awaited, mid-replay.
    client, fired = _replay_with(
        dep,
        replay_sessions,
        {0.2: lambda: vpsm.scale_to.remote("bgp", 4), 0.55: lambda: vpsm.scale_to.remote("bgp", 1)},
        transport,
    )
    assert ray.get(fired) == [4, 1]
    stats = ray.get(dep.multiplexer.stats.remote())
    status = ray.get(vpsm.status.remote())
    destroyed = [e for e in status["events"] if e["event"] == "destroy"]
    # one rebalance after growing, one after the drains (nothing left to even out on one instance)
    rebalanced, after_drains = [e for e in status["events"] if e["event"] == "rebalance"]
    assert len(destroyed) == 3 and after_drains["moved"] == 0
    # 1 -> 4 moved 3/4 of the sessions onto the new instances; 4 -> 1 drained the original
    # (oldest of equals) and two new ones: every session moved at least once, while traffic flowed.
    assert rebalanced["moved"] == 150 and sum(e["moved"] for e in destroyed) == 150
    assert stats["moves"] == 300
    moved = ray.get(dep.multiplexer.moved_sessions.remote())
    assert moved == len(replay_sessions)
    check_sessions(dep, replay_sessions, reference)
    assert client.stats.repeated_outputs == 0


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_killed_instance_recovers_its_sessions(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str], transport: str
) -> None:
    dep = deployment([bgp_plan(3)], run_loop=False)
    handles = ray.get(dep.vpsm.instance_handles.remote())
    victim_id, victim = sorted(handles.items())[0]

    def kill() -> str:
        ray.kill(victim, no_restart=True)
        return str(victim_id)

    _client, fired = _replay_with(dep, replay_sessions, {0.4: kill}, transport)
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


class BackloggedPair:
    """Two echo instances; two sessions on the same one, `n` frames each of 5 ms queued there
    (three seconds of backlog), the echoes recorded per session."""

    n = 300

    def __init__(self, deployment: Any, tenant: int, transport: str = "shm", **kw: Any) -> None:
        self.dep = dep = deployment(
            [ProtocolPlan("echo", min_instances=2, max_instances=2, policy="fixed")], run_loop=False, **kw
        )
        self.got: dict[tuple[int, int, int, int], list[bytes]] = {}
        pool = BufferPool(slots=64, slot_bytes=4 << 10, shared=transport == "shm")
        self.client = OffloadClient(dep.multiplexer, pool, max_inflight=64, on_output=self._output)
        keys = [(tenant, 1, int(ProtocolId.ECHO), i) for i in range(1, 9)]
        self.client.open_sessions([(k, "echo", {"delay_ms": 5.0}, False) for k in keys])
        routes = ray.get(dep.multiplexer.routes_table.remote())
        self.src, here = max(routes.items(), key=lambda kv: len(kv[1]))
        (self.other,) = [i for i in ray.get(dep.vpsm.instance_handles.remote()) if i != self.src]
        self.mover, self.stays = tuple(here[0]), tuple(here[1])
        for i in range(self.n):
            self.client.send(self.mover, b"m%05d" % i)
            self.client.send(self.stays, b"s%05d" % i)
        self.client.flush()
        deadline = time.time() + 30
        while self.queued(self.src) < 2 * self.n - 100:
            assert time.time() < deadline, "the frames never reached the source instance"
            time.sleep(0.01)

    def _output(self, f: Any) -> None:
        if f.kind == FrameKind.SEND:
            self.got.setdefault((f.tenant, f.vrouter, f.protocol, f.session), []).append(bytes(f.payload))

    def queued(self, iid: str) -> int:
        return int(ray.get(self.dep.multiplexer.instance_loads.remote())[iid]["inflight_frames"])

    def finish(self) -> None:
        """Drain; poll for the moved frames' output (it comes outside the submits)."""
        self.client.drain()
        deadline = time.time() + 30
        while len(self.got.get(self.mover, [])) < self.n and time.time() < deadline:
            self.client.poll()
            time.sleep(0.01)

    def echoed_once_in_order(self) -> bool:
        return all(
            self.got[k] == [tag + b"%05d" % i for i in range(self.n)]
            for k, tag in ((self.mover, b"m"), (self.stays, b"s"))
        )

    def session_info(self, iid: str) -> dict[str, Any]:
        return dict(ray.get(ray.get(self.dep.vpsm.instance_handles.remote())[iid].session_info.remote(self.mover)))


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_a_move_off_a_backlogged_instance_takes_its_backlog_along(deployment: Any, transport: str) -> None:
    """A session leaving an instance with seconds of batches queued goes now, not after them:
    its queued frames are skipped there and applied at its new instance - each once, in order."""
    p = BackloggedPair(deployment, 3, transport)
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.other))
    assert p.queued(p.src) > p.n // 2  # the move is done while most of the backlog is still queued
    p.finish()
    stats = ray.get(p.dep.multiplexer.stats.remote())
    skipped = ray.get(ray.get(p.dep.vpsm.instance_handles.remote())[p.src].load.remote())
    assert stats["moves_in_order"] == 0 and stats["move_redelivered"] > p.n // 4
    # what the source skipped is exactly what was sent again to the new instance
    assert skipped["departed"] == stats["move_redelivered"] and skipped["unknown_session"] == 0
    info = p.session_info(p.other)
    assert info["messages"] == p.n and info["duplicates"] == 0  # applied once each, across both instances
    assert p.echoed_once_in_order()


def test_a_session_moved_back_waits_behind_its_old_frames(deployment: Any) -> None:
    """A -> B ahead of A's queue, then straight back B -> A: batches still queued at A carry the
    session's old frames. The restore at A must wait behind them (they are skipped there), or
    A would apply them before the redelivered earlier ones - which it would then drop."""
    p = BackloggedPair(deployment, 4)
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.other))
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.src))
    assert ray.get(p.dep.multiplexer.route_of.remote(p.mover)) == p.src
    p.finish()
    info = p.session_info(p.src)
    assert info["messages"] == p.n and info["gaps"] == 0
    assert p.echoed_once_in_order()


def test_a_move_without_all_frames_retained_waits_its_turn(deployment: Any) -> None:
    """With the frames sent since the last snapshot no longer all retained (the bound overflowed),
    what the source has queued could not be redelivered: the move waits behind that queue."""
    p = BackloggedPair(deployment, 5, max_retained_chunks=2)
    assert ray.get(p.dep.multiplexer.stats.remote())["retained_dropped"] > 0
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.other))
    stats = ray.get(p.dep.multiplexer.stats.remote())
    assert stats["moves_in_order"] == 1 and stats["move_redelivered"] == 0
    p.finish()
    skipped = ray.get(ray.get(p.dep.vpsm.instance_handles.remote())[p.src].load.remote())
    assert skipped["departed"] == 0  # every frame sent to the source was applied there
    info = p.session_info(p.other)
    assert info["messages"] == p.n and info["duplicates"] == 0
    assert p.echoed_once_in_order()


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


def test_a_client_cannot_reach_another_clients_sessions(deployment: Any) -> None:
    """Tenant isolation on the data path: frames naming a session another client opened are
    dropped and counted by the multiplexer, whatever transport they came by."""
    dep = deployment([ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed")], run_loop=False)
    owner = OffloadClient(dep.multiplexer)
    key = (1, 1, int(ProtocolId.ECHO), 1)
    owner.open_sessions([(key, "echo", {}, False)])
    owner.send(key, b"hello")
    owner.drain()
    for shared in (True, False):
        intruder = OffloadClient(dep.multiplexer, BufferPool(slots=2, slot_bytes=4096, shared=shared))
        intruder._seq[key] = 100  # forge frames for the owner's session, ahead of its numbering
        for _ in range(5):
            intruder.send(key, b"injected")
        intruder.close()
        assert intruder.stats.outputs == 0
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["foreign_frames"] == 10
    (handle,) = ray.get(dep.vpsm.instance_handles.remote()).values()
    info = ray.get(handle.session_info.remote(key))
    assert (info["frames"], info["last_seq"], info["messages"]) == (1, 1, 1)
    owner.send(key, b"still mine")  # and the owner's numbering carries on untouched
    owner.close()
    assert owner.stats.outputs == 2


# ------------------------------------------------------------------------------------------------
# The Docker backend, on a real engine (scripts/start-docker.sh starts one; CI runs these).


def docker_engine() -> Any:
    from apsv.runtime.docker_backend import docker_client

    try:
        client = docker_client()
        client.ping()
        return client
    except Exception as e:
        pytest.fail(f"no Docker engine answers ({e}); run scripts/start-docker.sh - these tests must not be skipped")


@pytest.mark.docker
def test_docker_backend_replay_with_locked_down_containers(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str]
) -> None:
    engine = docker_engine()
    plan = ProtocolPlan(
        "bgp",
        backend="docker",
        min_instances=3,
        max_instances=3,
        allocation=Allocation(cpu=0.5, memory_bytes=256 << 20),
        policy="fixed",
    )
    dep = deployment([plan], run_loop=False)
    handles = ray.get(dep.vpsm.instance_handles.remote())
    assert {ray.get(h.ready.remote())["backend"] for h in handles.values()} == {"docker"}
    # The engine's own view of every instance's container.
    containers = [c for c in engine.containers.list() if c.labels.get("apsv.instance") in handles]
    assert len(containers) == 3
    for c in containers:
        hc = c.attrs["HostConfig"]
        assert hc["NanoCpus"] == 500_000_000 and hc["Memory"] == 256 << 20
        assert hc["NetworkMode"] == "none" and hc["CapDrop"] == ["ALL"] and hc["ReadonlyRootfs"] is True
        assert "no-new-privileges" in hc["SecurityOpt"] and hc["PidsLimit"] == 64
        assert c.attrs["Config"]["User"] == "65534:65534"
    # Same replay, same RIBs as in-process.
    client = OffloadClient(dep.multiplexer)
    open_all(client, replay_sessions)
    replay(client, replay_sessions)
    check_sessions(dep, replay_sessions, reference)
    loads = [ray.get(h.load.remote()) for h in handles.values()]
    assert all(x["backend"] == "docker" and 0 < x["rss_bytes"] < 256 << 20 and x["cpu_seconds"] > 0 for x in loads)


@pytest.mark.docker
def test_docker_killed_container_recovers(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str]
) -> None:
    engine = docker_engine()
    plan = bgp_plan(3, backend="docker")
    dep = deployment([plan], run_loop=False)
    handles = ray.get(dep.vpsm.instance_handles.remote())
    victim_id = sorted(handles)[0]
    (victim,) = [c for c in engine.containers.list() if c.labels.get("apsv.instance") == victim_id]

    def kill() -> str:
        victim.kill()
        return str(victim_id)

    _replay_with(dep, replay_sessions, {0.4: kill})
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["recoveries"] == 1 and stats["sessions_recovered"] > 0
    check_sessions(dep, replay_sessions, reference)

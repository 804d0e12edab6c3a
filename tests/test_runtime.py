"""The Ray runtime on a real local Ray cluster: replay, live moves, failures, backpressure, telemetry.

Frames go from each client straight to the instances (the multiplexer is the control plane only);
every test checks that each frame is applied exactly once, in order, whatever moved or died."""

from __future__ import annotations

import os
import signal
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
from apsv.runtime.instance import Allocation
from apsv.runtime.recorded_sessions import (
    ReplaySession,
    load_streams,
    local_digests,
    plan_sessions,
    replay,
    session_infos,
    verify,
)
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


def instance_loads(dep: Any) -> list[dict[str, Any]]:
    handles = ray.get(dep.vpsm.instance_handles.remote())
    return list(ray.get([h.load.remote() for h in handles.values()]))


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
    loads = instance_loads(dep)
    assert sum(x["frames_in"] for x in loads) == res.frames  # nothing refused, nothing sent twice
    assert sum(x["unknown_session"] + x["departed"] + x["stale"] + x["out_of_order"] for x in loads) == 0
    assert client.stats.refused == 0 and client.stats.frames_resent == 0
    assert client.transport == "shm" and client.stats.payload_copies == 0


def _replay_with(
    dep: Any, sessions: list[ReplaySession], actions: dict[float, Callable[[], Any]], transport: str = "shm"
) -> tuple[OffloadClient, list[Any]]:
    """Replay, firing each action (without waiting for it) when that fraction of frames is sent."""
    pool = BufferPool(slots=8, slot_bytes=64 << 10, shared=transport == "shm")
    client = OffloadClient(dep.multiplexer, pool, max_inflight=4, transport=transport)
    open_all(client, sessions)
    assert client.transport == transport
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
    assert stats["moves"] == 300 and stats["move_failed"] == 0
    moved = ray.get(dep.multiplexer.moved_sessions.remote())
    assert moved == len(replay_sessions)
    check_sessions(dep, replay_sessions, reference)
    assert client.stats.repeated_outputs == 0


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_killed_instance_recovers_its_sessions(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str], transport: str
) -> None:
    """Kill -9 one of three instances mid-replay: its sessions are restored on the others from
    their client's custody (snapshot + the frames since), each frame still applied once."""
    dep = deployment([bgp_plan(3)], run_loop=False)
    handles = ray.get(dep.vpsm.instance_handles.remote())
    victim_id, victim = sorted(handles.items())[0]

    def kill() -> str:
        ray.kill(victim, no_restart=True)
        return str(victim_id)

    client, fired = _replay_with(dep, replay_sessions, {0.4: kill}, transport)
    assert fired == [victim_id]
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["recoveries"] == 1 and stats["sessions_recovered"] > 0
    assert client.stats.restores == stats["sessions_recovered"] and client.stats.links_lost >= 1
    loads = ray.get(dep.multiplexer.instance_loads.remote())
    assert loads[victim_id]["alive"] is False
    routes = ray.get(dep.multiplexer.routes_table.remote())
    assert victim_id not in routes  # every session now lives elsewhere
    totals = check_sessions(dep, replay_sessions, reference)
    # Frames sent again that the restored sessions already had were dropped, not applied twice.
    assert totals["duplicates_dropped"] <= client.stats.frames_resent


def test_overload_slows_the_sender_with_bounded_memory(deployment: Any) -> None:
    """A slow instance: its window (the buffer quota each client may have in flight to it) and
    the client's pool hold memory flat, the sender waits (counted), and every frame still arrives."""
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
    assert client.stats.outputs == 6000  # every echo came back: nothing dropped
    assert pool.stats.max_in_use <= pool.slots and client.stats.inflight_waits > 0  # the sender was held back
    assert elapsed > 6000 * 0.2e-3 * 0.9  # paced by the slow stack, not by the sender
    assert max(rss) - min(rss) < 64 << 20  # memory flat while 5 MB of payload went through
    (load,) = instance_loads(dep)
    assert load["queue_depth"] == 0 and load["frames_in"] == 6000


def test_a_slow_instance_does_not_hold_back_the_others(deployment: Any) -> None:
    """One instance at its window stalls only the frames sent to it: another instance's sessions
    of the same client go on meanwhile (the data path has no shared lock or queue)."""
    plan = ProtocolPlan(
        "echo",
        min_instances=2,
        max_instances=2,
        allocation=Allocation(cpu=0.25, buffer_quota_bytes=1024),
        policy="fixed",
    )
    dep = deployment([plan], run_loop=False)
    got: dict[int, int] = {1: 0, 2: 0}

    def output(f: Any) -> None:
        if f.kind == FrameKind.SEND:
            got[f.session] += 1

    pool = BufferPool(slots=32, slot_bytes=4 << 10, shared=True)
    client = OffloadClient(dep.multiplexer, pool, max_inflight=32, on_output=output)
    slow, fast = (9, 1, int(ProtocolId.ECHO), 1), (9, 1, int(ProtocolId.ECHO), 2)
    client.open_sessions([(slow, "echo", {"delay_ms": 50.0}, 0)])
    where = ray.get(dep.multiplexer.route_of.remote(slow))
    (other,) = [i for i in ray.get(dep.vpsm.instance_handles.remote()) if i != where]
    client.open_sessions([(fast, "echo", {}, 0)])
    ray.get(dep.multiplexer.move_session.remote(fast, other))
    client.send(fast, b"hello")  # its old route is refused there (moved): it learns the new one
    client.drain()
    for i in range(100):  # 5 s of work for the slow instance, in batches beyond its window
        client.send(slow, b"s%04d" % i)
        if i % 10 == 9:
            client.flush()
    assert client.can_send(8, slow) is False  # its window is full: an agent reads no more for it
    assert client.can_send(8, fast) is True
    for i in range(200):  # one at a time, each waited for
        client.send(fast, b"f%04d" % i)
        client.flush()
        deadline = time.time() + 30
        while got[2] < i + 2:
            assert time.time() < deadline
            client.wait(0.01)
    assert got[1] < 100  # all 200 came back while the slow instance was still working
    client.drain()
    assert got == {1: 100, 2: 201} and client.stats.window_waits > 0


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
        self.client = OffloadClient(dep.multiplexer, pool, max_inflight=64, on_output=self._output, transport=transport)
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
        while self.queued(self.src) < 2 * self.n - 100 and (transport == "shm" or self.applied(self.src) < 2):
            assert time.time() < deadline, "the frames never reached the source instance"
            time.sleep(0.01)

    def _output(self, f: Any) -> None:
        if f.kind == FrameKind.SEND:
            self.got.setdefault((f.tenant, f.vrouter, f.protocol, f.session), []).append(bytes(f.payload))

    def queued(self, iid: str) -> int:
        return int(ray.get(ray.get(self.dep.vpsm.instance_handles.remote())[iid].load.remote())["queue_depth"])

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

    def applied(self, iid: str) -> int:
        return int(ray.get(ray.get(self.dep.vpsm.instance_handles.remote())[iid].load.remote())["frames_in"])

    def session_info(self, iid: str) -> dict[str, Any]:
        return dict(ray.get(ray.get(self.dep.vpsm.instance_handles.remote())[iid].session_info.remote(self.mover)))


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_a_move_off_a_backlogged_instance_takes_its_backlog_along(deployment: Any, transport: str) -> None:
    """A session leaving an instance with seconds of batches queued goes now, not after them:
    its queued frames are refused there (fencing: it moved) and re-sent by the client from
    custody to its new instance - each applied once, in order."""
    p = BackloggedPair(deployment, 3, transport)
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.other))
    if transport == "shm":  # (across nodes the queue is Ray's own, not measured by the instance)
        assert p.queued(p.src) > p.n // 2  # the move is done while most of the backlog is still queued
    p.finish()
    skipped = ray.get(ray.get(p.dep.vpsm.instance_handles.remote())[p.src].load.remote())
    assert skipped["departed"] > p.n // 4 and skipped["unknown_session"] == 0
    assert p.client.stats.frames_resent >= skipped["departed"]
    info = p.session_info(p.other)
    assert info["messages"] == p.n and info["frames"] == p.n  # applied once each, across both instances
    assert p.echoed_once_in_order()


def test_a_session_moved_back_waits_behind_its_old_frames(deployment: Any) -> None:
    """A -> B ahead of A's queue, then straight back B -> A: batches still queued at A carry the
    session's old frames at its old epoch. A refuses them (stale) and the client re-sends them at
    the new epoch, after those A has not seen - nothing applied twice or out of order."""
    p = BackloggedPair(deployment, 4)
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.other))
    ray.get(p.dep.multiplexer.move_session.remote(p.mover, p.src))
    assert ray.get(p.dep.multiplexer.route_of.remote(p.mover)) == p.src
    p.finish()
    info = p.session_info(p.src)
    assert info["messages"] == p.n and info["gaps"] == 0
    assert p.echoed_once_in_order()


def _two_batches_the_first_applying(client: OffloadClient, key: tuple[int, int, int, int], src: Any) -> None:
    """Send a0..a4 and b0..b4 as two batches to a slow (delay_ms) echo session and return once its
    instance is applying the first: the second is queued behind it, in flight."""
    for batch in (b"a", b"b"):
        for i in range(5):
            client.send(key, batch + b"%d" % i)
        client.flush()
    deadline = time.time() + 30
    while ray.get(src.load.remote())["frames_in"] < 1:
        assert time.time() < deadline
        client.wait(0.01)


def test_a_move_racing_a_batch_in_flight_is_fenced(deployment: Any) -> None:
    """Deterministic: batch 1 (5 frames of 100 ms) is being applied and batch 2 is queued behind
    it when the session is moved. The hand-over goes before batch 2 (moves wait for no queue),
    so batch 2's frames are refused there - the route's epoch changed - and sent again, by the
    new route, exactly once."""
    dep = deployment([ProtocolPlan("echo", min_instances=2, max_instances=2, policy="fixed")], run_loop=False)
    got: list[bytes] = []
    client = OffloadClient(
        dep.multiplexer, on_output=lambda f: got.append(bytes(f.payload)) if f.kind == FrameKind.SEND else None
    )
    key = (6, 1, int(ProtocolId.ECHO), 1)
    placed = client.open_sessions([(key, "echo", {"delay_ms": 100.0}, 0)])
    handles = ray.get(dep.vpsm.instance_handles.remote())
    src, dst = handles[placed[key]], next(h for i, h in handles.items() if i != placed[key])
    dst_id = next(i for i in handles if i != placed[key])
    _two_batches_the_first_applying(client, key, src)
    ray.get(dep.multiplexer.move_session.remote(key, dst_id))
    client.drain()
    s_load, d_load = ray.get(src.load.remote()), ray.get(dst.load.remote())
    assert s_load["frames_in"] == 10 and s_load["departed"] == 5  # batch 2: refused, all of it
    assert d_load["frames_in"] == 5 and d_load["duplicates"] == 0  # re-sent once, applied once
    assert client.stats.frames_resent == 5 and client.stats.refused == 1
    assert got == [b"a%d" % i for i in range(5)] + [b"b%d" % i for i in range(5)]
    info = ray.get(dst.session_info.remote(key))
    assert (info["messages"], info["last_seq"], info["epoch"]) == (10, 10, 2)


def test_a_hand_over_the_target_refuses_leaves_the_session_whole_at_its_source(deployment: Any) -> None:
    """The target is full, so it refuses the adoption after the source detached the session and
    refused a queued batch naming the target. The session is put back on its source at an epoch
    past the one its client followed, the client finds it there, and every frame is applied once,
    in order."""
    alloc = Allocation(cpu=0.25, max_sessions=1)
    dep = deployment(
        [ProtocolPlan("echo", min_instances=2, max_instances=2, policy="fixed", allocation=alloc)], run_loop=False
    )
    got: list[bytes] = []
    client = OffloadClient(
        dep.multiplexer, on_output=lambda f: got.append(bytes(f.payload)) if f.kind == FrameKind.SEND else None
    )
    key, other = (6, 2, int(ProtocolId.ECHO), 1), (6, 2, int(ProtocolId.ECHO), 2)
    placed = client.open_sessions([(key, "echo", {"delay_ms": 100.0}, 0), (other, "echo", {}, 0)])
    assert placed[key] != placed[other]  # one session each: the other instance is full
    handles = ray.get(dep.vpsm.instance_handles.remote())
    src = handles[placed[key]]
    _two_batches_the_first_applying(client, key, src)
    ray.get(dep.multiplexer.move_session.remote(key, placed[other]))
    client.drain()
    assert ray.get(dep.multiplexer.route_of.remote(key)) == placed[key]
    assert ray.get(dep.multiplexer.stats.remote())["move_failed"] == 1
    assert got == [b"a%d" % i for i in range(5)] + [b"b%d" % i for i in range(5)]
    info = ray.get(src.session_info.remote(key))
    assert (info["messages"], info["last_seq"], info["gaps"], info["duplicates"]) == (10, 10, 0, 0)
    assert info["epoch"] == 3  # past the epoch 2 its refused frames named


def test_custody_stays_bounded(deployment: Any) -> None:
    """A client's custody (snapshots + frames since) is bounded by octets: past a session's bound
    the client asks its instance for a snapshot and frees what it covers."""
    from apsv.runtime.custody import Custody

    dep = deployment([ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed")], run_loop=False)
    client = OffloadClient(dep.multiplexer, custody=Custody(max_bytes=1 << 20, session_bytes=64 << 10))
    key = (8, 1, int(ProtocolId.ECHO), 1)
    client.open_sessions([(key, "echo", {}, 0)])
    for _ in range(200):  # 200 frames of 4 KiB (snapshot_every is 256: none would come by itself)
        client.send(key, b"z" * 4096)
        client.flush()
    client.drain()
    c = client.custody.stats
    assert c.snapshots_requested > 0 and c.snapshots > 0
    assert client.custody.held(key) <= 2 * (64 << 10) and c.peak_bytes < 1 << 20
    assert client.stats.outputs == 200


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
    assert ray.get(dep.multiplexer.stats.remote())["sessions"] == 0
    # ... and a frame for it is refused by the client, by name, before it goes anywhere.
    with pytest.raises(KeyError, match="not open"):
        client.send(key, b"\xff" * 19, FrameKind.DATA)


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
    """Tenant isolation where the frames now go - at the instance: a client's connection is bound
    to its name by its credential, and frames naming a session another client opened are dropped
    and counted there, whatever transport they came by; claiming another's name is refused."""
    from apsv.runtime.links import LinkDown, ShmLink
    from apsv.runtime.outbox import Session

    dep = deployment([ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed")], run_loop=False)
    owner = OffloadClient(dep.multiplexer)
    key = (1, 1, int(ProtocolId.ECHO), 1)
    placed = owner.open_sessions([(key, "echo", {}, False)])
    owner.send(key, b"hello")
    owner.drain()
    (handle,) = ray.get(dep.vpsm.instance_handles.remote()).values()
    for transport in ("shm", "object_store"):
        intruder = OffloadClient(dep.multiplexer, transport=transport)
        # forge a route to the owner's session, ahead of its numbering, in the intruder's own name
        forged = intruder.sessions[key] = Session(key, "echo", {}, 0)
        intruder.custody.add(key)
        intruder.endpoints.update(owner.endpoints)
        forged.seq, forged.epoch, forged.hold = 100, 1, False
        forged.link = intruder._link_to(placed[key])
        for _ in range(5):
            intruder.send(key, b"injected")
        intruder.close()
        assert intruder.stats.outputs == 0
    assert ray.get(handle.load.remote())["foreign"] == 10
    info = ray.get(handle.session_info.remote(key))
    assert (info["frames"], info["last_seq"], info["messages"]) == (1, 1, 1)
    # claiming the owner's name without its credential: the connection is refused
    endpoint = owner.endpoints[placed[key]]["endpoint"]
    with pytest.raises(LinkDown, match="credential refused"):
        ShmLink(placed[key], endpoint, owner.client_id, b"\0" * 32, "")
    with pytest.raises(ray.exceptions.RayTaskError, match="credential refused"):
        ray.get(handle.rx_poll.remote(owner.client_id, b"\0" * 32))
    owner.send(key, b"still mine")  # and the owner's numbering carries on untouched
    owner.close()
    assert owner.stats.outputs == 2


# ------------------------------------------------------------------------------------------------
# The Docker backend, on a real engine (scripts/start-docker.sh starts one; CI runs these).


def docker_engine() -> Any:
    from apsv.runtime.stack_image import docker_client

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
    assert client.transport == "shm"  # to the instance actor; it relays the frames over its container socket
    loads = [ray.get(h.load.remote()) for h in handles.values()]
    assert all(x["backend"] == "docker" and 0 < x["rss_bytes"] < 256 << 20 and x["cpu_seconds"] > 0 for x in loads)


@pytest.mark.docker
@pytest.mark.parametrize("fault", ["kill", "pause", "kill_actor"])
def test_docker_failed_container_recovers(
    deployment: Any, replay_sessions: list[ReplaySession], reference: dict[Any, str], fault: str
) -> None:
    """A container killed, one that stops answering (docker pause) until a call has waited its
    `call_deadline_s`, or its instance actor's process killed: the instance ends, its sessions
    are restored on the others, none loses a frame, and the container is gone (a paused one
    cannot come back with stale sessions; an orphaned one sees its actor's connection close)."""
    from apsv.runtime.docker_backend import reap_socket_dirs

    engine = docker_engine()
    plan = ProtocolPlan(
        "bgp",
        backend="docker",
        min_instances=3,
        max_instances=8,
        allocation=Allocation(cpu=0.25, memory_bytes=512 << 20, call_deadline_s=3.0),
        policy="fixed",
        rebalance_by="sessions",
    )
    dep = deployment([plan], run_loop=False)
    handles = ray.get(dep.vpsm.instance_handles.remote())
    victim_id = sorted(handles)[0]
    (victim,) = [c for c in engine.containers.list() if c.labels.get("apsv.instance") == victim_id]

    def act() -> str:
        if fault == "kill_actor":
            os.kill(ray.get(handles[victim_id].pid.remote()), signal.SIGKILL)
        else:
            victim.kill() if fault == "kill" else victim.pause()
        return str(victim_id)

    client, _ = _replay_with(dep, replay_sessions, {0.4: act})
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["recoveries"] == 1 and stats["sessions_recovered"] > 0
    assert client.stats.restores == stats["sessions_recovered"]
    check_sessions(dep, replay_sessions, reference)

    def left() -> list[str]:
        return [c.status for c in engine.containers.list(all=True) if c.labels.get("apsv.instance") == victim_id]

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == []
    if fault == "kill_actor":  # its socket directory, which its shutdown never removed: reaped
        assert reap_socket_dirs(engine) == 1

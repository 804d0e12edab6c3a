"""The control plane dies; the data path goes on (real local Ray, kill -9 of the actors' processes).

The multiplexer and the VPSM are restarted by Ray and rebuild their state (the multiplexer from
its plan and the instances, the VPSM from its persisted state) while an MRT replay of 200
sessions runs: every frame is still applied exactly once, in order, every Loc-RIB equals the
in-process replay, and a new session opens once they are back. Opening a session while the
multiplexer is gone waits, and fails by name after its bound.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray

from apsv.bench.restart import DUMPS, kill, replay_with_kill
from apsv.frame import ProtocolId
from apsv.runtime.client import OffloadClient
from apsv.runtime.instance import Allocation
from apsv.runtime.recorded_sessions import ReplaySession, load_streams, local_digests, plan_sessions
from apsv.runtime.tenancy import TenantQuota, TenantQuotas
from apsv.runtime.vpsm import ProtocolPlan
from tests.conftest import shared_data_dir

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sessions() -> list[ReplaySession]:
    streams = load_streams([shared_data_dir() / d for d in DUMPS], min_messages=20)
    return plan_sessions(streams, sessions=200, vrouters=20)


@pytest.fixture(scope="module")
def reference(sessions: list[ReplaySession]) -> dict[Any, str]:
    return local_digests(sessions)


def plan() -> ProtocolPlan:
    return ProtocolPlan(
        "bgp", min_instances=3, max_instances=3, policy="fixed", allocation=Allocation(cpu=0.25, memory_bytes=512 << 20)
    )


@pytest.mark.parametrize("case", ["multiplexer", "vpsm", "both"])
def test_control_plane_killed_mid_replay(
    deployment: Any, sessions: list[ReplaySession], reference: dict[Any, str], case: str
) -> None:
    dep = deployment([plan()], run_loop=True)
    instances = set(ray.get(dep.vpsm.instance_handles.remote()))
    r = replay_with_kill(dep, sessions, reference, case)
    print(f"kill -9 {case}: {r}")
    assert r["lost_or_wrong"] == 0, r["problems"]
    assert r["new_session_opened"]
    # nothing was refused: the sessions never left their instances, the routes held meanwhile
    assert r["refused"] == 0 and r["frames_resent"] == 0
    if case != "vpsm":
        assert r["multiplexer"]["restarts"] == 1 and r["multiplexer"]["rebuilt_sessions"] == len(sessions)
    status = ray.get(dep.vpsm.status.remote())
    assert set(status["instances"]) == instances  # the VPSM took its instances up again, no more, no fewer
    assert status["restarts"] == (1 if case != "multiplexer" else 0)


def test_opening_a_session_waits_for_the_multiplexer(deployment: Any) -> None:
    """While the multiplexer restarts, opening a session waits and then succeeds; the client's
    tenant and the tenant's quota hold across the restart; a multiplexer that does not come back
    is reported by name after the bound."""
    dep = deployment(
        [ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed")],
        run_loop=False,
        tenants=TenantQuotas(TenantQuota(max_sessions=2)),
    )
    client = OffloadClient(dep.multiplexer, tenant=4)
    key = (4, 1, int(ProtocolId.ECHO), 1)
    client.open_sessions([(key, "echo", {}, 0)])
    kill(dep.multiplexer)
    other = (4, 1, int(ProtocolId.ECHO), 2)
    assert not client.open_sessions([(other, "echo", {}, 0)])[other].startswith("error")
    # rebuilt from the instances: two sessions of tenant 4, its quota; the client is still tenant 4's
    over, foreign = (4, 1, int(ProtocolId.ECHO), 9), (5, 1, int(ProtocolId.ECHO), 1)
    answer = client.open_sessions([(over, "echo", {}, 0), (foreign, "echo", {}, 0)])
    assert answer[over] == "error: tenant 4 is at its quota of 2 sessions"
    assert answer[foreign].startswith("error: session (5, 1, 255, 1) is of tenant 5, not 4")
    assert ray.get(dep.multiplexer.stats.remote())["tenant_sessions"] == {"4": 2}
    for k in (key, other):
        client.send(k, b"after the restart")
    client.drain()
    assert client.stats.outputs == 2
    ray.kill(dep.multiplexer, no_restart=True)
    # ray.kill is asynchronous: a call made at once may still be served (it was, once, on a
    # loaded machine). Wait until the multiplexer is gone, then ask.
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        try:
            ray.get(dep.multiplexer.stats.remote(), timeout=10.0)
        except ray.exceptions.RayActorError:
            break
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    with pytest.raises(TimeoutError, match="multiplexer"):
        client.open_sessions([((4, 1, int(ProtocolId.ECHO), 3), "echo", {}, 0)], timeout=1.0)
    client.release()


@ray.remote(num_cpus=0)
class _ClientProcess:
    """An offload client in a process of its own (as an agent's actor is), to be killed."""

    def __init__(self, multiplexer: Any, tenant: int) -> None:
        self.client = OffloadClient(multiplexer, tenant=tenant)

    def open(self, keys: list[Any]) -> list[str]:
        return list(self.client.open_sessions([(k, "echo", {}, 0) for k in keys]).values())


def test_sessions_of_a_client_that_dies_are_reaped(deployment: Any) -> None:
    """A client whose process dies stops watching its routes; after the lease the multiplexer
    closes its sessions (counted) and its tenant's quota is free again. A live client that sends
    nothing keeps its sessions: its route watch stays out while it idles. A client that closes
    and leaves its sessions open on purpose keeps them, across a multiplexer restart too."""
    dep = deployment(
        [ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed")],
        run_loop=False,
        tenants=TenantQuotas(TenantQuota(max_sessions=3)),
        client_lease_s=3.0,
    )
    im = dep.multiplexer
    echo = int(ProtocolId.ECHO)
    doomed = _ClientProcess.remote(im, 6)  # type: ignore[attr-defined]
    keys = [(6, 1, echo, s) for s in range(1, 4)]
    assert not any(v.startswith("error") for v in ray.get(doomed.open.remote(keys)))
    idle = OffloadClient(im, tenant=7)
    mine = (7, 1, echo, 1)
    idle.open_sessions([(mine, "echo", {}, 0)])
    ray.kill(doomed)
    deadline = time.monotonic() + 60
    while (stats := ray.get(im.stats.remote()))["sessions_reaped"] < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (stats["clients_reaped"], stats["sessions_reaped"]) == (1, 3), stats
    assert stats["tenant_sessions"] == {"7": 1}
    time.sleep(4.0)  # past another lease: the idle client, which never pumped, is not taken for dead
    assert ray.get(im.stats.remote())["clients_reaped"] == 1
    (handle,) = ray.get(dep.vpsm.instance_handles.remote()).values()  # the sessions left their instance
    assert [r[0] for r in ray.get(handle.sessions_report.remote())] == [mine]
    again = OffloadClient(im, tenant=6)  # tenant 6's quota is free again
    placed = again.open_sessions([(k, "echo", {}, 0) for k in keys])
    assert not any(v.startswith("error") for v in placed.values()), placed
    idle.send(mine, b"still here")
    idle.drain()
    assert idle.stats.outputs == 1
    # a client that closes leaving its sessions open (`apsv replay --keep`) keeps them, across a
    # restart of the multiplexer too; the live clients take their leases up again after it
    keeper = OffloadClient(im, tenant=8)
    keeper.open_sessions([((8, 1, echo, 1), "echo", {}, 0)])
    keeper.close()
    kill(im)
    time.sleep(8.0)  # two leases
    stats = ray.get(im.stats.remote())
    assert stats["restarts"] == 1 and stats["clients_reaped"] == 0, stats
    assert stats["tenant_sessions"] == {"6": 3, "7": 1, "8": 1}
    idle.send(mine, b"after the restart")
    idle.drain()
    assert idle.stats.outputs == 2
    again.release()
    idle.release()

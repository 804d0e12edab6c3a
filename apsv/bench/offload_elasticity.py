"""How fast the offload path changes shape: an instance's start (and a bare Ray actor's, the
floor under it) and a session's live move between instances."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import ray

from apsv.bench.offload_baseline import PAYLOAD
from apsv.frame import ProtocolId
from apsv.runtime.client import OffloadClient
from apsv.runtime.cluster import deploy
from apsv.runtime.instance import Allocation
from apsv.runtime.vpsm import ProtocolPlan


def instance_start(backend: str) -> float | str:
    """Median seconds from the VPSM's decision to a ready, registered instance (3 starts)."""
    if backend == "docker":
        try:
            from apsv.runtime.stack_image import docker_client, ensure_image

            ensure_image(docker_client())  # image build is a one-off, not part of a start
        except Exception as e:
            return f"unavailable: {e}"
    plan = ProtocolPlan(
        "echo", backend=backend, min_instances=1, max_instances=4, policy="fixed", allocation=Allocation(cpu=0.25)
    )
    dep = deploy([plan], suffix=f"-start-{backend}", run_loop=False)
    try:
        ray.get(dep.vpsm.scale_to.remote("echo", 4))
        status = ray.get(dep.vpsm.status.remote())
        starts = [e["start_s"] for e in status["events"] if e["event"] == "instantiate"]
        return float(round(statistics.median(starts[1:] or starts), 3))
    finally:
        dep.stop()


@ray.remote(num_cpus=0.25)
class _Bare:
    def ready(self) -> bool:
        return True


def bare_actor_start(starts: int = 3) -> float:
    """Median seconds for Ray to start bare detached actors of an instance's size and have each
    answer a call, `starts` at once as `instance_start` starts its instances: the floor under it,
    on the same machine, in the same run."""
    t0 = time.perf_counter()
    actors = [
        _Bare.options(name=f"apsv-bench-bare-{os.getpid()}-{i}", lifetime="detached").remote()  # type: ignore[attr-defined]
        for i in range(starts)
    ]
    pending = [a.ready.remote() for a in actors]
    times = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        times += [time.perf_counter() - t0] * len(done)
    for a in actors:
        ray.kill(a)
    return float(round(statistics.median(times), 3))


def move_time(dep: Any, moves: int = 20) -> float:
    """Median time of a live move (hand-over between instances, route published)."""
    client = OffloadClient(dep.multiplexer)
    keys = [(3, 1, int(ProtocolId.ECHO), i) for i in range(1, moves + 1)]
    placed = client.open_sessions([(k, "echo", {}, 0) for k in keys])
    instances = sorted(ray.get(dep.multiplexer.instance_loads.remote()))
    times = []
    for k in keys:
        for _i in range(50):
            client.send(k, PAYLOAD)
        client.flush()
        dst = next(i for i in instances if i != placed[k])
        t0 = time.perf_counter()
        ray.get(dep.multiplexer.move_session.remote(k, dst))
        times.append(time.perf_counter() - t0)
    client.drain()
    client.close()
    return round(statistics.median(times) * 1000, 2)

"""The offload path's rates: client -> stack instances -> back, the frames in the client's pool;
also to a containerised instance, and with real BGP updates."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from apsv.bench.cpu_meter import CpuMeter
from apsv.bench.offload_baseline import INFLIGHT, PAYLOAD, SLOT
from apsv.frame import ProtocolId
from apsv.runtime.buffer_pool import BufferPool
from apsv.runtime.client import OffloadClient
from apsv.runtime.cluster import deploy
from apsv.runtime.instance import Allocation
from apsv.runtime.vpsm import ProtocolPlan


def echo_path(
    dep: Any,
    frames: int,
    sessions: int = 64,
    slot_bytes: int = 256 << 10,
    vrouter: int = 1,
    transport: str | None = None,
    meter: dict[str, list[int]] | None = None,
) -> tuple[float, OffloadClient, dict[str, float]]:
    """Frames/s through the whole path; a batch is whatever fills one pool buffer."""
    pool = BufferPool(slots=16, slot_bytes=slot_bytes, shared=transport != "object_store")
    client = OffloadClient(dep.multiplexer, pool, max_inflight=INFLIGHT, transport=transport)
    keys = [(1, vrouter, int(ProtocolId.ECHO), i) for i in range(1, sessions + 1)]
    client.open_sessions([(k, "echo", {}, 0) for k in keys])
    for i in range(2048):  # warm up
        client.send(keys[i % sessions], PAYLOAD)
    client.drain()
    out0 = client.stats.outputs
    cpu = CpuMeter(meter) if meter else None
    t0 = time.perf_counter()
    for i in range(frames):
        client.send(keys[i % sessions], PAYLOAD)
    client.drain()
    dt = time.perf_counter() - t0
    used = cpu.stop() if cpu else {}
    if client.stats.outputs - out0 != frames:
        raise AssertionError(f"{client.stats.outputs - out0} echoes for {frames} frames")
    client.close()
    return frames / dt, client, used


def docker_path(frames: int) -> dict[str, Any]:
    """The echo path to one instance whose sessions run in a container: the instance actor
    relays each batch to its container over a Unix socket (its IPC namespace is its own)."""
    try:
        from apsv.runtime.stack_image import docker_client, ensure_image

        ensure_image(docker_client())
    except Exception as e:
        return {"error": f"unavailable: {e}"}
    plan = ProtocolPlan(
        "echo", backend="docker", min_instances=1, max_instances=1, policy="fixed", allocation=Allocation(cpu=0.5)
    )
    dep = deploy([plan], suffix="-bench-docker", run_loop=False)
    try:
        rate, client, _ = echo_path(dep, frames, slot_bytes=SLOT, vrouter=6)
        (h,) = ray.get(dep.vpsm.instance_handles.remote()).values()
        copies = ray.get(h.load.remote())["payload_copies"] / max(client.stats.frames_sent, 1)
        return {"echo_msgs_per_s": round(rate), "copies_per_message": round(copies, 3)}
    finally:
        dep.stop()


def bgp_path(dep: Any, dump: Path, sessions: int) -> dict[str, Any]:
    from apsv.runtime.recorded_sessions import load_streams, plan_sessions, replay

    streams = load_streams([dump], min_messages=20)
    plan = plan_sessions(streams, sessions, max(1, sessions // 10))
    client = OffloadClient(dep.multiplexer)
    client.open_sessions([(s.key, "bgp", s.config(), 0) for s in plan])
    res = replay(client, plan)
    client.close()
    return {"updates_per_s": round(res.frames_per_s), "updates": res.frames, "sessions": sessions}

"""Ray's own ceilings for the offload benchmark: a batched echo through one bare actor, and
the same echo over a compiled graph. Both move the load the offload path is measured with."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import ray

from apsv.bench.cpu_meter import CpuMeter
from apsv.bench.daemons import ray_daemon_pids
from apsv.frame import HEADER_LEN

# The load, the same for the baselines and the offload path: 256 messages of 64 octets a batch.
PAYLOAD = b"x" * 64
BATCH = 256
SLOT = BATCH * (HEADER_LEN + len(PAYLOAD))
INFLIGHT = 8


@ray.remote(num_cpus=0)
class BareEcho:
    def echo(self, batch: Any) -> Any:
        return batch


def _distinct_batches(n: int = 16) -> list[list[bytes]]:
    return [[os.urandom(len(PAYLOAD)) for _ in range(BATCH)] for _ in range(n)]


def _buffers(n: int = 16) -> list[bytes]:
    return [os.urandom(SLOT) for _ in range(n)]


def bare_echo(batches: int, form: str, cpu: dict[str, float] | None = None) -> float:
    """Messages/s of a batched echo through one actor call per batch, INFLIGHT in flight
    (`cpu`: filled with the CPU seconds of the driver, the actor and Ray's daemons)."""
    actor = BareEcho.remote()  # type: ignore[attr-defined]
    meter = CpuMeter(
        {
            "driver": [os.getpid()],
            "actor": [int(ray.get(actor.__ray_call__.remote(lambda a: os.getpid())))],
            "ray": ray_daemon_pids(),
        }
    )
    pool: list[Any]
    if form == "repeated":
        pool = [[PAYLOAD] * BATCH]
    elif form == "distinct":
        pool = _distinct_batches()
    else:
        pool = _buffers()
    ray.get(actor.echo.remote(pool[0]))
    t0 = time.perf_counter()
    pending = []
    for i in range(batches):
        pending.append(actor.echo.remote(pool[i % len(pool)]))
        if len(pending) >= INFLIGHT:
            ray.get(pending.pop(0))
    ray.get(pending)
    dt = time.perf_counter() - t0
    if cpu is not None:
        cpu.update(meter.stop())
    ray.kill(actor)
    return batches * BATCH / dt


def compiled_graph(batches: int) -> dict[str, Any]:
    """The same echo over a Ray compiled graph (shared-memory channels): its round trip for one
    frame, and its rate for 256-frame buffers with INFLIGHT executions in flight."""
    from ray.dag import InputNode

    actor = BareEcho.remote()  # type: ignore[attr-defined]
    try:
        with InputNode() as inp:
            dag = actor.echo.bind(inp)
        t0 = time.perf_counter()
        compiled = dag.experimental_compile(_max_inflight_executions=INFLIGHT)
        compile_s = time.perf_counter() - t0
        try:
            one = os.urandom(HEADER_LEN + len(PAYLOAD))
            rtt = []
            for _ in range(300):
                t = time.perf_counter()
                ray.get(compiled.execute(one))
                rtt.append((time.perf_counter() - t) * 1000)
            bufs = _buffers()
            t0 = time.perf_counter()
            pending = []
            for i in range(batches):
                pending.append(compiled.execute(bufs[i % len(bufs)]))
                if len(pending) >= INFLIGHT:
                    ray.get(pending.pop(0))
            for ref in pending:
                ray.get(ref)
            rate = batches * BATCH / (time.perf_counter() - t0)
        finally:
            compiled.teardown()
        return {
            "round_trip_p50_ms": round(statistics.median(rtt[50:]), 3),
            "msgs_per_s": round(rate),
            "compile_s": round(compile_s, 3),
        }
    except Exception as e:  # compiled graphs are experimental in Ray: report, do not fail the run
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        ray.kill(actor)

"""The offload path's round trip: at a set load, as an agent's loop sends, and one frame at a
time on an idle path."""

from __future__ import annotations

import time
from typing import Any

from apsv.bench.offload_baseline import PAYLOAD
from apsv.frame import Frame, ProtocolId
from apsv.runtime.buffer_pool import BufferPool
from apsv.runtime.client import OffloadClient
from apsv.runtime.metrics import percentile


def latency_at(
    dep: Any, rate: float, seconds: float, sessions: int = 64, warmup_s: float = 0.5, tick_s: float = 0.0005
) -> dict[str, float | None]:
    """Send at `rate` messages/s and time each frame's round trip: from its receive stamp (as
    an agent stamps what its socket reads) to its echo's arrival back at the client.

    The sender works as an agent's loop does: every `tick_s` it sends whatever is due, then
    waits on the client's sockets (taking each echo in as it arrives) until the next tick.
    Batches leave by Nagle's rule (at once while fewer than two are in flight - as the agent's
    pump does -, else as one returns, or after 5 ms). The first `warmup_s` are not measured."""
    client = OffloadClient(
        dep.multiplexer,
        BufferPool(slots=16, slot_bytes=256 << 10, shared=True),
        max_inflight=16,
        max_batch_delay_s=0.005,
        eager_inflight=2,
        record_latency=True,
    )
    base = 1000 + int(rate)  # fresh sessions for each rate
    keys = [(2, base, int(ProtocolId.ECHO), i) for i in range(1, sessions + 1)]
    client.open_sessions([(k, "echo", {}, 0) for k in keys])
    lat: list[int] = []
    start = int(rate * warmup_s)
    n = start + int(rate * seconds)
    t0 = time.perf_counter()
    i = 0
    t_measured = t0
    while i < n:
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        while i < due:
            client.send(keys[i % sessions], PAYLOAD, rx_ns=time.time_ns())
            i += 1
            if i == start:
                client.take_latencies()  # (the warm-up's)
                t_measured = time.perf_counter()
        client.service()
        end = max(t0 + i / rate, time.perf_counter() + tick_s)
        while (left := end - time.perf_counter()) > 0:
            client.wait(left)
            client.service()
        if i >= start:
            lat += client.take_latencies()
    client.drain()
    achieved = (n - start) / (time.perf_counter() - t_measured)
    lat += client.take_latencies()
    client.close_sessions(keys)
    client.close()
    ms = [x / 1e6 for x in lat]
    return {
        "target_rate": round(rate),
        "achieved_rate": round(achieved),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "samples": len(ms),
    }


def unloaded_round_trip(dep: Any, n: int = 2000) -> dict[str, float | None]:
    """One frame at a time on an idle path: send, wait for its echo, again."""
    got: list[float] = []

    def on_output(f: Frame) -> None:
        got.append((time.time_ns() - f.rx_ns) / 1e6)

    client = OffloadClient(dep.multiplexer, on_output=on_output, max_batch_delay_s=0.0)
    key = (4, 1, int(ProtocolId.ECHO), 1)
    client.open_sessions([(key, "echo", {}, 0)])
    for i in range(n + 100):
        client.send(key, PAYLOAD, rx_ns=time.time_ns())
        client.flush()
        deadline = time.monotonic() + 10
        while len(got) <= i and time.monotonic() < deadline:
            client.wait(0.01)
    client.close()
    lat = got[100:]
    return {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "samples": len(lat)}

"""The offload path against Ray's own ceilings, measured in the same run.

    apsv bench offload [--json] [--quick]        (or: python benchmarks/offload.py)

Baselines (one echo actor, 8 batches in flight):

* `bare_echo_msgs_per_s` - the better of the two honest forms of a batched Ray echo of 256
  messages a call: 256 distinct 64-octet payloads (a list, pickled), or one 256-frame buffer
  (octets). `bare_echo_repeated_msgs_per_s` is the flattering form, `[PAYLOAD] * 256` - one
  object repeated, which pickle stores once: it measures calls, not messages.
* `compiled_graph` - a Ray compiled graph (shared-memory channels) echoing the same 256-frame
  buffer: its round trip and its rate, the other way Ray offers for same-node hops.

The offload path (client -> stack instances -> back, the multiplexer not on the way; two echo
instances, the frames in the client's shared-memory pool):

* `echo_msgs_per_s` in batches of 256 frames, like the baseline (`ratio_vs_bare_echo`: the
  median over alternating pairs of the two, `ratio_pairs`; each rate is its median), and with
  the client's 256 KiB buffers (`echo_large_buffer_msgs_per_s`), and through the object store;
* `cpu_us_per_msg`: CPU-microseconds per echoed message, summed over every process of the path -
  this client, the instances, the multiplexer, the VPSM, and Ray's raylet and GCS - and the same
  for the bare echo; `im_cpu_share`: the multiplexer's part of it;
* round trip p50/p99 at 10 %, 50 % and 90 % of the maximum rate (`p99_ms_at_50pct`), and one
  frame at a time on an idle path (`unloaded_p50_ms`);
* payload copies per message from the client's buffer to the stack decoder (counted), and the
  custody copy kept for restores (reported apart);
* the BGP UPDATE path with real updates, instance start (decision -> ready), a live move.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import ray

from apsv.bench import shared_data
from apsv.bench.daemons import ray_daemon_pids
from apsv.bench.report import run_and_report
from apsv.frame import HEADER_LEN, Frame, ProtocolId
from apsv.runtime.buffer_pool import BufferPool
from apsv.runtime.client import OffloadClient
from apsv.runtime.cluster import deploy, start_local_ray
from apsv.runtime.instance import Allocation
from apsv.runtime.metrics import percentile
from apsv.runtime.vpsm import ProtocolPlan
from apsv.tuning import tune_gc

PAYLOAD = b"x" * 64
BATCH = 256
SLOT = BATCH * (HEADER_LEN + len(PAYLOAD))
INFLIGHT = 8
PAIRS, PAIRS_QUICK = 4, 1  # alternating (offload echo, bare echo) measurements after the first


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


# ------------------------------------------------------------------------------------------------
# CPU accounting: every process of the path


def _cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            out[pid] = 0.0
    return out


class CpuMeter:
    """CPU seconds spent by a set of processes over a measured span."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._t0 = {g: _cpu(p) for g, p in groups.items()}

    def stop(self) -> dict[str, float]:
        out = {}
        for g, pids in self.groups.items():
            now = _cpu(pids)
            out[g] = sum(now[p] - self._t0[g].get(p, 0.0) for p in pids)
        return out


def path_processes(dep: Any) -> dict[str, list[int]]:
    handles = ray.get(dep.vpsm.instance_handles.remote())
    return {
        "client": [os.getpid()],
        "instances": [int(ray.get(h.pid.remote())) for h in handles.values()],
        "multiplexer": [int(ray.get(dep.multiplexer.pid.remote()))],
        "vpsm": [int(ray.get(dep.vpsm.pid.remote()))],
        "ray": ray_daemon_pids(),
    }


# ------------------------------------------------------------------------------------------------
# the offload path


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


def docker_path(frames: int) -> dict[str, Any]:
    """The echo path to one instance whose sessions run in a container: the instance actor
    relays each batch to its container over a Unix socket (its IPC namespace is its own)."""
    try:
        from apsv.runtime.docker_backend import docker_client, ensure_image

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
    from apsv.runtime.driver import load_streams, plan_sessions, replay

    streams = load_streams([dump], min_messages=20)
    plan = plan_sessions(streams, sessions, max(1, sessions // 10))
    client = OffloadClient(dep.multiplexer)
    client.open_sessions([(s.key, "bgp", s.config(), 0) for s in plan])
    res = replay(client, plan)
    client.close()
    return {"updates_per_s": round(res.frames_per_s), "updates": res.frames, "sessions": sessions}


def instance_start(backend: str) -> float | str:
    """Median seconds from the VPSM's decision to a ready, registered instance (3 starts)."""
    if backend == "docker":
        try:
            from apsv.runtime.docker_backend import docker_client, ensure_image

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


def run(quick: bool = False, with_docker: bool = True) -> dict[str, Any]:
    tune_gc()  # this process is the client: as an agent's (see apsv.tuning)
    start_local_ray(num_cpus=8)
    frames = 50_000 if quick else 200_000
    result: dict[str, Any] = {"benchmark": "offload", "quick": quick}
    bare_forms: dict[str, float] = {}
    bare_cpu: dict[str, dict[str, float]] = {}
    for form in ("distinct", "buffer", "repeated"):
        bare_cpu[form] = {}
        bare_forms[form] = bare_echo(frames // BATCH, form, bare_cpu[form])
    honest = max(("distinct", "buffer"), key=lambda f: bare_forms[f])
    bare = bare_forms[honest]
    # One instance, as the baseline has one actor: each batch is 256 frames to it, like the
    # baseline's calls. (Two instances on two cores spend what they gain in context switches;
    # they are measured after.)
    one = ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed", allocation=Allocation(cpu=0.5))
    dep = deploy([one], suffix="-bench", run_loop=False)
    try:
        procs = path_processes(dep)
        first, client, used = echo_path(dep, frames, slot_bytes=SLOT, meter=procs)
        total_cpu = sum(used.values())
        # The two rates swing by a third from minute to minute on a shared 2-core host: measure
        # them in alternating pairs and take the median of each and of the pairs' ratios.
        pairs = [(first, bare)]
        for r in range(PAIRS_QUICK if quick else PAIRS):
            b = bare_echo(frames // BATCH, honest)
            pairs.append((echo_path(dep, frames, slot_bytes=SLOT, vrouter=10 + r)[0], b))
        echo = statistics.median(e for e, _ in pairs)
        bare = statistics.median(b for _, b in pairs)
        ratio = statistics.median(e / b for e, b in pairs)
        handles = ray.get(dep.vpsm.instance_handles.remote())
        inst_copies = sum(ray.get(h.load.remote())["payload_copies"] for h in handles.values())
        sent = client.stats.frames_sent
        copies = (client.stats.payload_copies + inst_copies) / max(sent, 1)
        # The custody copy of each batch, kept to restore sessions elsewhere after a failure:
        # not on the way to the decoder, but a copy all the same - reported beside it.
        retention = client.stats.custody_copy_bytes / max(client.stats.payload_bytes + HEADER_LEN * sent, 1)
        echo_large, _, _ = echo_path(dep, frames * 2, vrouter=2)
        echo_os, _, _ = echo_path(dep, frames, vrouter=3, transport="object_store")
        top = max(echo, echo_large)
        lat = {}
        for frac in (0.1, 0.5, 0.9):
            lat[f"{int(frac * 100)}pct"] = latency_at(dep, top * frac, 1.5 if quick else 4.0)
        unloaded = unloaded_round_trip(dep, 500 if quick else 2000)
    finally:
        dep.stop()
    if with_docker:
        result["docker"] = docker_path(frames)
    two = ProtocolPlan("echo", min_instances=2, max_instances=2, policy="fixed", allocation=Allocation(cpu=0.5))
    dep = deploy([two], suffix="-bench-2", run_loop=False)
    try:
        echo_two, _, _ = echo_path(dep, frames, slot_bytes=SLOT, vrouter=4)
        echo_two_large, _, _ = echo_path(dep, frames * 2, vrouter=5)
        move_ms = move_time(dep)
    finally:
        dep.stop()
    result.update(
        echo_msgs_per_s=round(echo),
        bare_echo_msgs_per_s=round(bare),
        bare_echo_form=honest,
        bare_echo_distinct_msgs_per_s=round(bare_forms["distinct"]),
        bare_echo_buffer_msgs_per_s=round(bare_forms["buffer"]),
        bare_echo_repeated_msgs_per_s=round(bare_forms["repeated"]),
        ratio_vs_bare_echo=round(ratio, 3),
        ratio_batch256_vs_bare_echo=round(ratio, 3),
        ratio_pairs=[{"echo": round(e), "bare": round(b), "ratio": round(e / b, 3)} for e, b in pairs],
        echo_batch256_msgs_per_s=round(echo),
        echo_large_buffer_msgs_per_s=round(echo_large),
        echo_object_store_msgs_per_s=round(echo_os),
        echo_two_instances_msgs_per_s=round(echo_two),
        echo_two_instances_large_buffer_msgs_per_s=round(echo_two_large),
        cpu_us_per_msg=round(total_cpu / frames * 1e6, 3),
        cpu_us_per_msg_by_process={k: round(v / frames * 1e6, 3) for k, v in used.items()},
        bare_echo_cpu_us_per_msg=round(sum(bare_cpu[honest].values()) / frames * 1e6, 3),
        im_cpu_share=round(used.get("multiplexer", 0.0) / total_cpu, 4) if total_cpu else None,
        p99_ms_at_50pct=lat["50pct"]["p99_ms"],
        latency=lat,
        unloaded_p50_ms=unloaded["p50_ms"],
        unloaded=unloaded,
        copies_per_message=round(copies, 3),
        retention_copies_per_message=round(retention, 3),
        transport="shm",
        session_move_ms=move_ms,
    )
    data = shared_data()
    dump = data / "mrt/bgpdump-testdata/updates.20070211.0141.gz"
    if dump.is_file():
        bplan = ProtocolPlan("bgp", min_instances=2, max_instances=2, policy="fixed", allocation=Allocation(cpu=0.5))
        bdep = deploy([bplan], suffix="-bench-bgp", run_loop=False)
        try:
            result["bgp"] = bgp_path(bdep, dump, 40 if quick else 100)
        finally:
            bdep.stop()
    # Last: a compiled graph leaves threads of its own in this process, which would tax the
    # client's measurements after it.
    result["compiled_graph"] = compiled_graph(frames // BATCH)
    result["instance_start_s"] = {"process": instance_start("process")}
    result["bare_actor_start_s"] = bare_actor_start()
    if with_docker:
        result["instance_start_s"]["docker"] = instance_start("docker")
    half = result["latency"]["50pct"]
    result["targets"] = {
        "echo_ge_80pct_of_bare": result["ratio_vs_bare_echo"] >= 0.8,
        "p99_le_5ms_at_50pct": (result["p99_ms_at_50pct"] or 1e9) <= 5.0,
        "50pct_run_ge_95pct_of_its_rate": half["achieved_rate"] >= 0.95 * half["target_rate"],
        "unloaded_p50_le_1ms": (result["unloaded_p50_ms"] or 1e9) <= 1.0,
        "copies_le_1": result["copies_per_message"] <= 1.0,
        "im_cpu_share_le_5pct": (result["im_cpu_share"] or 0.0) <= 0.05,
        "process_start_le_0_5s": isinstance(result["instance_start_s"]["process"], float)
        and result["instance_start_s"]["process"] <= 0.5,
        "docker_start_le_1s": isinstance(result["instance_start_s"].get("docker"), float)
        and result["instance_start_s"]["docker"] <= 1.0,
    }
    return result


def render(r: dict[str, Any]) -> str:
    cg = r["compiled_graph"]
    lines = [
        f"bare Ray batched echo     {r['bare_echo_msgs_per_s']:>10,} msgs/s   ({r['bare_echo_form']} payloads; "
        f"repeated object {r['bare_echo_repeated_msgs_per_s']:,})",
        f"compiled-graph echo       {cg.get('msgs_per_s', 0):>10,} msgs/s   "
        f"(one frame: {cg.get('round_trip_p50_ms')} ms)",
        f"offload echo path         {r['echo_msgs_per_s']:>10,} msgs/s   ({r['ratio_vs_bare_echo']:.0%} of bare, "
        "batches of 256)",
        f"  256 KiB buffers         {r['echo_large_buffer_msgs_per_s']:>10,} msgs/s",
        f"  object-store transport  {r['echo_object_store_msgs_per_s']:>10,} msgs/s",
        f"CPU per message           {r['cpu_us_per_msg']} us (bare echo {r['bare_echo_cpu_us_per_msg']} us); "
        f"multiplexer's share {r['im_cpu_share']}",
        f"  by process              {r['cpu_us_per_msg_by_process']}",
    ]
    if "bgp" in r:
        lines.append(
            f"offload BGP UPDATE path   {r['bgp']['updates_per_s']:>10,} updates/s ({r['bgp']['sessions']} sessions)"
        )
    for k, v in r["latency"].items():
        lines.append(
            f"latency at {k:>5} ({v['achieved_rate']:>7,}/s of {v['target_rate']:,}): "
            f"p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms"
        )
    lines.append(f"unloaded round trip       p50 {r['unloaded_p50_ms']} ms, p99 {r['unloaded']['p99_ms']} ms")
    lines.append(
        f"payload copies/message    {r['copies_per_message']} on the path, "
        f"{r['retention_copies_per_message']} kept in custody for restores"
    )
    if "docker" in r:
        lines.append(f"docker instance (relayed)  {r['docker']}")
    lines.append(f"instance start            {r['instance_start_s']} (bare Ray actor {r['bare_actor_start_s']} s)")
    lines.append(f"session move (median)     {r['session_move_ms']} ms")
    lines.append(f"targets                   {r['targets']}")
    return "\n".join(lines)


def main(as_json: bool = False, quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    return run_and_report(lambda: run(quick=quick), render, as_json, out)

"""Calibration of a live replay: what one echo instance does on this host, measured, so the
simulator can be run with the live system's own figures."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from apsv.evaluation.live_sender import Sender, connect_sender
from apsv.evaluation.live_testbed import FloatArray, LiveConfig, deployment_suffix, echo_plan
from apsv.scaling.simulator import SimConfig


@dataclass
class Calibration:
    """What one live instance does, measured (wall units)."""

    delay_ms: float  # the echo stack's per-message service time
    capacity: float  # messages/s one instance serves
    base_latency_ms: float  # p50 latency at light load
    start_latency_s: float  # decision -> ready
    # a session's hand-over, mean: detached at its source -> adopted by the target, while its
    # frames wait (then re-sent to the target); measured as a second instance joins at light load
    move_s: float = 0.005
    moves: int = 0  # the moves that measured it (0: none happened, move_s is the default)
    node_cpus: int = 0  # this host's cores
    # the p99 latency added when `node_cpus` instances start at once (over one starting alone)
    start_stall_s: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {k: v if isinstance(v, int) else round(float(v), 4) for k, v in self.__dict__.items()}


def calibrate(cfg: SimConfig, live: LiveConfig, test: FloatArray) -> Calibration:
    """Measure one instance's service rate at the per-message delay the trace asks for, the
    latency floor at light load, and the start latency."""
    import ray

    from apsv.runtime.cluster import deploy

    peak = float(test.max()) or 1.0
    # the per-instance rate the configured capacity becomes live
    target = cfg.capacity * live.peak_rate / peak
    delay_ms = 1000.0 / target
    cpus = _host_cpus()
    # the stall is measured only where the simulator could see one: `cpus` starts at once
    measure_stall = 2 + cpus <= cfg.max_instances
    plan = echo_plan(
        "fixed",
        {"instances": 1},
        replace(cfg, min_instances=1, max_instances=max(cfg.max_instances, 3)),
        live,
        cfg.capacity,
    )
    dep = deploy([plan], interval_s=1.0, run_loop=False, suffix=deployment_suffix())
    try:
        start_latency_s = _start_latency_s(dep)
        (inst,) = ray.get(dep.vpsm.instance_handles.remote()).values()
        sender = connect_sender(dep.multiplexer, cfg, live, delay_ms)
        base, move_s, moves = _light_load(dep, inst, sender, live, target)
        stall_s = _start_stall_s(dep, sender, target, cpus) if measure_stall else 0.0
        ray.get(dep.vpsm.scale_to.remote("echo", 1))
        (inst,) = ray.get(dep.vpsm.instance_handles.remote()).values()
        capacity = _service_rate(inst, sender, live, target)
        sender.finish()
        sender.close()
    finally:
        dep.stop()
    return Calibration(delay_ms, capacity, base, start_latency_s, move_s, moves, cpus, stall_s)


def _host_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _start_latency_s(dep: Any) -> float:
    """The median of two warm starts of a second instance (each stopped again)."""
    import ray

    starts = []
    for _ in range(2):
        t0 = time.perf_counter()
        ray.get(dep.vpsm.scale_to.remote("echo", 2))
        starts.append(time.perf_counter() - t0)
        ray.get(dep.vpsm.scale_to.remote("echo", 1))
    return float(np.median(starts))


def _light_load(dep: Any, inst: Any, sender: Sender, live: LiveConfig, target: float) -> tuple[float, float, int]:
    """At light load (20 %): the latency floor (p50, ms); meanwhile a second instance joins and
    takes a share of the live sessions, which gives how long a move holds a session's frames
    (mean seconds) and how many moves measured it."""
    import ray

    ray.get(inst.load.remote())
    m0 = ray.get(dep.multiplexer.stats.remote())
    joining = dep.vpsm.scale_to.remote("echo", 2)
    secs = max(1, int(live.calibrate_s / 2))
    sender.run([0.2 * target] * secs, time.time() + 0.05, 1.0)
    ray.get(joining)
    sender.finish()
    light = ray.get(inst.load.remote())
    base = float(np.percentile(light["latency_ms"], 50)) if len(light["latency_ms"]) else 1.0
    m1 = ray.get(dep.multiplexer.stats.remote())
    moves = int(m1["moves"]) - int(m0["moves"])
    move_s = (float(m1["move_seconds"]) - float(m0["move_seconds"])) / moves if moves else 0.005
    return base, move_s, moves


def _start_stall_s(dep: Any, sender: Sender, target: float, cpus: int) -> float:
    """The p99 latency added by as many instance starts at once as the host has cores.

    Ray starts a worker process for each, CPU-bound for the start latency, and the message path
    (agents and instances) loses its core meanwhile. The p99 while they start, over the p99 while
    one starts (same load, same window, its moves included in both), is the stall the simulator
    models (`start_stall_s`)."""
    import ray

    one = _p99_while_scaling_to(dep, sender, target, 3)  # 2 -> 3: one start
    ray.get(dep.vpsm.scale_to.remote("echo", 2))
    many = _p99_while_scaling_to(dep, sender, target, 2 + cpus)  # 2 -> 2 + cpus: as many as there are cores
    return max(0.0, many - one) / 1000.0


def _p99_while_scaling_to(dep: Any, sender: Sender, target: float, n: int) -> float:
    """The p99 latency (ms) over every instance while the VPSM scales to `n` under load."""
    import ray

    for h in ray.get(dep.vpsm.instance_handles.remote()).values():
        ray.get(h.load.remote())  # drop what they measured so far
    scaling = dep.vpsm.scale_to.remote("echo", n)
    sender.run([target] * 2, time.time() + 0.05, 1.0)  # 2 s, half of what 2 instances serve
    ray.get(scaling)
    sender.finish()
    lat = [
        np.asarray(ray.get(h.load.remote())["latency_ms"]) for h in ray.get(dep.vpsm.instance_handles.remote()).values()
    ]
    both = np.concatenate(lat) if lat else np.zeros(0)
    return float(np.percentile(both, 99)) if both.size else 0.0


def _service_rate(inst: Any, sender: Sender, live: LiveConfig, target: float) -> float:
    """At overload (150 %): the messages per second one instance applies.

    Counted from what its sessions applied over the period (it holds them all, none moves;
    `frames_in` also counts frames it refused or dropped as repeats, which cost no service time)."""
    import ray

    f0, t0 = int(ray.get(inst.load.remote())["session_frames"]), time.time()
    sender.run([1.5 * target] * int(live.calibrate_s), time.time() + 0.05, 1.0)
    heavy = ray.get(inst.load.remote())
    return (int(heavy["session_frames"]) - f0) / max(time.time() - t0, 1e-6)

"""CPU accounting for the offload benchmark: the CPU seconds every process of a path spends."""

from __future__ import annotations

import os
from typing import Any

import psutil
import ray

from apsv.bench.daemons import ray_daemon_pids


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

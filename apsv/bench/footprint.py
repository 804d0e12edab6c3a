"""What a set of processes costs: CPU-seconds, PSS and RSS, in total and by part.

A part is a process's role: a Ray worker by the actor it hosts, a daemon by its program. The
consolidation and live-scale benchmarks both report their figures this way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

from apsv.bench import daemons as D


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    return {p: D.proc_cpu_seconds(p) for p in pids}


def memory_mb(procs: Iterable[psutil.Process]) -> tuple[float, float]:
    """(PSS, RSS) summed over `procs`, in MB."""
    pss = rss = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            pss += m.pss
            rss += m.rss
    return pss / 1e6, rss / 1e6


def role_of(p: psutil.Process) -> str:
    """A process's part, for the per-part figures: a Ray worker by the actor it hosts
    (`ray::ApsvAgent` -> ApsvAgent), a daemon by its program's name."""
    with contextlib.suppress(psutil.Error):
        cmd = p.cmdline()
        if cmd and cmd[0].startswith("ray::"):
            return cmd[0][5:].split(".")[0].split(":")[0].split(" ")[0] or "worker"
        if "-m" in cmd[:-1]:
            return cmd[cmd.index("-m") + 1].rsplit(".", 1)[-1]
        for word in cmd[:3]:
            base = os.path.basename(word)
            if base.endswith(".py"):
                return base[:-3]
        return p.name()
    return "gone"


@dataclass
class Part:
    processes: int = 0
    cpu_s: float = 0.0
    pss_mb: float = 0.0


@dataclass
class Footprint:
    pss_mb: float
    rss_mb: float
    parts: dict[str, Part]

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.parts.values())


def footprint(procs: Iterable[psutil.Process], used: Mapping[int, float]) -> Footprint:
    """The processes' memory now (each read once) and the CPU-seconds `used` by each pid,
    summed and by part."""
    pss = rss = 0.0
    parts: dict[str, Part] = {}
    for p in procs:
        part = parts.setdefault(role_of(p), Part())
        part.processes += 1
        part.cpu_s += used.get(p.pid, 0.0)
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            pss += m.pss / 1e6
            rss += m.rss / 1e6
            part.pss_mb += m.pss / 1e6
    return Footprint(pss, rss, parts)

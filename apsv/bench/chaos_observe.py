"""The chaos soak's independent observers: the real peers' own views of their sessions, polled
(`Watch`), and the least-squares slopes that tell growth in the resources sampled."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Event:
    at: float
    who: str
    what: str


class Watch(threading.Thread):
    """Polls a peer's own view every `every` seconds; records its sessions leaving Up."""

    def __init__(self, name: str, every: float, poll: Any) -> None:
        """`poll()`: who -> (up, since, and optionally what the peer says of it)."""
        super().__init__(daemon=True, name=f"apsv-chaos-{name}")
        self.every, self.poll = every, poll
        self.state: dict[str, tuple[bool, str]] = {}  # who -> (up, since)
        self.detail: dict[str, str] = {}  # who -> what its peer says of it now
        self.events: list[Event] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            try:
                now = time.time()
                for who, (up, since, *detail) in self.poll().items():
                    was = self.state.get(who)
                    # A session leaving Up. (Not a change of BIRD's "Since" alone: it moves when a
                    # channel goes from feeding to happy, with no reset and no new connection.)
                    if was is not None and was[0] and not up:
                        self.events.append(Event(now, who, " ".join(detail) or "down"))
                    self.state[who] = (up, since)
            except Exception:
                self.errors += 1

    def all_up(self, n: int) -> bool:
        return len(self.state) >= n and all(up for up, _ in self.state.values())

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def bird_protocols(birdc: list[str]) -> dict[str, tuple[bool, str, str]]:
    """BIRD's BGP protocols: (Established, since, its state and info) each, as `show protocols`
    prints them."""
    out = subprocess.run([*birdc, "show", "protocols"], capture_output=True, text=True, timeout=10, check=True).stdout
    got = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "BGP":
            got[parts[0]] = (parts[5] == "Established", parts[4], " ".join([parts[3], *parts[5:]]))
    return got


def slope_per_h(samples: list[dict[str, Any]], key: str, warmup_s: float) -> float | None:
    import numpy as np

    pts = [(s["t"], s[key]) for s in samples if s["t"] >= warmup_s and s.get(key) is not None]
    if len(pts) < 3:
        return None
    t, y = np.array(pts).T
    return round(float(np.polyfit(t / 3600.0, y, 1)[0]), 2)


def process_kind(p: Any) -> str:
    """A process's kind: its Ray actor class (`ray::Multiplexer.watch` -> `ray::Multiplexer`), a
    Python program's script (`python:log_monitor.py`), or its program's name."""
    cmd: list[str] = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    name = str(p.name())
    if name.startswith("python"):  # Ray's own daemons: by their script (log_monitor.py, dashboard.py, ...)
        script = next((a for a in cmd[1:] if a.endswith(".py") or a.startswith("ray.")), None)
        if script is None and "-m" in cmd[:-1]:
            script = cmd[cmd.index("-m") + 1]
        return f"python:{script.rsplit('/', 1)[-1]}" if script else "python"
    return name


def fd_slopes(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, float | None]:
    """The least-squares slope of each kind of process's descriptors (a kind absent from a
    sample has none then)."""
    roles = sorted({r for s in samples for r in s.get("fds_by_process", {})})
    out = {}
    for role in roles:
        pts = [{"t": s["t"], "fds": s.get("fds_by_process", {}).get(role, 0)} for s in samples]
        out[role] = slope_per_h(pts, "fds", warmup_s)
    return out

"""The control plane dies mid-replay; the data path does not notice.

    apsv bench restart [--sessions 200] [--json]

Real BGP churn (two MRT update dumps, every recorded peer) is replayed as N sessions of N/10
virtual routers through three BGP stack instances. When 40 % of the frames are sent, the process
of the multiplexer, of the VPSM, or of both is killed (SIGKILL, no warning); Ray restarts them,
and they rebuild their state - the multiplexer from its plan and the instances, the VPSM from its
persisted state. The replay goes on meanwhile. Afterwards every session is checked against an
in-process replay (each frame applied exactly once, in order, the same Loc-RIB), and a new
session is opened. Reported per case: the longest wait for a reply while batches were in flight
(the data path's longest stall), how long each killed actor took to answer again, frames re-sent
(none are needed: nothing is refused), sessions lost or wrong.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray

from apsv.bench import shared_data
from apsv.bench.report import run_and_report

CASES = ("multiplexer", "vpsm", "both")
DUMPS = ["mrt/bgpdump-testdata/updates.20070211.0141.gz", "mrt/bgpkit-ripe-fixtures/updates.20100227.1600.gz"]


def kill(actor: Any) -> int:
    """SIGKILL an actor's process (Ray restarts it: max_restarts)."""
    pid = int(ray.get(actor.pid.remote(), timeout=30))
    os.kill(pid, signal.SIGKILL)
    return pid


def replay_with_kill(dep: Any, sessions: list[Any], reference: dict[Any, str], case: str) -> dict[str, Any]:
    """Replay `sessions` through deployment `dep`, killing the control plane (`case`) at 40 %."""
    from apsv.runtime.buffer_pool import BufferPool
    from apsv.runtime.client import OffloadClient
    from apsv.runtime.recorded_sessions import replay, session_infos, verify

    client = OffloadClient(dep.multiplexer, BufferPool(slots=8, slot_bytes=64 << 10, shared=True), max_inflight=4)
    placed = client.open_sessions([(s.key, "bgp", s.config(), 0) for s in sessions])
    refused = [v for v in placed.values() if v.startswith("error")]
    if refused:
        raise RuntimeError(f"{len(refused)} sessions refused: {refused[0]}")
    victims = {"multiplexer": {"multiplexer": dep.multiplexer}, "vpsm": {"vpsm": dep.vpsm}}.get(
        case, {"multiplexer": dep.multiplexer, "vpsm": dep.vpsm}
    )
    total = sum(len(s.stream.messages) for s in sessions)
    killed: dict[str, float] = {}
    back: dict[str, float] = {}
    watchers = []

    def answering(name: str, actor: Any) -> None:
        """How long the killed actor takes to answer again (Ray restarts it; it rebuilds)."""
        ray.get(actor.stats.remote() if name == "multiplexer" else actor.status.remote(), timeout=120)
        back[f"{name}_s"] = round(time.monotonic() - killed["at"], 3)

    def progress(sent: int, _total: int) -> None:
        if not killed and sent >= 0.4 * total:
            killed["at"] = time.monotonic()
            for name, actor in victims.items():
                kill(actor)
                t = threading.Thread(target=answering, args=(name, actor), daemon=True)
                t.start()
                watchers.append(t)

    t0 = time.monotonic()
    res = replay(client, sessions, on_progress=progress, progress_every=500)
    for t in watchers:
        t.join(120)
    if "multiplexer" in victims and ray.get(dep.multiplexer.stats.remote())["restarts"] < 1:
        raise AssertionError("the multiplexer did not restart")
    if "vpsm" in victims and ray.get(dep.vpsm.status.remote())["restarts"] < 1:
        raise AssertionError("the VPSM did not restart")
    problems = verify(sessions, session_infos(dep), reference)
    # a session opened once the control plane is back
    new_key = (sessions[0].key[0], 10_000, sessions[0].key[2], 1)
    opened = client.open_sessions([(new_key, "bgp", sessions[0].config(), 0)])
    stats = ray.get(dep.multiplexer.stats.remote())
    out = {
        "case": case,
        "sessions": len(sessions),
        "frames": res.frames,
        "replay_s": round(res.seconds, 3),
        "killed_at_s": round(killed["at"] - t0, 3),
        "answering_again_after_s": back,
        "longest_reply_gap_ms": round(client.stats.longest_reply_gap_s * 1000, 1),
        "frames_resent": client.stats.frames_resent,
        "refused": client.stats.refused,
        "problems": problems[:10],
        "lost_or_wrong": len(problems),
        "new_session_opened": not opened[new_key].startswith("error"),
        "multiplexer": {k: stats[k] for k in ("restarts", "rebuilt_sessions", "sessions", "incarnation")},
    }
    client.close()
    return out


def run(sessions: int = 200) -> dict[str, Any]:
    from apsv.runtime.cluster import deploy, start_local_ray
    from apsv.runtime.instance import Allocation
    from apsv.runtime.recorded_sessions import load_streams, local_digests, plan_sessions
    from apsv.runtime.vpsm import ProtocolPlan

    data = shared_data()
    start_local_ray(num_cpus=8)
    streams = load_streams([data / d for d in DUMPS], min_messages=20)
    plan = plan_sessions(streams, sessions, max(1, sessions // 10))
    reference = local_digests(plan)
    out: dict[str, Any] = {"benchmark": "restart", "sessions": sessions, "cases": {}}
    for i, case in enumerate(CASES):
        bgp = ProtocolPlan(
            "bgp",
            min_instances=3,
            max_instances=3,
            policy="fixed",
            allocation=Allocation(cpu=0.25, memory_bytes=512 << 20),
        )
        dep = deploy([bgp], suffix=f"-restart-{i}", run_loop=True)
        try:
            out["cases"][case] = replay_with_kill(dep, plan, reference, case)
        finally:
            dep.stop()
    return out


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        f"kill -9 {case:11}: {c['frames']:,} frames, {c['lost_or_wrong']} sessions lost or wrong, "
        f"longest reply gap {c['longest_reply_gap_ms']} ms, back after {c['answering_again_after_s']}, "
        f"new session opened: {c['new_session_opened']}"
        for case, c in r["cases"].items()
    )


def main(sessions: int, as_json: bool, out: Path | None) -> dict[str, Any]:
    return run_and_report(lambda: run(sessions), render, as_json, out)

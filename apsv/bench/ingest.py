"""BGP ingest, bgperf-style: one announcer (BIRD), each receiver in turn, side by side.

    apsv bench bgp-ingest [--prefixes N] [--peers K] [--repeat R] [--json]

BIRD announces N IPv4 prefixes on each of K sessions; each receiver - the APSV offload path
(agent -> multiplexer -> BGP stack instances), FRR bgpd (-Z: no zebra, like APSV here without a
FIB) and GoBGP - takes them. Measured per receiver, median of R runs: seconds from the first of
its sessions reaching Established to all N x K prefixes in its RIB, its CPU seconds (every
thread, from the scheduler) and its peak memory. For APSV the CPU and memory are those of every
process of it: the agent, the stack instances, the multiplexer, the VPSM - and Ray's own
(raylet, GCS and their agents), over the same span (`cpu_s`; `cpu_by_process_s` splits it).
The announcer's own CPU is reported too, to show it is not the bottleneck.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import ray

from apsv.bench import daemons as D
from apsv.bench.report import run_and_report

PORT = 1790


class ApsvReceiver:
    """The offload path as a receiver: an agent actor and BGP stack instances on local Ray."""

    def __init__(self, peers: int, instances: int) -> None:
        from apsv.agent.actor import create_agent_actor
        from apsv.agent.config import parse_config
        from apsv.runtime.cluster import NAMESPACE, deploy
        from apsv.runtime.instance import Allocation
        from apsv.runtime.vpsm import ProtocolPlan

        plan = ProtocolPlan(
            "bgp",
            min_instances=instances,
            max_instances=instances,
            policy="fixed",
            allocation=Allocation(cpu=0.5, memory_bytes=2 << 30, buffer_quota_bytes=32 << 20),
        )
        self.dep = deploy([plan], suffix=f"-ingest-{time.monotonic_ns()}", run_loop=False)
        vrouters = D.agent_vrouters(peers, PORT)
        cfg = parse_config({"tenant": 1, "vrouters": vrouters, "buffer_bytes": 1 << 20})
        self.agent = create_agent_actor(cfg, multiplexer_name=self.dep.multiplexer_name, namespace=NAMESPACE)
        ray.get(self.agent.start.remote())
        self.keys = [(1, i + 1, 1, 1) for i in range(peers)]

    def state(self) -> tuple[int, int]:
        if not hasattr(self, "_where"):  # placement does not change during a run: ask once
            routes = ray.get(self.dep.multiplexer.routes_table.remote())
            handles = ray.get(self.dep.vpsm.instance_handles.remote())
            self._where = [(handles[iid], [tuple(k) for k in keys]) for iid, keys in routes.items()]
        # one call per instance, and no RIB digest: a poll every 20 ms must not walk the RIB
        # it is timing
        by_instance = ray.get([h.session_infos.remote(keys, False) for h, keys in self._where])
        infos = [i for got in by_instance for i in got.values() if i is not None]
        est = sum(1 for i in infos if i["state"] == "Established")
        return est, sum(int(i["loc_rib"].get("1/1", 0)) for i in infos)

    def pids(self) -> dict[str, list[int]]:
        import os

        instances = list(ray.get(self.dep.vpsm.instance_handles.remote()).values())

        def one(actor: Any) -> int:
            return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))

        return {
            "agent": [one(self.agent)],
            "instances": [one(h) for h in instances],
            "multiplexer": [one(self.dep.multiplexer)],
            "vpsm": [one(self.dep.vpsm)],
            "ray": D.ray_daemon_pids(),
        }

    def stop(self) -> None:
        ray.get(self.agent.stop.remote(), timeout=30)
        ray.kill(self.agent)
        self.dep.stop()


def _measure(receiver: Any, n: int, peers: int, timeout: float) -> dict[str, Any]:
    groups = receiver.pids()
    if isinstance(groups, list):  # a daemon: one process
        groups = {"daemon": groups}
    pids = [p for ps in groups.values() for p in ps]
    cpu0 = {p: D.proc_cpu_seconds(p) for p in pids}
    bird = D.start_bird_announcer(n, peers, PORT)
    stop_poke = threading.Event()

    def poke() -> None:
        while not stop_poke.is_set():
            D.poke_bird(bird)
            time.sleep(0.01)

    poker = threading.Thread(target=poke, daemon=True)
    try:
        t_start = time.monotonic()
        t_est = None
        poker.start()
        deadline = t_start + timeout
        want = n * peers
        got = 0
        while time.monotonic() < deadline:
            bird.alive()
            est, got = receiver.state()
            now = time.monotonic()
            if t_est is None and est >= 1:  # from the first session up: the clock runs while the others come up
                t_est = now
            if t_est is not None and got >= want:
                break
            time.sleep(0.02 if t_est is not None else 0.005)  # RIB polls cost the receiver too
        else:
            raise TimeoutError(f"{got} of {want} prefixes after {timeout}s")
        t_done = time.monotonic()
        used = {p: D.proc_cpu_seconds(p) - cpu0[p] for p in pids}
        cpu = sum(used.values())
        rss = sum(D.proc_max_rss_mb(p) for p in pids)
        bird_cpu = D.proc_cpu_seconds(bird.pid)
        assert t_est is not None
        return {
            "seconds": round(t_done - t_est, 3),
            "cpu_s": round(cpu, 3),
            "cpu_by_process_s": {g: round(sum(used[p] for p in ps), 3) for g, ps in groups.items()},
            "max_rss_mb": round(rss, 1),
            "announcer_cpu_s": round(bird_cpu, 3),
            "announcer_max_rss_mb": round(D.proc_max_rss_mb(bird.pid), 1),
            "wall_from_start_s": round(t_done - t_start, 3),
        }
    finally:
        stop_poke.set()
        bird.stop()


def _receiver(name: str, peers: int) -> Any:
    if name == "apsv":
        return ApsvReceiver(peers, instances=min(peers, 2))
    if name == "frr":
        return D.FrrReceiver(peers, PORT)
    if name == "gobgp":
        return D.GobgpReceiver(peers, PORT)
    raise ValueError(f"unknown receiver {name!r}")


def run(
    prefixes: int = 100_000,
    peers: int = 1,
    repeat: int = 3,
    receivers: tuple[str, ...] = ("apsv", "frr", "gobgp"),
    timeout: float = 120.0,
) -> dict[str, Any]:
    from apsv.runtime.cluster import start_local_ray

    start_local_ray(num_cpus=8)
    out: dict[str, Any] = {"benchmark": "bgp-ingest", "prefixes": prefixes, "peers": peers, "repeat": repeat}
    out["receivers"] = {}
    announcer: dict[str, list[float]] = {"cpu_s": [], "max_rss_mb": []}
    for name in receivers:
        runs = []
        for _ in range(repeat):
            rx = _receiver(name, peers)
            try:
                runs.append(_measure(rx, prefixes, peers, timeout))
            finally:
                rx.stop()
        med: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu_s", "max_rss_mb")}
        med["cpu_by_process_s"] = min(runs, key=lambda r: abs(r["cpu_s"] - med["cpu_s"]))["cpu_by_process_s"]
        med["runs"] = [r["seconds"] for r in runs]
        med["prefixes_per_s"] = round(prefixes * peers / med["seconds"]) if med["seconds"] else None
        out["receivers"][name] = med
        announcer["cpu_s"] += [r["announcer_cpu_s"] for r in runs]
        announcer["max_rss_mb"] += [r["announcer_max_rss_mb"] for r in runs]
    out["announcer"] = {
        "name": "bird",
        "cpu_s_median": statistics.median(announcer["cpu_s"]),
        "max_rss_mb": max(announcer["max_rss_mb"]),
        # The fastest receiver's time against the announcer's CPU: near 1.0 would mean BIRD set the pace.
        "cpu_share_of_fastest": round(
            statistics.median(announcer["cpu_s"]) / max(1e-9, min(r["seconds"] for r in out["receivers"].values())), 3
        ),
    }
    r = out["receivers"]
    if "apsv" in r and "frr" in r:
        out["apsv_vs_frr_time_ratio"] = round(r["apsv"]["seconds"] / r["frr"]["seconds"], 2)
        out["apsv_vs_frr_cpu_ratio"] = round(r["apsv"]["cpu_s"] / r["frr"]["cpu_s"], 2)
        out["target_apsv_le_frr"] = r["apsv"]["seconds"] <= r["frr"]["seconds"]
        out["target_cpu_le_1_5x_frr"] = r["apsv"]["cpu_s"] <= 1.5 * r["frr"]["cpu_s"]
    return out


def render(r: dict[str, Any]) -> str:
    lines = [f"BIRD announcing {r['prefixes']:,} prefixes on {r['peers']} session(s), median of {r['repeat']}:"]
    for name, v in r["receivers"].items():
        lines.append(
            f"  {name:6} {v['seconds']:7.3f} s  ({v['prefixes_per_s'] or 0:>9,} prefixes/s)  "
            f"CPU {v['cpu_s']:.2f} s  peak RSS {v['max_rss_mb']:.0f} MB   runs {v['runs']}"
        )
    a = r["announcer"]
    lines.append(f"  announcer CPU {a['cpu_s_median']:.3f} s, peak RSS {a['max_rss_mb']:.0f} MB")
    if "apsv_vs_frr_time_ratio" in r:
        lines.append(f"  APSV / FRR time: {r['apsv_vs_frr_time_ratio']}, CPU: {r['apsv_vs_frr_cpu_ratio']}")
    if "apsv" in r["receivers"]:
        lines.append(f"  APSV CPU by process: {r['receivers']['apsv']['cpu_by_process_s']}")
    return "\n".join(lines)


def main(
    prefixes: int, peers: int, repeat: int, as_json: bool, out: Path | None, receivers: tuple[str, ...]
) -> dict[str, Any]:
    return run_and_report(lambda: run(prefixes, peers, repeat, receivers), render, as_json, out)

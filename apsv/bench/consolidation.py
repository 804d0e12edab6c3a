"""Consolidation: N virtual routers' BGP control planes on APSV against one routing daemon per
virtual router (the status quo), measured whole, in the same run, from the same announcer.

    apsv bench consolidation [--vrouters 10,50,100] [--prefixes P] [--json] [--out F] [--plot F]

Each virtual router has one BGP peer. One BIRD process plays every peer: it announces P real
IPv4 routes - prefixes, AS paths, origins and communities of a collector's RIB dump's best
paths - on N sessions, each from its own loopback address to its own receiver address. Every
virtual router learns the same P routes (a fleet behind the same upstreams); that APSV's
instances share interned attributes across the sessions they host is part of what
consolidation buys, and a daemon per router cannot.

- Status quo: one FRR `bgpd -Z` per virtual router, a process of its own, as a vRouter runs it.
- APSV: `apsv up` (a local head, Ray's dashboard, the forecaster on Ray Serve, BGP scaled by
  the predictive policy), one agent holding the N virtual routers' sessions, the stacks in
  VPSM-scaled instances. Everything in the head's process session counts: Ray's daemons, the
  dashboard, Serve and the forecaster's replica, the control plane, the instances, the agent.

Neither side exports anything to its peer or installs a FIB (FRR's -Z, the agent's `events:
state`). Per side and per N: the window from the first session Established to every session
holding all P routes (`seconds`), the CPU-seconds every process of the side used from the
announcer's start to then (`cpu_s`, from the scheduler: every thread, ns), the memory of the
side at convergence as PSS summed over its processes (`pss_mb`: RSS would count shared pages
once per process), and apart from the window: start-up (`startup_s`, `startup_cpu_s`) and the
idle cost after convergence (`idle_cpu_pct`, `pss_mb_idle`). The harness (this process, which
polls both sides) and the announcer are counted on neither side; the announcer's CPU is
reported to show it is not what sets the pace.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from apsv.bench import daemons as D
from apsv.bench import deployed, shared_data
from apsv.bench.deployed import Deployed
from apsv.bench.footprint import cpu_seconds, footprint, memory_mb
from apsv.bench.report import run_and_report

PORT = 1790
IDLE_S = 10.0  # how long the idle cost is measured after convergence
# The RIB dumps the routes come from, first found first (the biggest table first).
DUMPS = ("mrt/bgpkit-ripe-fixtures/bview.20000111.0032.gz", "mrt/bgpdump-testdata/bview.20020722.2337.gz")


# ---------------------------------------------------------------------------------------------
# The announced table


@dataclass(frozen=True)
class Route:
    prefix: str
    path: tuple[int, ...]  # AS_SEQUENCE, nearest AS first
    origin: int  # 0 IGP, 1 EGP, 2 INCOMPLETE
    communities: tuple[tuple[int, int], ...]

    def bird(self) -> str:
        """This route as a BIRD static route whose attributes BIRD exports over BGP."""
        sets = [f"bgp_origin = {('ORIGIN_IGP', 'ORIGIN_EGP', 'ORIGIN_INCOMPLETE')[self.origin]};"]
        sets += [f"bgp_path.prepend({asn});" for asn in reversed(self.path)]
        sets += [f"bgp_community.add(({a},{b}));" for a, b in self.communities]
        return f"  route {self.prefix} blackhole {{ {' '.join(sets)} }};"


def real_routes(count: int, dump: Path | None = None) -> tuple[list[Route], str]:
    """`count` IPv4 routes, in prefix order, from a RIB dump's Loc-RIB (its best path per
    prefix): those whose AS path is one AS_SEQUENCE (BIRD builds paths by prepending)."""
    from apsv.bgp import constants as C
    from apsv.bgp.nlri import prefix_str
    from apsv.mrt.replay import load_rib_dump

    candidates = [dump] if dump is not None else [shared_data() / d for d in DUMPS]
    for path in candidates:
        if not path.exists():
            continue
        view = load_rib_dump(path)
        rib = view.loc_rib.get((C.AFI_IPV4, C.SAFI_UNICAST))
        if rib is None:
            continue
        routes = []
        for key, attrs, _src in rib.items():
            segs = attrs.as_path
            if len(segs) != 1 or segs[0][0] != C.AS_SEQUENCE or not segs[0][1]:
                continue
            comms = attrs.get(C.ATTR_COMMUNITIES, ()) or ()
            routes.append(
                Route(
                    prefix_str(key, C.AFI_IPV4),
                    tuple(segs[0][1]),
                    int(attrs.origin or 0),
                    tuple((int(c) >> 16, int(c) & 0xFFFF) for c in comms),
                )
            )
        if len(routes) >= count:
            routes.sort(key=lambda r: _prefix_key(r.prefix))
            return routes[:count], str(path)
    raise ValueError(
        f"no RIB dump among {[str(c) for c in candidates]} has {count:,} IPv4 routes with a plain AS path "
        "(lower --prefixes, or set APSV_SHARED_DATA)"
    )


def _prefix_key(prefix: str) -> tuple[int, int]:
    import ipaddress

    net = ipaddress.ip_network(prefix)
    return int(net.network_address), net.prefixlen


# ---------------------------------------------------------------------------------------------
# Measuring a set of processes


@dataclass
class Side:
    """One side of the comparison, started and ready for the announcer."""

    name: str
    processes: Callable[[], list[psutil.Process]]  # every process of the side, now
    state: Callable[[], tuple[int, int]]  # (sessions Established, sessions holding every route)
    stop: Callable[[], None]
    startup_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def measure(side: Side, routes: list[str], n: int, timeout: float) -> dict[str, Any]:
    procs = side.processes()
    cpu0 = cpu_seconds(p.pid for p in procs)
    startup_cpu = sum(cpu0.values())
    pss0, _ = memory_mb(procs)
    bird = D.start_bird_announcer(0, n, PORT, routes)
    stop_poke = threading.Event()

    def poke() -> None:  # BIRD may hold its last partial UPDATE until its loop wakes
        while not stop_poke.wait(0.05):
            D.poke_bird(bird)

    poker = threading.Thread(target=poke, daemon=True)
    try:
        t_start = time.monotonic()
        poker.start()
        t_est = None
        est = done = 0
        while time.monotonic() < t_start + timeout:
            bird.alive()
            est, done = side.state()
            now = time.monotonic()
            if t_est is None and est >= 1:
                t_est = now
            if done >= n:
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"{side.name}: {done} of {n} sessions converged ({est} Established) after {timeout}s")
        t_done = time.monotonic()
        procs = side.processes()
        used = {p.pid: D.proc_cpu_seconds(p.pid) - cpu0.get(p.pid, 0.0) for p in procs}
        fp = footprint(procs, used)
        announcer_cpu = D.proc_cpu_seconds(bird.pid)
        stop_poke.set()
        # the idle cost: sessions up, tables held, keepalives, the control loop
        idle0 = cpu_seconds(p.pid for p in procs)
        time.sleep(IDLE_S)
        procs_idle = side.processes()
        idle_used = {p.pid: D.proc_cpu_seconds(p.pid) - idle0.get(p.pid, 0.0) for p in procs_idle}
        idle = footprint(procs_idle, idle_used)
        assert t_est is not None
        return {
            "seconds": round(t_done - t_est, 3),
            "seconds_from_announcer_start": round(t_done - t_start, 3),
            "cpu_s": round(sum(used.values()), 3),
            "pss_mb": round(fp.pss_mb, 1),
            "rss_mb": round(fp.rss_mb, 1),
            "processes": len(procs),
            "startup_s": round(side.startup_s, 2),
            "startup_cpu_s": round(startup_cpu, 3),
            "startup_pss_mb": round(pss0, 1),
            "idle_cpu_pct": round(100.0 * idle.cpu_s / IDLE_S, 2),
            "pss_mb_idle": round(idle.pss_mb, 1),
            "by_part": {
                k: {
                    "processes": v.processes,
                    "cpu_s": round(v.cpu_s, 3),
                    "pss_mb": round(v.pss_mb, 1),
                    "idle_cpu_pct": round(100.0 * idle.parts[k].cpu_s / IDLE_S, 2) if k in idle.parts else 0.0,
                }
                for k, v in sorted(fp.parts.items(), key=lambda kv: -kv[1].pss_mb)
            },
            "announcer_cpu_s": round(announcer_cpu, 3),
            **side.extra,
        }
    finally:
        stop_poke.set()
        bird.stop()


# ---------------------------------------------------------------------------------------------
# The status quo: a bgpd per virtual router


def frr_side(n: int, prefixes: int) -> Side:
    t0 = time.monotonic()
    daemons: list[D.FrrReceiver] = []
    try:
        for i in range(n):
            daemons.append(D.FrrReceiver(1, PORT, first=i))
    except BaseException:
        for d in daemons:
            d.stop()
        raise
    startup = time.monotonic() - t0
    converged: set[int] = set()

    def state() -> tuple[int, int]:
        est = 0
        for i, d in enumerate(daemons):
            if i in converged:
                est += 1
                continue
            (peer,) = d.summary().values()
            if peer.get("state") == "Established":
                est += 1
                if int(peer.get("pfxRcd", 0)) >= prefixes:
                    converged.add(i)
        return est, len(converged)

    def processes() -> list[psutil.Process]:
        return [psutil.Process(d.p.pid) for d in daemons if d.p.popen.poll() is None]

    def stop() -> None:
        for d in daemons:
            d.stop()

    return Side("frr", processes, state, stop, startup)


# ---------------------------------------------------------------------------------------------
# APSV: `apsv up`, and an agent for the virtual routers


def apsv_side(n: int, prefixes: int, workdir: Path) -> Side:
    """`apsv up` with examples/apsv.yaml's BGP protocol (predictive) and the forecaster, sized
    to this host's CPUs (its instances and the forecaster's replica together fit on it); one
    agent with the N virtual routers."""
    cpus = float(os.cpu_count() or 2)
    bgp = {
        "protocol": "bgp",
        "min_instances": 1,
        "max_instances": max(1, int((cpus - 0.5) / 0.5)),
        "policy": "predictive",
        "allocation": {"cpu": 0.5, "memory": "1GiB", "buffer_quota": "32MiB", "max_sessions": 10000},
    }
    dep = Deployed(deployed.config([bgp]), D.agent_vrouters(n, PORT), workdir, "apsv-bench-consolidation")

    def state() -> tuple[int, int]:
        infos = [i for i in dep.session_infos() if i["state"] == "Established"]
        return len(infos), sum(1 for i in infos if int(i["loc_rib"].get("1/1", 0)) >= prefixes)

    side = Side("apsv", dep.processes, state, dep.close, dep.startup_s)
    side.extra["instances_at_start"] = dep.instances()
    side.extra["_instances"] = dep.instances  # read once converged (dropped from the JSON)
    return side


# ---------------------------------------------------------------------------------------------
# The run


def crossover(runs: list[dict[str, Any]], key: str) -> int | None:
    """The smallest N from which APSV uses less `key` than the status quo at every measured N
    above it, interpolated linearly between the two measured N around the crossing (None: APSV
    never falls below within the measured range)."""
    pts = sorted((r["vrouters"], r["apsv"][key] - r["frr"][key]) for r in runs)
    if not pts or pts[-1][1] >= 0:
        return None
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] < 0:
        i -= 1
    if i == 0:
        return int(pts[0][0])  # below already at the smallest measured N
    (n0, d0), (n1, d1) = pts[i - 1], pts[i]
    return math.ceil(float(n0) + float(n1 - n0) * float(d0) / float(d0 - d1))


def projected_crossover(runs: list[dict[str, Any]], key: str) -> int | None:
    """Where least-squares lines through each side's measured `key` against N cross, when
    APSV's grows more slowly (None: fewer than two N measured, or it never crosses): an
    extrapolation beyond the measured range, reported as one."""
    if len(runs) < 2:
        return None
    import numpy as np

    n = np.array([float(r["vrouters"]) for r in runs])
    a_slope, a_icpt = np.polyfit(n, [float(r["apsv"][key]) for r in runs], 1)
    f_slope, f_icpt = np.polyfit(n, [float(r["frr"][key]) for r in runs], 1)
    if a_slope >= f_slope:
        return None
    return max(1, math.ceil(float((a_icpt - f_icpt) / (f_slope - a_slope))))


def run(vrouters: list[int], prefixes: int, timeout: float = 600.0, dump: Path | None = None) -> dict[str, Any]:
    table, source = real_routes(prefixes, dump)
    routes = [r.bird() for r in table]
    out: dict[str, Any] = {
        "benchmark": "consolidation",
        "prefixes": prefixes,
        "routes_from": source,
        "distinct_as_paths": len({r.path for r in table}),
        "host": {"cpus": os.cpu_count(), "memory_mb": round(psutil.virtual_memory().total / 1e6)},
        "runs": [],
    }
    for n in vrouters:
        entry: dict[str, Any] = {"vrouters": n}
        frr = frr_side(n, prefixes)
        try:
            entry["frr"] = measure(frr, routes, n, timeout)
        finally:
            frr.stop()
        workdir = Path(tempfile.mkdtemp(prefix="apsv-bench-cons-", dir="/tmp"))
        try:
            side = apsv_side(n, prefixes, workdir)
            try:
                count = side.extra.pop("_instances")
                entry["apsv"] = measure(side, routes, n, timeout)
                entry["apsv"]["instances_at_end"] = count()
            finally:
                side.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        a, f = entry["apsv"], entry["frr"]
        entry["ratios"] = {k: round(a[k] / f[k], 3) if f[k] else None for k in ("seconds", "cpu_s", "pss_mb")}
        out["runs"].append(entry)
    out["crossover_vrouters"] = {"pss": crossover(out["runs"], "pss_mb"), "cpu": crossover(out["runs"], "cpu_s")}
    # beyond the measured N: where each side's linear trend crosses (a projection, not a measurement)
    out["crossover_vrouters_projected"] = {
        "pss": projected_crossover(out["runs"], "pss_mb"),
        "cpu": projected_crossover(out["runs"], "cpu_s"),
    }
    return out


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [x["vrouters"] for x in r["runs"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "pss_mb", "memory at convergence (PSS, MB)"), (axes[1], "cpu_s", "CPU-seconds")):
        for side, style in (("apsv", "o-"), ("frr", "s--")):
            ax.plot(
                ns, [x[side][key] for x in r["runs"]], style, label="APSV" if side == "apsv" else "FRR bgpd per vRouter"
            )
        ax.set_xlabel("virtual routers (one BGP session each)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Consolidation: {r['prefixes']:,} real routes per virtual router")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render(r: dict[str, Any]) -> str:
    lines = [f"{r['prefixes']:,} routes per virtual router ({r['distinct_as_paths']:,} AS paths, {r['routes_from']}):"]
    lines.append(f"  {'N':>4}  {'side':5} {'seconds':>8} {'CPU s':>7} {'PSS MB':>8} {'idle CPU %':>10} {'start s':>8}")
    for x in r["runs"]:
        for side in ("frr", "apsv"):
            v = x[side]
            lines.append(
                f"  {x['vrouters']:>4}  {side:5} {v['seconds']:8.2f} {v['cpu_s']:7.2f} {v['pss_mb']:8.0f} "
                f"{v['idle_cpu_pct']:10.1f} {v['startup_s']:8.1f}"
            )
        lines.append(f"        APSV / FRR: {x['ratios']}")
    projected = r["crossover_vrouters_projected"]
    lines.append(f"  crossover N: {r['crossover_vrouters']} (projected from the trends: {projected})")
    return "\n".join(lines)


def main(vrouters: list[int], prefixes: int, as_json: bool, out: Path | None, plot_path: Path | None) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        r = run(vrouters, prefixes)
        if plot_path is not None:
            r["plot"] = str(plot(r, plot_path))
        return r

    return run_and_report(go, render, as_json, out)

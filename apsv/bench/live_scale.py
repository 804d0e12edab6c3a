"""Live scale: BGP and BFD sessions of many virtual routers through one agent, the whole path and
predictive scaling, held until a step's latency or BFD says this host has had enough.

    apsv bench live-scale [--steps 250:500,500:1000,1000:2000] [--vrouters 100] [--prefixes 1000]
                          [--hold 60] [--bfd-interval 300] [--churn-every 5] [--json] [--out F]

Each step is BGP:BFD session counts, on a fresh deployment (`apsv up`: local head, dashboard,
the forecaster on Ray Serve, BGP and BFD scaled by the predictive policy; one agent with every
virtual router's sessions):

- BGP: one BIRD process plays every far end on loopback; session i announces a `--prefixes`
  slice of a collector's RIB dump (real prefixes, AS paths, origins, communities; slice i mod
  the number of slices the dump holds).
- Churn, during the hold: every `--churn-every` seconds BIRD withdraws one slice's routes and
  half a period later announces them again (slice after slice; every session fed by that slice
  sees it). After the hold every BGP session must hold its whole slice again.
- BFD: FRR bfdd plays every far end at `--bfd-interval` ms x 3, in a network namespace of its
  own, the agent's ends in another, joined by a veth pair (one address pair per session).

A step passes when every BGP session holds its whole slice and every BFD session is Up, then
for `--hold` seconds: no BFD session leaves Up on either side (a false down: the far ends never
fail), the p99 message latency (frame received by the agent to applied by its stack, the
VPSM's per-second histograms merged over the hold) is at most 100 ms for each protocol, and
after it every BGP session holds its whole slice again. BFD's periodic packets never reach a
stack (the agent runs them: docs/bfd.md), so its p99 covers the state changes and polls that do.
Reported per step: convergence time, p99 per protocol, false downs, CPU-seconds per
session-second and PSS per session (the deployment's growth from empty, split by part), and
the far ends' CPU (bfdd is single-threaded; its core ends the BFD count first on 2 cores).
Needs root (namespaces) and FRR and BIRD.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from apsv.bench import bfd_scale as B
from apsv.bench import daemons as D
from apsv.bench import deployed
from apsv.bench.consolidation import real_routes
from apsv.bench.deployed import Deployed
from apsv.bench.footprint import footprint, memory_mb
from apsv.bench.report import run_and_report

PORT = 1790
P99_TARGET_MS = 100.0
STATE_UP = "UP"


def bird_slices(routes: list[str], per_session: int, sessions: int, port: int) -> D.Proc:
    """BIRD announcing slice i % K of `routes` (K slices of `per_session`) on session i."""
    k = max(1, len(routes) // per_session)
    run = D._rundir("bird")
    statics = "\n".join(
        f"ipv4 table t{j};\nprotocol static s{j} {{ ipv4 {{ table t{j}; }};\n"
        + "\n".join(routes[j * per_session : (j + 1) * per_session])
        + "\n}"
        for j in range(k)
    )
    bgp = "\n".join(
        f"""protocol bgp r{i} {{
  local {D.announcer_addr(i)} as {D.ANNOUNCER_AS};
  neighbor {D.receiver_addr(i)} port {port} as {D.RECEIVER_AS};
  strict bind yes; multihop; connect delay time 0; connect retry time 2;
  ipv4 {{ table t{i % k}; import none; export all; next hop address {D.NEXT_HOP}; }};
}}"""
        for i in range(sessions)
    )
    (run / "bird.conf").write_text(f"router id 10.0.3.1;\nprotocol device {{ }}\n{statics}\n{bgp}\n")
    sock = run / "bird.ctl"
    cmd = [D.which("bird"), "-f", "-c", str(run / "bird.conf"), "-s", str(sock), "-P", str(run / "pid")]
    p = D._start("bird", cmd, run)
    p.info["sock"] = sock
    D.wait("bird up", lambda: p.alive() and sock.exists(), 60)
    return p


def vrouters(n_bgp: int, n_bfd: int, n_vrouters: int, interval_ms: int) -> list[dict[str, Any]]:
    """The agent's virtual routers, sessions dealt round-robin (BGP i and BFD i on router i mod N)."""
    out: list[dict[str, Any]] = [{"id": v + 1, "bgp": [], "bfd": []} for v in range(n_vrouters)]
    for i in range(n_bgp):
        vr = out[i % n_vrouters]
        vr["bgp"].append(
            {
                "session": len(vr["bgp"]) + 1,
                "listen": f"{D.receiver_addr(i)}:{PORT}",
                "peer": D.announcer_addr(i),
                "local_as": D.RECEIVER_AS,
                "peer_as": D.ANNOUNCER_AS,
                "router_id": "10.0.2.1",
                "events": "state",
                "ebgp_requires_policy": False,
            }
        )
    for i in range(n_bfd):
        vr = out[i % n_vrouters]
        vr["bfd"].append(
            {
                "session": len(vr["bgp"]) + len(vr["bfd"]) + 1,  # ids are unique within a router
                "local_address": B.apsv_addr(i),
                "peer_address": B.frr_addr(i),
                "netns": B.NS_APSV,
                "desired_min_tx_ms": interval_ms,
                "required_min_rx_ms": interval_ms,
                "detect_mult": 3,
            }
        )
    return [v for v in out if v["bgp"] or v["bfd"]]


def _p99(dep: Deployed, protocol: str, since: float) -> tuple[float | None, float | None, int]:
    """(p99 over the window from the merged histograms, the worst one-second p99, messages)."""
    import ray

    from apsv.scaling.latency import merge, quantile

    rows = ray.get(dep.vpsm.get_timeline.remote(protocol, since))
    hist = merge(rows)
    n = int(hist.sum())
    worst = max((float(r["p99_ms"]) for r in rows if r.get("p99_ms") is not None and r.get("messages")), default=None)
    return (round(quantile(hist, 0.99), 2) if n else None), (round(worst, 2) if worst is not None else None), n


def _p99_recorded(dep: Deployed, protocol: str, since: float, wait_s: float = 10.0) -> float | None:
    """The p99 over the window once the VPSM's timeline holds it: the VPSM records each interval
    at its next tick, which on a loaded host may come after the sessions have converged."""
    deadline = time.monotonic() + wait_s
    while True:
        p99, _, n = _p99(dep, protocol, since)
        if n or time.monotonic() > deadline:
            return p99
        time.sleep(0.5)


def _bfd_downs(dep: Deployed) -> tuple[int, int]:
    """(BFD sessions that left Up, events the agent dropped) since the last call; the first
    call starts the agent's event stream."""
    import ray

    got = ray.get(dep.agent.events.remote())
    downs = sum(1 for e in got if e.get("protocol") == "bfd" and e.get("event") == "state" and e.get("old") == STATE_UP)
    return downs, int(ray.get(dep.agent.status.remote())["counters"].get("events_dropped", 0))


def _poke(bird: D.Proc, stop: threading.Event) -> None:
    """BIRD may hold its last partial UPDATE until its loop wakes (../shared/peers/README.md)."""
    while not stop.wait(0.2):
        D.poke_bird(bird)


def _converge(
    dep: Deployed, bird: D.Proc | None, bfdd: B.Bfdd | None, prefixes: int, n_bgp: int, n_bfd: int, until: float
) -> tuple[int, int, int]:
    """Wait (until the monotonic time `until`) for every BGP session to hold its whole slice and
    every BFD session to be Up at bfdd: (BGP sessions complete, Established, BFD Up)."""
    bgp_done = est = bfd_up = 0
    while time.monotonic() < until:
        if bird is not None:
            bird.alive()
        bgp = [i for i in dep.session_infos() if "loc_rib" in i and i["state"] == "Established"]
        est = len(bgp)
        bgp_done = sum(1 for i in bgp if int(i["loc_rib"].get("1/1", 0)) >= prefixes)
        bfd_up = sum(1 for p in bfdd.peers() if p.get("status") == "up") if bfdd else 0
        if bgp_done >= n_bgp and bfd_up >= n_bfd:
            break
        time.sleep(1.0)
    return bgp_done, est, bfd_up


def _flap(bird: D.Proc, slices: int, every: float, stop: threading.Event, count: list[int]) -> None:
    """Churn: slice after slice, BIRD withdraws its routes (`disable`) and announces them again
    half a period later (`enable`), to every session it feeds; always enabled again at the end."""
    birdc = [D.which("birdc"), "-s", str(bird.info["sock"])]
    j = 0
    while not stop.is_set():
        name = f"s{j % slices}"
        subprocess.run([*birdc, "disable", name], capture_output=True, check=False)
        stop.wait(every / 2)
        subprocess.run([*birdc, "enable", name], capture_output=True, check=False)
        count[0] += 1
        j += 1
        stop.wait(every / 2)


def _protocols() -> list[dict[str, Any]]:
    """BGP and BFD scaled by the predictive policy, BGP up to what this host's cores hold."""
    cpus = float(os.cpu_count() or 2)
    return [
        {
            "protocol": "bgp",
            "min_instances": 1,
            "max_instances": max(1, int((cpus - 0.75) / 0.5)),
            "policy": "predictive",
            "allocation": {"cpu": 0.5, "memory": "2GiB", "buffer_quota": "32MiB", "max_sessions": 10000},
        },
        {
            "protocol": "bfd",
            "min_instances": 1,
            "max_instances": 2,
            "policy": "predictive",
            "allocation": {"cpu": 0.25, "memory": "512MiB", "buffer_quota": "4MiB", "max_sessions": 10000},
        },
    ]


def _start_churn(
    bird: D.Proc | None, routes: list[str], prefixes: int, n_bgp: int, churn_every: float
) -> tuple[threading.Event, list[int]]:
    """Start BIRD's churn (none without BGP or with `churn_every` 0): its stop event and its
    flap count, which the churn thread goes on updating until it sees the event."""
    stop_flaps = threading.Event()
    flaps = [0]
    if bird is not None and churn_every > 0:
        k = max(1, len(routes) // prefixes)
        args = (bird, min(k, n_bgp), churn_every, stop_flaps, flaps)
        threading.Thread(target=_flap, args=args, daemon=True).start()
    return stop_flaps, flaps


@dataclass
class _Hold:
    """What the hold measured: the report's fields, and what the step's verdict reads."""

    report: dict[str, Any]
    false_downs: int  # BFD sessions that left Up at the agent
    frr_down: int  # BFD sessions not Up at bfdd after the hold
    p99: dict[str, tuple[float | None, float | None, int]]  # per protocol, as `_p99` gives it
    flaps: list[int]  # the churn's count, still updated until its thread stops


def _hold(
    dep: Deployed,
    bird: D.Proc | None,
    bfdd: B.Bfdd | None,
    routes: list[str],
    prefixes: int,
    n_bgp: int,
    n_bfd: int,
    hold: float,
    churn_every: float,
    empty_pss: float,
) -> _Hold:
    """The hold: everything up for `hold` seconds; BGP churns (a slice's routes withdrawn and
    announced again in turn), BFD's far ends stay steady. Measures false downs, p99 per
    protocol, and the CPU and memory the deployment used for it."""
    _, dropped0 = _bfd_downs(dep)  # starts the event stream: what follows is the hold's
    procs = dep.processes()
    cpu0 = {p.pid: D.proc_cpu_seconds(p.pid) for p in procs}
    bfdd_cpu0 = D.proc_cpu_seconds(bfdd.pid()) if bfdd else 0.0
    since = time.time()
    t1 = time.monotonic()
    stop_flaps, flaps = _start_churn(bird, routes, prefixes, n_bgp, churn_every)
    time.sleep(hold)
    stop_flaps.set()
    dt = time.monotonic() - t1
    downs, dropped = _bfd_downs(dep)
    if dropped > dropped0:
        raise RuntimeError(f"the agent dropped {dropped - dropped0} events during the hold: false downs unknown")
    procs = dep.processes()
    used = {p.pid: D.proc_cpu_seconds(p.pid) - cpu0.get(p.pid, 0.0) for p in procs}
    fp = footprint(procs, used)
    frr_down = sum(1 for p in bfdd.peers() if p.get("status") != "up") if bfdd else 0
    sessions = n_bgp + n_bfd
    p99 = {proto: _p99(dep, proto, since) for proto in ("bgp", "bfd")}
    report = {
        "hold_s": round(dt, 1),
        "p99_ms": {k: v[0] for k, v in p99.items()},
        "worst_second_p99_ms": {k: v[1] for k, v in p99.items()},
        "messages": {k: v[2] for k, v in p99.items()},
        "false_bfd_downs": {"apsv": downs, "frr": frr_down},
        "cpu_pct": round(100.0 * sum(used.values()) / dt, 1),
        "cpu_s_per_session_s": round(sum(used.values()) / dt / sessions, 6),
        "pss_mb": round(fp.pss_mb, 1),
        "rss_mb": round(fp.rss_mb, 1),
        "pss_kb_per_session": round(1000.0 * (fp.pss_mb - empty_pss) / sessions, 1),
        "by_part": {
            k: {"cpu_pct": round(100.0 * v.cpu_s / dt, 2), "pss_mb": round(v.pss_mb, 1)}
            for k, v in sorted(fp.parts.items(), key=lambda kv: -kv[1].cpu_s)
        },
        "instances": dep.instances(),
        "bfdd_cpu_pct": round(100.0 * (D.proc_cpu_seconds(bfdd.pid()) - bfdd_cpu0) / dt, 1) if bfdd else None,
        "bird_cpu_s": round(D.proc_cpu_seconds(bird.pid), 2) if bird else None,
    }
    return _Hold(report, downs, frr_down, p99, flaps)


def _failure(held: _Hold, reconverged: bool) -> str | None:
    """Why a step that converged failed its hold (None: it passed)."""
    if held.false_downs or held.frr_down:
        return "false BFD downs"
    if not reconverged:
        return "a BGP session lacks routes after the churn"
    if not all(v[0] is None or v[0] <= P99_TARGET_MS for v in held.p99.values()):
        return f"p99 above {P99_TARGET_MS:g} ms"
    return None


def _teardown(dep: Deployed | None, bird: D.Proc | None, bfdd: B.Bfdd | None, n_bfd: int, workdir: Path) -> None:
    """Stop what a step started, the deployment first, and remove its namespaces and files."""
    if dep is not None:
        dep.close()
    if bird is not None:
        bird.stop()
    if bfdd is not None:
        bfdd.stop()
    if n_bfd:
        B.teardown_namespaces()
    shutil.rmtree(workdir, ignore_errors=True)


def one_step(
    n_bgp: int,
    n_bfd: int,
    n_vrouters: int,
    prefixes: int,
    hold: float,
    interval_ms: int,
    routes: list[str],
    churn_every: float = 5.0,
) -> dict[str, Any]:
    """One step on a fresh deployment: converge, hold, converge again after the churn."""
    result: dict[str, Any] = {"bgp_sessions": n_bgp, "bfd_sessions": n_bfd, "ok": False}
    workdir = Path(tempfile.mkdtemp(prefix="apsv-bench-scale-", dir="/tmp"))
    bird = bfdd = dep = None
    try:
        if n_bfd:
            B.setup_namespaces(n_bfd)
        dep = Deployed(
            deployed.config(_protocols(), forecaster_cpus=0.25),
            vrouters(n_bgp, n_bfd, n_vrouters, interval_ms),
            workdir,
            "apsv-bench-live-scale",
        )
        result["startup_s"] = round(dep.startup_s, 1)
        empty_pss, _ = memory_mb(dep.processes())
        t0, t0_wall = time.monotonic(), time.time()
        if n_bfd:
            bfdd = B.Bfdd(n_bfd, interval_ms)
        if n_bgp:
            bird = bird_slices(routes, prefixes, n_bgp, PORT)
        stop_poke = threading.Event()
        if bird is not None:
            threading.Thread(target=_poke, args=(bird, stop_poke), daemon=True).start()
        bgp_done, est, bfd_up = _converge(dep, bird, bfdd, prefixes, n_bgp, n_bfd, t0 + 600)
        result["converged_s"] = round(time.monotonic() - t0, 1)
        # the tables' transfer: every session's routes at once, the busiest the path gets here
        result["p99_ms_converging"] = _p99_recorded(dep, "bgp", t0_wall)
        result["bgp_converged"], result["bgp_established"], result["bfd_up"] = bgp_done, est, bfd_up
        if bgp_done < n_bgp or bfd_up < n_bfd:
            result["why"] = "not every session converged within 600 s"
            return result
        held = _hold(dep, bird, bfdd, routes, prefixes, n_bgp, n_bfd, hold, churn_every, empty_pss)
        result.update(held.report)
        # after the churn: every session holds its whole slice again
        t2 = time.monotonic()
        again = _converge(dep, bird, bfdd, prefixes, n_bgp, n_bfd, t2 + 300)[0] if bird else 0
        stop_poke.set()
        result["flaps"] = held.flaps[0]
        result["reconverged_s"] = round(time.monotonic() - t2, 1) if again >= n_bgp else None
        why = _failure(held, reconverged=bird is None or result["reconverged_s"] is not None)
        result["ok"] = why is None
        if why is not None:
            result["why"] = why
        return result
    finally:
        _teardown(dep, bird, bfdd, n_bfd, workdir)


def run(
    steps: list[tuple[int, int]], n_vrouters: int, prefixes: int, hold: float, interval_ms: int, churn_every: float
) -> dict[str, Any]:
    table, source = real_routes(max(prefixes, min(50 * prefixes, 50_000)))
    routes = [r.bird() for r in table]
    out: dict[str, Any] = {
        "benchmark": "live-scale",
        "vrouters": n_vrouters,
        "prefixes_per_session": prefixes,
        "routes_from": source,
        "bfd_interval_ms": interval_ms,
        "bfd_detect_mult": 3,
        "hold_s": hold,
        "churn_every_s": churn_every,
        "p99_target_ms": P99_TARGET_MS,
        "host": {"cpus": psutil.cpu_count(), "memory_mb": round(psutil.virtual_memory().total / 1e6)},
        "steps": [],
    }
    for n_bgp, n_bfd in steps:
        r = one_step(n_bgp, n_bfd, n_vrouters, prefixes, hold, interval_ms, routes, churn_every)
        out["steps"].append(r)
        if not r["ok"]:
            break
    held = [s for s in out["steps"] if s["ok"]]
    out["largest_held"] = (
        {"bgp_sessions": held[-1]["bgp_sessions"], "bfd_sessions": held[-1]["bfd_sessions"]} if held else None
    )
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"{r['vrouters']} virtual routers, {r['prefixes_per_session']:,} routes per BGP session, BFD at "
        f"{r['bfd_interval_ms']} ms x 3, held {r['hold_s']:g} s:"
    ]
    for s in r["steps"]:
        head = f"  BGP {s['bgp_sessions']:>5} + BFD {s['bfd_sessions']:>5}: "
        if "p99_ms" not in s:
            lines.append(head + f"FAILED ({s.get('why')})")
            continue
        lines.append(
            head + f"{'ok' if s['ok'] else 'FAILED (' + s.get('why', '') + ')'}  converged {s['converged_s']} s, "
            f"p99 {s['p99_ms']} ms, false BFD downs {s['false_bfd_downs']}, CPU {s['cpu_pct']}%, "
            f"{s['pss_kb_per_session']} kB PSS/session, bfdd {s['bfdd_cpu_pct']}%"
        )
    lines.append(f"  largest held: {r['largest_held']}")
    return "\n".join(lines)


def main(
    steps: list[tuple[int, int]],
    n_vrouters: int,
    prefixes: int,
    hold: float,
    interval_ms: int,
    churn_every: float,
    as_json: bool,
    out: Path | None,
) -> dict[str, Any]:
    return run_and_report(
        lambda: run(steps, n_vrouters, prefixes, hold, interval_ms, churn_every), render, as_json, out
    )

"""Chaos soak: a deployment under load and a fault every 20 s, checked by an independent observer.

    apsv bench chaos [--minutes 30] [--every 20] [--seed 1] [--bgp 8] [--bfd 16]
                     [--prefixes 1000] [--replay 40] [--json] [--out F]

The deployment is an operator's (`apsv up`: a local head, the forecaster on Ray Serve, BGP on
the process backend and BFD on the Docker backend, both scaled by the predictive policy), with
one agent actor. Its load, for the whole run:

- BIRD announces `--prefixes` real routes (a collector's RIB dump) on each of `--bgp` sessions
  to the agent, over loopback;
- FRR's bfdd holds `--bfd` BFD sessions with the agent at 300 ms x 3, across a veth pair
  between two network namespaces;
- real MRT churn (two update dumps, every recorded peer) is replayed, time-compressed, into
  `--replay` more BGP sessions of another tenant, round after round, each round on new sessions.

Every `--every` seconds, once the previous fault has been recovered from, a fault from
`apsv/bench/faults.py` (each of the nine before any repeats): kill -9 a process or a Docker
instance, docker pause one past its call deadline, kill -9 the multiplexer or the VPSM,
exhaust the replay client's buffer pool, delete the Serve forecaster, a reset storm from BIRD,
a BFD peer shut down for 3 s. A fault is survived when, within 120 s, every peer session is
Established again, every BFD session is Up at both ends, each protocol has its minimum
instances, the control plane answers, and the forecaster is in use.

The checker is independent of what APSV reports about itself:
- each replay round ends with every session compared to an in-process replay of the same
  messages: frames applied once each, in order, and the same Loc-RIB digest (`lost`,
  `duplicated`, `rib_mismatches`);
- BIRD's own view (`birdc show protocols`, every second) gives the resets its sessions saw;
  those of sessions a reset storm restarted, during it, are `peer_resets_injected`, any other
  is `peer_resets_unexpected`; at the end each session must hold every route BIRD sent;
- bfdd's view (every 0.5 s) and the agent's BFD events give the BFD downs; any but the flapped
  peer's, during its flap, is a `false_bfd_downs`;
- every 10 s: the deployment's RSS and open file descriptors, the object store's bytes, the
  telemetry's Parquet bytes; a least-squares slope after the warm-up (the first fifth, at least
  a minute) says whether anything grows (`rss_slope_mb_per_h`, `fd_slope_per_h`, ...).

Needs root (namespaces), BIRD, FRR's bfdd and a Docker engine.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apsv.bench import bfd_scale as B
from apsv.bench import daemons as D
from apsv.bench import deployed
from apsv.bench.chaos_load import ReplayLoad
from apsv.bench.chaos_observe import Event, Watch, bird_protocols, fd_slopes, process_kind, slope_per_h
from apsv.bench.faults import FAULTS, Injected, Schedule
from apsv.bench.report import run_and_report

PORT = 1790
BFD_INTERVAL_MS = 300
RECOVER_S = 120.0


# -- the rig -------------------------------------------------------------------------------------


@dataclass
class Rig:
    """Everything a fault acts on."""

    dep: Any
    im: Any
    vpsm: Any
    replay: ReplayLoad
    bird: Any
    birdc: list[str]
    bird_protocols: list[str]
    bfdd: Any
    n_bgp: int
    n_bfd: int
    forecaster: Any
    bfd_call_deadline_s: float
    bfd_keys: dict[tuple[int, int], str] = field(default_factory=dict)  # (vrouter, session) -> peer
    bgp_keys: dict[tuple[int, int], str] = field(default_factory=dict)  # (vrouter, session) -> BIRD's name
    apsv_bgp_downs: list[Event] = field(default_factory=list)  # APSV's side: its BGP sessions leaving Established

    @staticmethod
    def bfd_addresses(i: int) -> tuple[str, str]:
        """(the agent's address, bfdd's) of BFD session i: bfdd's `peer X local-address Y`."""
        return B.apsv_addr(i), B.frr_addr(i)

    def bfdd_configure(self, *lines: str) -> None:
        cmd = [D.which("vtysh"), "--vty_socket", str(self.bfdd.run), "-c", "configure terminal", "-c", "bfd"]
        for line in lines:
            cmd += ["-c", line]
        subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)


def bfd_name(agent_address: str) -> str:
    """BFD session i's name in the checker, from the agent's address of it (both views key by it)."""
    return f"bfd@{agent_address}"


def _protocols(bfd_deadline_s: float) -> list[dict[str, Any]]:
    return [
        {
            "protocol": "bgp",
            "min_instances": 2,
            "max_instances": 3,
            "policy": "predictive",
            "allocation": {"cpu": 0.25, "memory": "1GiB", "buffer_quota": "16MiB"},
        },
        {
            "protocol": "bfd",
            "backend": "docker",
            "min_instances": 1,
            "max_instances": 2,
            "policy": "predictive",
            "allocation": {"cpu": 0.25, "memory": "256MiB", "buffer_quota": "4MiB", "call_deadline_s": bfd_deadline_s},
        },
    ]


def _vrouters(n_bgp: int, n_bfd: int) -> list[dict[str, Any]]:
    from apsv.bench.live_scale import vrouters

    return vrouters(n_bgp, n_bfd, max(1, (n_bgp + n_bfd) // 4), BFD_INTERVAL_MS)


def _agent_downs(rig: Rig) -> list[Event]:
    """The agent's events since the last call (APSV's side): the BFD sessions that left Up,
    returned; the BGP sessions that left Established, added to `rig.apsv_bgp_downs`."""
    import ray

    out = []
    for e in ray.get(rig.dep.agent.events.remote(), timeout=60):
        if e.get("protocol") == "bfd" and e.get("event") == "state" and e.get("old") == "UP":
            peer = rig.bfd_keys.get((int(e["vrouter"]), int(e["session"])), f"bfd {e['vrouter']}/{e['session']}")
            out.append(Event(float(e["ts"]), peer, "down"))
        elif e.get("protocol") == "bgp" and e.get("event") == "state" and e.get("old") == "Established":
            who = rig.bgp_keys.get((int(e["vrouter"]), int(e["session"])), f"bgp {e['vrouter']}/{e['session']}")
            rig.apsv_bgp_downs.append(Event(float(e["ts"]), who, f"APSV: {e.get('new')}"))
    return out


def _health(rig: Rig, mins: dict[str, int]) -> tuple[bool, str]:
    """Whether everything is as before the fault; else what is not."""
    try:
        return _healthy(rig, mins)
    except Exception as e:  # an actor found dead on the way: not healthy yet
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _healthy(rig: Rig, mins: dict[str, int]) -> tuple[bool, str]:
    import ray

    try:
        ray.get(rig.im.stats.remote(), timeout=10)
        st = ray.get(rig.vpsm.status.remote(), timeout=10)
    except Exception as e:
        return False, f"control plane: {type(e).__name__}"
    for p, n in mins.items():
        if st["protocols"][p]["running"] < n:
            return False, f"{p}: {st['protocols'][p]['running']} instances running, minimum {n}"
    if not (st.get("forecaster") or {}).get("available"):
        return False, "forecaster not in use"
    routes = ray.get(rig.im.routes_table.remote(), timeout=10)
    handles = ray.get(rig.vpsm.instance_handles.remote(), timeout=10)
    agent = [tuple(k) for ks in routes.values() for k in ks if k[0] == 1]
    where = {tuple(k): i for i, ks in routes.items() for k in ks}
    states: dict[str, int] = {}
    for iid in {where[k] for k in agent}:
        if iid not in handles:
            return False, f"instance {iid} not ready"
        infos = ray.get(handles[iid].session_infos.remote([k for k in agent if where[k] == iid], False), timeout=10)
        for info in infos.values():
            if info is not None:
                states[str(info.get("state"))] = states.get(str(info.get("state")), 0) + 1
    if states.get("Established", 0) < rig.n_bgp:
        return False, f"BGP sessions Established: {states.get('Established', 0)} of {rig.n_bgp}"
    bird = bird_protocols(rig.birdc)  # the peers' own view
    down = sorted(n for n, (established, *_) in bird.items() if not established)
    if down:
        return False, f"BIRD sessions not Established: {', '.join(down)}"
    up = sum(1 for p in rig.bfdd.peers() if p.get("status") == "up")
    if up < rig.n_bfd:
        return False, f"BFD sessions up at bfdd: {up} of {rig.n_bfd}"
    if rig.replay.error:
        return False, f"replay: {rig.replay.error}"
    return True, "ok"


def _sample(rig: Rig, t: float, telemetry: Path) -> dict[str, Any]:
    import psutil

    rss = fds = 0
    by_role: dict[str, int] = {}  # file descriptors per kind of process: what grows, if anything does
    procs = rig.dep.processes()
    for p in procs:
        try:
            rss += p.memory_info().rss
            n = p.num_fds()
            fds += n
            role = process_kind(p)
            by_role[role] = by_role.get(role, 0) + n
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    store = None
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(rig.dep.target["address"])  # type: ignore[no-untyped-call]
        reply = get_memory_info_reply(state)  # type: ignore[no-untyped-call]
        store = round(reply.store_stats.object_store_bytes_used / 2**20, 2)
    except Exception:
        pass
    parquet = sum(f.stat().st_size for f in telemetry.rglob("*.parquet")) if telemetry.exists() else 0
    return {
        "t": round(t, 1),
        "rss_mb": round(rss / 2**20, 1),
        "fds": fds,
        "processes": len(procs),
        "fds_by_process": dict(sorted(by_role.items())),
        "object_store_mb": store,
        "parquet_mb": round(parquet / 2**20, 3),
    }


def run(
    minutes: float,
    every_s: float = 20.0,
    seed: int = 1,
    n_bgp: int = 8,
    n_bfd: int = 16,
    prefixes: int = 1000,
    replay_sessions: int = 40,
) -> dict[str, Any]:
    import ray

    from apsv.bench.consolidation import real_routes
    from apsv.bench.live_scale import _poke, bird_slices
    from apsv.config import ForecasterSection

    rng = random.Random(seed)
    bfd_deadline = 10.0
    workdir = Path(tempfile.mkdtemp(prefix="apsv-bench-chaos-", dir="/tmp"))
    cfg = deployed.config(_protocols(bfd_deadline), forecaster_cpus=0.25)
    stop_poke = threading.Event()
    result: dict[str, Any] = {"benchmark": "chaos", "minutes": minutes, "every_s": every_s, "seed": seed}
    # Everything started is stopped, in reverse, each whether or not another failed to stop.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        cleanup.callback(B.teardown_namespaces)
        B.setup_namespaces(n_bfd)
        vrs = _vrouters(n_bgp, n_bfd)
        dep = deployed.Deployed(cfg, vrs, workdir, "apsv-bench-chaos")
        cleanup.callback(dep.close)
        table, source = real_routes(max(prefixes * n_bgp, 2000))
        bird = bird_slices([r.bird() for r in table], prefixes, n_bgp, PORT)
        cleanup.callback(bird.stop)
        bfdd = B.Bfdd(n_bfd, BFD_INTERVAL_MS)
        cleanup.callback(bfdd.stop)
        birdc = [D.which("birdc"), "-s", str(bird.info["sock"])]
        names = {D.announcer_addr(i): f"r{i}" for i in range(n_bgp)}  # BIRD's protocol per peer address
        replay = ReplayLoad(dep.im, dep, replay_sessions, round_s=60.0)
        cleanup.callback(replay.finish, 60)
        cleanup.callback(stop_poke.set)
        rig = Rig(
            dep,
            dep.im,
            dep.vpsm,
            replay,
            bird,
            birdc,
            [f"r{i}" for i in range(n_bgp)],
            bfdd,
            n_bgp,
            n_bfd,
            ForecasterSection(**cfg["forecaster"]),
            bfd_deadline,
            {(v["id"], b["session"]): bfd_name(b["local_address"]) for v in vrs for b in v.get("bfd", [])},
            {(v["id"], b["session"]): names[b["peer"]] for v in vrs for b in v.get("bgp", [])},
        )
        mins = {p["protocol"]: int(p["min_instances"]) for p in cfg["protocols"]}
        # BIRD may hold its last partial UPDATE until its loop wakes (../shared/peers/README.md)
        threading.Thread(target=_poke, args=(bird, stop_poke), daemon=True).start()
        # up: every session converged before the clock starts
        t_setup = time.monotonic()
        ok, why = False, ""
        while time.monotonic() - t_setup < 300:
            D.poke_bird(bird)
            ok, why = _health(rig, mins)
            if ok:
                break
            time.sleep(2.0)
        if not ok:
            raise RuntimeError(f"the deployment did not come up: {why}")
        result["setup_s"] = round(time.monotonic() - t_setup, 1)
        result["source"] = source
        _agent_downs(rig)  # from here on, the agent's events are the run's
        rig.apsv_bgp_downs.clear()
        accepted0 = ray.get(dep.agent.status.remote(), timeout=60)["counters"]["connections_accepted"]
        bird_watch = Watch("bird", 1.0, lambda: bird_protocols(birdc))
        bfd_watch = Watch(
            "bfdd", 0.5, lambda: {bfd_name(str(p.get("peer"))): (p.get("status") == "up", "") for p in bfdd.peers()}
        )
        watches = [bird_watch, bfd_watch]
        for w in watches:
            w.start()
            cleanup.callback(w.stop)
        replay.start()
        t0 = time.time()
        start = time.monotonic()
        end = start + 60.0 * minutes
        faults: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        agent_downs: list[Event] = []
        schedule = Schedule(rng)
        next_fault = start + every_s
        next_sample = start
        telemetry = workdir / "state" / "telemetry"
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(_sample(rig, now - start, telemetry))
                agent_downs += _agent_downs(rig)
                next_sample = now + 10.0
            if now >= next_fault and now + 15 < end:
                name = schedule.next()
                t_fault = time.time()
                try:
                    done = FAULTS[name](rig, rng)
                except Exception as e:  # a fault that could not act is reported, not fatal
                    done = Injected({"error": repr(e)}, checks={"injected": False})
                t_acted = time.monotonic()
                healthy, why = False, ""
                while time.monotonic() - t_acted < RECOVER_S:
                    D.poke_bird(bird)
                    healthy, why = _health(rig, mins)
                    if healthy:
                        break
                    time.sleep(1.0)
                recovered = time.monotonic()
                faults.append(
                    {
                        "fault": name,
                        "at_s": round(t_fault - t0, 1),
                        "recovered_s": round(recovered - t_acted, 1) if healthy else None,
                        "survived": healthy and all(done.checks.values()),
                        "why": None if healthy else why,
                        "checks": done.checks,
                        "detail": done.detail,
                        # what the fault caused shows within it (the peers' own view included)
                        "window": [t_fault, time.time() + 10.0],
                        "resets": sorted(done.resets),
                        "bfd_downs": sorted(done.bfd_downs),
                    }
                )
                next_fault = max(next_fault + every_s, time.monotonic() + 1.0)
            time.sleep(0.5)
        replay.finish(timeout=600)
        # the end: every BGP session holds every route BIRD sent it
        t_end = time.monotonic()
        complete = 0
        while time.monotonic() - t_end < 120:
            D.poke_bird(bird)
            infos = [i for i in dep.session_infos() if "loc_rib" in i and i.get("state") == "Established"]
            complete = sum(1 for i in infos if int(i["loc_rib"].get("1/1", 0)) >= prefixes)
            if complete >= n_bgp:
                break
            time.sleep(2.0)
        agent_downs += _agent_downs(rig)
        accepted = ray.get(dep.agent.status.remote(), timeout=60)["counters"]["connections_accepted"] - accepted0
        for w in watches:
            w.stop()

        def injected(ev: Event, kind: str) -> bool:
            return any(f["window"][0] <= ev.at <= f["window"][1] and ev.who in f[kind] for f in faults)

        # a reset either side saw: BIRD's session left Established, or APSV's did
        resets = bird_watch.events + rig.apsv_bgp_downs
        bfd_downs = [e for e in bfd_watch.events] + agent_downs
        rounds = replay.rounds
        warmup = max(60.0, 0.2 * 60.0 * minutes)
        result.update(
            faults_injected=len(faults),
            faults_survived=sum(1 for f in faults if f["survived"]),
            lost=sum(r["lost"] for r in rounds),
            duplicated=sum(r["duplicated"] for r in rounds),
            rib_mismatches=sum(r["rib_mismatches"] for r in rounds) + (n_bgp - complete),
            peer_resets_unexpected=sum(1 for e in resets if not injected(e, "resets")),
            peer_resets_injected=sum(1 for e in resets if injected(e, "resets")),
            false_bfd_downs=sum(1 for e in bfd_downs if not injected(e, "bfd_downs")),
            injected_bfd_downs=sum(1 for e in bfd_downs if injected(e, "bfd_downs")),
            rss_slope_mb_per_h=slope_per_h(samples, "rss_mb", warmup),
            fd_slope_per_h=slope_per_h(samples, "fds", warmup),
            fd_slope_by_process_per_h=fd_slopes(samples, warmup),
            process_count_slope_per_h=slope_per_h(samples, "processes", warmup),
            object_store_slope_mb_per_h=slope_per_h(samples, "object_store_mb", warmup),
            parquet_slope_mb_per_h=slope_per_h(samples, "parquet_mb", warmup),
            peer_reset_log=[
                {"at_s": round(e.at - t0, 1), "session": e.who, "seen": e.what, "injected": injected(e, "resets")}
                for e in resets
            ],
            bfd_down_log=[
                {"at_s": round(e.at - t0, 1), "session": e.who, "seen": e.what, "injected": injected(e, "bfd_downs")}
                for e in bfd_downs
            ],
            # APSV's side of the same sessions: its BGP sessions leaving Established, and the
            # connections its agent accepted (each peer reset is a new connection from BIRD)
            apsv_bgp_downs=len(rig.apsv_bgp_downs),
            agent_connections_accepted=accepted,
            replay_rounds=len(rounds),
            replay_frames=sum(r["frames"] for r in rounds),
            replay_error=replay.error,
            bgp_sessions_complete=complete,
            watch_errors={w.name: w.errors for w in watches},
            faults={k: sum(1 for f in faults if f["fault"] == k) for k in FAULTS},
            fault_log=[{k: v for k, v in f.items() if k != "window"} for f in faults],
            rounds=rounds,
            samples=samples,
            sessions={"bgp_peers": n_bgp, "bfd": n_bfd, "replay": replay_sessions, "prefixes": prefixes},
        )
        result["ok"] = (
            result["faults_survived"] == result["faults_injected"] > 0
            and result["lost"] == result["duplicated"] == result["rib_mismatches"] == 0
            and result["peer_resets_unexpected"] == 0
            and result["false_bfd_downs"] == 0
            and replay.error is None
            and len(rounds) > 0
        )
        return result
    raise AssertionError("unreachable")  # (the with block returns)


def render(r: dict[str, Any]) -> str:
    keys = (
        "faults_injected",
        "faults_survived",
        "lost",
        "duplicated",
        "rib_mismatches",
        "peer_resets_unexpected",
        "peer_resets_injected",
        "false_bfd_downs",
        "rss_slope_mb_per_h",
        "fd_slope_per_h",
    )
    lines = [f"chaos soak, {r['minutes']} min, a fault every {r['every_s']} s: {'ok' if r.get('ok') else 'FAILED'}"]
    lines += [f"  {k}: {r.get(k)}" for k in keys]
    for f in r.get("fault_log", []):
        lines.append(f"  {f['at_s']:>7.1f}s {f['fault']:<24} recovered in {f['recovered_s']} s {f['why'] or ''}")
    return "\n".join(lines)


def main(
    minutes: float,
    every_s: float,
    seed: int,
    n_bgp: int,
    n_bfd: int,
    prefixes: int,
    replay: int,
    as_json: bool,
    out: Path | None,
) -> dict[str, Any]:
    return run_and_report(lambda: run(minutes, every_s, seed, n_bgp, n_bfd, prefixes, replay), render, as_json, out)

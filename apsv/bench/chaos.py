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

The rig the faults act on, and the health check after each, are in `apsv/bench/chaos_rig.py`.

Needs root (namespaces), BIRD, FRR's bfdd and a Docker engine.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from apsv.bench import bfd_scale as B
from apsv.bench import daemons as D
from apsv.bench import deployed
from apsv.bench.chaos_load import ReplayLoad
from apsv.bench.chaos_observe import Event, Watch, bird_protocols, fd_slopes, process_kind, slope_per_h
from apsv.bench.chaos_rig import Rig, bfd_name, new_agent_downs, sessions_complete, wait_healthy
from apsv.bench.faults import FAULTS, Injected, Schedule
from apsv.bench.report import run_and_report

PORT = 1790
BFD_INTERVAL_MS = 300
BFD_CALL_DEADLINE_S = 10.0
RECOVER_S = 120.0


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


class ChaosSoak:
    """One soak, phase by phase: `setup` the rig, `wait_up`, `observe`, `inject_faults` for the
    run's minutes, `settle`, `tally`. The phases share the rig and what the observers saw."""

    rig: Rig
    mins: dict[str, int]  # protocol -> its minimum instances, which health requires
    source: str  # where the routes BIRD announces come from
    accepted0: int  # the agent's connections accepted before the run
    bird_watch: Watch
    bfd_watch: Watch
    t0: float  # the run's start (wall clock): what the logs' `at_s` count from
    complete: int  # BGP sessions holding every route at the end
    accepted: int  # the agent's connections accepted during the run

    def __init__(
        self, minutes: float, every_s: float, seed: int, n_bgp: int, n_bfd: int, prefixes: int, replay_sessions: int
    ) -> None:
        self.minutes, self.every_s = minutes, every_s
        self.n_bgp, self.n_bfd, self.prefixes, self.replay_sessions = n_bgp, n_bfd, prefixes, replay_sessions
        self.rng = random.Random(seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="apsv-bench-chaos-", dir="/tmp"))
        self.cfg = deployed.config(_protocols(BFD_CALL_DEADLINE_S), forecaster_cpus=0.25)
        self.stop_poke = threading.Event()
        self.faults: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.agent_bfd_downs: list[Event] = []

    @property
    def watches(self) -> list[Watch]:
        return [self.bird_watch, self.bfd_watch]

    def setup(self, cleanup: contextlib.ExitStack) -> None:
        """Starts the namespaces, the deployment, BIRD, bfdd and the replay load; `cleanup` stops each."""
        from apsv.bench.consolidation import real_routes
        from apsv.bench.live_scale import _poke, bird_slices
        from apsv.config import ForecasterSection

        n_bgp, n_bfd = self.n_bgp, self.n_bfd
        cleanup.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        cleanup.callback(B.teardown_namespaces)
        B.setup_namespaces(n_bfd)
        vrs = _vrouters(n_bgp, n_bfd)
        dep = deployed.Deployed(self.cfg, vrs, self.workdir, "apsv-bench-chaos")
        cleanup.callback(dep.close)
        table, self.source = real_routes(max(self.prefixes * n_bgp, 2000))
        bird = bird_slices([r.bird() for r in table], self.prefixes, n_bgp, PORT)
        cleanup.callback(bird.stop)
        bfdd = B.Bfdd(n_bfd, BFD_INTERVAL_MS)
        cleanup.callback(bfdd.stop)
        birdc = [D.which("birdc"), "-s", str(bird.info["sock"])]
        names = {D.announcer_addr(i): f"r{i}" for i in range(n_bgp)}  # BIRD's protocol per peer address
        replay = ReplayLoad(dep.im, dep, self.replay_sessions, round_s=60.0)
        cleanup.callback(replay.finish, 60)
        cleanup.callback(self.stop_poke.set)
        self.rig = Rig(
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
            ForecasterSection(**self.cfg["forecaster"]),
            BFD_CALL_DEADLINE_S,
            {(v["id"], b["session"]): bfd_name(b["local_address"]) for v in vrs for b in v.get("bfd", [])},
            {(v["id"], b["session"]): names[b["peer"]] for v in vrs for b in v.get("bgp", [])},
        )
        self.mins = {p["protocol"]: int(p["min_instances"]) for p in self.cfg["protocols"]}
        # BIRD may hold its last partial UPDATE until its loop wakes (../shared/peers/README.md)
        threading.Thread(target=_poke, args=(bird, self.stop_poke), daemon=True).start()

    def wait_up(self) -> float:
        """Seconds until every session converged (5 minutes at most): the clock starts after."""
        t_setup = time.monotonic()
        ok, why = wait_healthy(self.rig, self.mins, 300, 2.0)
        if not ok:
            raise RuntimeError(f"the deployment did not come up: {why}")
        return round(time.monotonic() - t_setup, 1)

    def observe(self, cleanup: contextlib.ExitStack) -> None:
        """Starts the peers' own views (BIRD's, bfdd's) and counts the agent's events from now on."""
        import ray

        rig = self.rig
        new_agent_downs(rig)  # from here on, the agent's events are the run's
        rig.apsv_bgp_downs.clear()
        self.accepted0 = ray.get(rig.dep.agent.status.remote(), timeout=60)["counters"]["connections_accepted"]
        birdc, bfdd = rig.birdc, rig.bfdd
        self.bird_watch = Watch("bird", 1.0, lambda: bird_protocols(birdc))
        self.bfd_watch = Watch(
            "bfdd", 0.5, lambda: {bfd_name(str(p.get("peer"))): (p.get("status") == "up", "") for p in bfdd.peers()}
        )
        for w in self.watches:
            w.start()
            cleanup.callback(w.stop)

    def inject_faults(self) -> None:
        """The run's minutes under the replay load: a sample every 10 s, and a fault every `every_s`
        once the last one is recovered from (none in the last 15 s)."""
        rig = self.rig
        rig.replay.start()
        self.t0 = time.time()
        start = time.monotonic()
        end = start + 60.0 * self.minutes
        schedule = Schedule(self.rng)
        next_fault = start + self.every_s
        next_sample = start
        telemetry = self.workdir / "state" / "telemetry"
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                self.samples.append(_sample(rig, now - start, telemetry))
                self.agent_bfd_downs += new_agent_downs(rig)
                next_sample = now + 10.0
            if now >= next_fault and now + 15 < end:
                self.faults.append(self.fault_and_recovery(schedule.next()))
                next_fault = max(next_fault + self.every_s, time.monotonic() + 1.0)
            time.sleep(0.5)

    def fault_and_recovery(self, name: str) -> dict[str, Any]:
        """Injects fault `name` and waits for the deployment to be healthy again (RECOVER_S at most)."""
        t_fault = time.time()
        try:
            done = FAULTS[name](self.rig, self.rng)
        except Exception as e:  # a fault that could not act is reported, not fatal
            done = Injected({"error": repr(e)}, checks={"injected": False})
        t_acted = time.monotonic()
        healthy, why = wait_healthy(self.rig, self.mins, RECOVER_S, 1.0)
        recovered = time.monotonic()
        return {
            "fault": name,
            "at_s": round(t_fault - self.t0, 1),
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

    def settle(self) -> None:
        """Ends the replay, waits for every session's routes, and stops the observers."""
        import ray

        rig = self.rig
        rig.replay.finish(timeout=600)
        # the end: every BGP session holds every route BIRD sent it
        self.complete = sessions_complete(rig, self.prefixes)
        self.agent_bfd_downs += new_agent_downs(rig)
        accepted = ray.get(rig.dep.agent.status.remote(), timeout=60)["counters"]["connections_accepted"]
        self.accepted = accepted - self.accepted0
        for w in self.watches:
            w.stop()

    def tally(self, result: dict[str, Any]) -> dict[str, Any]:
        """`result` completed: what the checker counted, the slopes of the samples, the logs, `ok`."""
        faults, samples, rig, t0 = self.faults, self.samples, self.rig, self.t0

        def injected(ev: Event, kind: str) -> bool:
            return any(f["window"][0] <= ev.at <= f["window"][1] and ev.who in f[kind] for f in faults)

        # a reset either side saw: BIRD's session left Established, or APSV's did
        resets = self.bird_watch.events + rig.apsv_bgp_downs
        bfd_downs = [e for e in self.bfd_watch.events] + self.agent_bfd_downs
        rounds = rig.replay.rounds
        warmup = max(60.0, 0.2 * 60.0 * self.minutes)
        result.update(
            faults_injected=len(faults),
            faults_survived=sum(1 for f in faults if f["survived"]),
            lost=sum(r["lost"] for r in rounds),
            duplicated=sum(r["duplicated"] for r in rounds),
            rib_mismatches=sum(r["rib_mismatches"] for r in rounds) + (self.n_bgp - self.complete),
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
            agent_connections_accepted=self.accepted,
            replay_rounds=len(rounds),
            replay_frames=sum(r["frames"] for r in rounds),
            replay_error=rig.replay.error,
            bgp_sessions_complete=self.complete,
            watch_errors={w.name: w.errors for w in self.watches},
            faults={k: sum(1 for f in faults if f["fault"] == k) for k in FAULTS},
            fault_log=[{k: v for k, v in f.items() if k != "window"} for f in faults],
            rounds=rounds,
            samples=samples,
            sessions={
                "bgp_peers": self.n_bgp,
                "bfd": self.n_bfd,
                "replay": self.replay_sessions,
                "prefixes": self.prefixes,
            },
        )
        result["ok"] = (
            result["faults_survived"] == result["faults_injected"] > 0
            and result["lost"] == result["duplicated"] == result["rib_mismatches"] == 0
            and result["peer_resets_unexpected"] == 0
            and result["false_bfd_downs"] == 0
            and rig.replay.error is None
            and len(rounds) > 0
        )
        return result


def run(
    minutes: float,
    every_s: float = 20.0,
    seed: int = 1,
    n_bgp: int = 8,
    n_bfd: int = 16,
    prefixes: int = 1000,
    replay_sessions: int = 40,
) -> dict[str, Any]:
    soak = ChaosSoak(minutes, every_s, seed, n_bgp, n_bfd, prefixes, replay_sessions)
    result: dict[str, Any] = {"benchmark": "chaos", "minutes": minutes, "every_s": every_s, "seed": seed}
    # Everything started is stopped, in reverse, each whether or not another failed to stop.
    with contextlib.ExitStack() as cleanup:
        soak.setup(cleanup)
        result["setup_s"] = soak.wait_up()
        result["source"] = soak.source
        soak.observe(cleanup)
        soak.inject_faults()
        soak.settle()
        return soak.tally(result)
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

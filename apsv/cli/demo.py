"""`apsv demo`: the main job end to end, on bundled real BGP data and a local Ray cluster.

1. Decode the bundled MRT update dumps (real RIPE RIS and RouteViews data) and check them.
2. Train the TPE's Transformer on the dumps' per-second UPDATE counts (real BGP churn) and serve
   it with Ray Serve; start a local Ray cluster (token auth on, loopback only) and deploy the
   multiplexer and the VPSM with BGP stack instances on the embedded default backend (process;
   `--backend docker` for containers), scaled by the predictive policy on the TPE's forecasts.
3. Replay every recorded peer as BGP sessions of many virtual routers through the offload path,
   in compressed real time (the recorded span in `--duration` seconds), so the load has the
   dumps' real burstiness; sessions move live as instances come and go. `apsv status` in
   another shell shows the deployment while it runs.
4. Check every session against a plain in-process replay of the same messages: each frame
   applied exactly once, in order, the same Loc-RIB. Print messages, latency percentiles,
   instances over time, the forecast's error, SLO-violation seconds; write PNG plots; telemetry
   lands in Parquet. Everything started is stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer
from rich.console import Console

from apsv.cli.demo_bfd import BfdPairs
from apsv.cli.demo_report import plot_demo, print_report, summarize
from apsv.gc_tuning import tune_gc
from apsv.mrt.stats import mrt_stats

if TYPE_CHECKING:
    from apsv.runtime.cluster import Deployment
    from apsv.runtime.host import Key
    from apsv.runtime.recorded_sessions import ReplayResult, ReplaySession, Stream
    from apsv.runtime.vpsm import ProtocolPlan

BUNDLED = ("ris.rrc06.updates.1427846400.gz", "routeviews.updates.20161101.0000.bz2")
DEMO_APP = "apsv-demo-tpe"


def bundled_samples() -> list[Path]:
    root = resources.files("apsv") / "data"
    return [Path(str(root / name)) for name in BUNDLED]


def _decode(path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = mrt_stats(path)
    dt = time.perf_counter() - t0
    row: dict[str, Any] = {"file": path.name, **{k: v for k, v in s.to_json().items() if k != "error_samples"}}
    row["decode_seconds"] = round(dt, 3)
    row["prefixes_per_second"] = round((s.announced + s.withdrawn) / dt) if dt else 0
    return row


def _train_forecaster(paths: list[Path], root: Path, horizon: int = 16) -> str:
    """Train the TPE's Transformer on real BGP churn (per-second UPDATE counts of the bundled
    dumps), register and promote it; returns the version. Small and quick: a demo's budget."""
    from apsv.forecast.datasets import from_mrt
    from apsv.forecast.neural import NeuralForecaster, TrainConfig
    from apsv.forecast.registry import ModelRegistry

    series = [from_mrt(p, measure="updates", per_peer=False)[0] for p in paths]
    model = NeuralForecaster("transformer", horizon, train=TrainConfig(steps=150, max_seconds=25.0))
    report = model.fit(series)
    registry = ModelRegistry(root)
    version = registry.register(model, {"trained_on": [s.name for s in series], "fit": report.__dict__})
    registry.promote(version)
    return version


def _start_forecaster(paths: list[Path], root: Path) -> tuple[str, bool, str]:
    """The TPE on Ray Serve (a handle-only app: no HTTP route). Returns (app name, whether this
    started Serve, model version)."""
    import logging

    from ray import serve

    from apsv.forecast.serving import ForecastService
    from apsv.local_head import free_port

    version = _train_forecaster(paths, root)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started = False
    try:
        serve.context._get_global_client()
    except Exception:  # not running: start it on loopback, on a free port
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        started = True
    app = ForecastService.options(
        ray_actor_options={"num_cpus": 0.5}, user_config={"registry": str(root), "version": "current"}
    ).bind()
    serve.run(app, name=DEMO_APP, route_prefix=None)
    return DEMO_APP, started, version


def _stop_forecaster(started: bool, own_ray: bool) -> None:
    """Deletes the demo's application; Serve itself is shut down only where the demo started it
    on a Ray it did not start. On its own Ray, Ray's shutdown stops Serve's controller with
    everything else: asking the controller to shut down first makes it end inside that call,
    which Ray reports as a failed task on the driver's console."""
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(DEMO_APP)
    if started and not own_ray:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]


@dataclass
class DemoReplay:
    """The dumps' sessions, planned, and how the demo compresses them into its duration."""

    streams: list[Stream]
    plan: list[ReplaySession]
    reference: dict[Key, str]  # each session's RIB digest after a plain in-process replay
    speed: float  # recorded seconds per replayed second
    capacity: float  # the load each instance is budgeted (messages a second)


def _plan_replay(paths: list[Path], sessions: int, vrouters: int, duration_s: float) -> DemoReplay:
    """The recorded peers as `sessions` sessions of `vrouters` virtual routers, replayed in
    `duration_s` seconds, with the reference to check them against."""
    from apsv.runtime.recorded_sessions import load_streams, local_digests, plan_sessions

    streams = load_streams(paths)
    # The dumps were recorded years apart: each plays from its own start, side by side.
    starts: dict[str, float] = {}
    for st in streams:
        starts[st.source] = min(starts.get(st.source, math.inf), st.times[0])
    for st in streams:
        st.times = [t - starts[st.source] for t in st.times]
    plan = plan_sessions(streams, sessions, vrouters)
    reference = local_digests(plan)
    # Compressed real time: the recorded span in `duration_s`. Each instance is budgeted a
    # third of the busiest second's load, so the peak needs four or five instances and the
    # quiet stretches one or two.
    times = np.sort(np.concatenate([np.asarray(s.stream.times, dtype=np.float64) for s in plan]))
    speed = max(1.0, float(times[-1] - times[0]) / duration_s)
    per_second = np.bincount(((times - times[0]) / speed).astype(np.int64))
    capacity = max(50.0, float(per_second.max()) / 3.0)
    return DemoReplay(streams, plan, reference, speed, capacity)


def _bgp_plan(backend: str, capacity: float) -> ProtocolPlan:
    """BGP instances scaled by the predictive policy, tuned for a demo's minute."""
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import ProtocolPlan

    return ProtocolPlan(
        "bgp",
        backend=backend,
        min_instances=1,
        max_instances=6,
        allocation=Allocation(cpu=0.25, memory_bytes=512 << 20),
        policy="predictive",
        # a demo's minute, not a day: short hysteresis and lifetimes
        policy_config={
            "quantile": "p90",
            "target_utilization": 0.8,
            "dwell_s": 3.0,
            "stabilization_s": 3.0,
            "min_lifetime_s": 5.0,
            "recent_s": 10,
            # trust in the forecast is earned over scored windows: a minute's demo has ~60
            "skill_min_evidence": 10,
            "fallback": "threshold",
            "fallback_config": {"target_cpu": 0.6, "stabilization_s": 3.0},
        },
        capacity_per_instance=capacity,
        slo_ms=100.0,
        season=60,
    )


def _bfd_plan(backend: str) -> ProtocolPlan:
    """BFD instances, a fixed one or two."""
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import ProtocolPlan

    return ProtocolPlan(
        "bfd",
        backend=backend,
        min_instances=1,
        max_instances=2,
        allocation=Allocation(cpu=0.1, memory_bytes=256 << 20),
        policy="fixed",
        slo_ms=10.0,
    )


def _write_demo_state(dep: Deployment, ray_info: dict[str, Any], app: str | None, telemetry_root: Path) -> None:
    """Records the deployment, so that `apsv status` (another shell) finds it while it runs."""
    import ray

    from apsv.ops import write_state

    write_state(
        {
            "address": ray.get_runtime_context().gcs_address,
            "namespace": dep.namespace,
            "multiplexer": dep.multiplexer_name,
            "vpsm": "apsv-vpsm-demo",
            "owner": "apsv demo",
            "owner_pid": os.getpid(),
            "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token")),
            "temp_dir": ray_info.get("temp_dir"),
            "started_head": False,
            "forecaster_app": app,
            "telemetry_dir": str(telemetry_root),
        }
    )


Say = Callable[[str], None]  # hears what the demo is doing now, for its progress line


@dataclass
class DemoRun:
    """What the replay through the deployment gave, read before the deployment stops."""

    res: ReplayResult
    transport: str
    bfd: dict[str, Any] | None  # the BFD pairs' result; None without BFD sessions
    timeline: list[dict[str, Any]]  # the VPSM's per-step record of the BGP instances
    infos: dict[Key, dict[str, Any]]  # every session's counters and state at the end
    problems: list[str]
    stats: dict[str, Any]  # the multiplexer's
    status: dict[str, Any]  # the VPSM's
    moved: Any  # the sessions the multiplexer moved live


def _landed_infos(dep: Deployment, keys: list[Key]) -> dict[Key, dict[str, Any]]:
    """Every session's info, asked where it is now (the VPSM keeps scaling meanwhile); one still
    in a hand-over after the multiplexer's retries is asked again until it lands."""
    from apsv.runtime.recorded_sessions import session_infos

    infos = session_infos(dep)
    for _ in range(20):
        missing = [k for k in keys if k not in infos]
        if not missing:
            break
        time.sleep(0.25)
        infos.update(session_infos(dep, missing))
    return infos


def _replay_through(dep: Deployment, replay: DemoReplay, bfd_sessions: int, say: Say) -> DemoRun:
    """Replays the planned sessions (and runs the BFD pairs) through `dep`, then checks them."""
    import ray

    from apsv.runtime.client import OffloadClient
    from apsv.runtime.recorded_sessions import replay as replay_sessions
    from apsv.runtime.recorded_sessions import verify

    plan = replay.plan
    client = OffloadClient(dep.multiplexer, max_batch_delay_s=0.01)
    placed = client.open_sessions([(s.key, "bgp", s.config(), False) for s in plan])
    refused = {k: v for k, v in placed.items() if v.startswith("error")}
    if refused:
        raise RuntimeError(f"sessions refused: {refused}")
    pairs = BfdPairs(dep.multiplexer, bfd_sessions) if bfd_sessions else None
    if pairs is not None:
        pairs.start()
    t0 = time.time()
    total = sum(len(s.stream.messages) for s in plan)

    def sent(n: int, _total: int) -> None:
        say(f"replaying {len(plan)} BGP sessions: {n:,} of {total:,} UPDATEs sent ({100 * n // max(total, 1)}%)")

    res = replay_sessions(client, plan, speed=replay.speed, on_progress=sent, progress_every=max(1, total // 100))
    say("checking every session's Loc-RIB against an in-process replay")
    time.sleep(1.5)  # a last control step sees the end
    bfd_result = pairs.stop() if pairs is not None else None
    transport = client.transport
    client.close()
    timeline = ray.get(dep.vpsm.get_timeline.remote("bgp", t0))
    infos = _landed_infos(dep, [s.key for s in plan] + (pairs.keys if pairs is not None else []))
    problems = verify(plan, infos, replay.reference)
    stats = ray.get(dep.multiplexer.stats.remote())
    status = ray.get(dep.vpsm.status.remote())
    moved = ray.get(dep.multiplexer.moved_sessions.remote())
    ray.get(dep.vpsm.flush_telemetry.remote())
    return DemoRun(res, transport, bfd_result, timeline, infos, problems, stats, status, moved)


def _deploy_and_replay(
    plans: list[ProtocolPlan],
    replay: DemoReplay,
    bfd_sessions: int,
    telemetry_root: Path,
    app: str | None,
    ray_info: dict[str, Any],
    say: Say,
) -> DemoRun:
    """Deploys `plans`, replays through them, and stops the deployment."""
    from apsv.ops import clear_state
    from apsv.runtime.cluster import deploy

    say("starting the multiplexer, the VPSM and the first stack instances")
    dep = deploy(plans, telemetry_root=telemetry_root, interval_s=1.0, suffix="-demo", forecaster_app=app)
    _write_demo_state(dep, ray_info, app, telemetry_root)
    try:
        return _replay_through(dep, replay, bfd_sessions, say)
    finally:
        dep.stop()
        clear_state()


def _offload_result(
    replay: DemoReplay,
    run: DemoRun,
    bgp: ProtocolPlan,
    backend: str,
    vrouters: int,
    forecaster: dict[str, Any] | None,
    telemetry_root: Path,
    plots: Path | None,
) -> dict[str, Any]:
    """The demo's `offload` object: what the replay measured and how the deployment scaled."""
    from apsv.frame import ProtocolId

    summary = summarize(run.timeline, bgp.slo_ms)
    if run.bfd is not None:
        states = [i["state"] for k, i in run.infos.items() if k[2] == int(ProtocolId.BFD)]
        run.bfd["cluster_up"] = sum(1 for st in states if st == "UP")
    out = {
        "backend": backend,
        "sessions": len(replay.plan),
        "vrouters": vrouters,
        "recorded_peers": len(replay.streams),
        "updates": run.res.frames,
        "seconds": round(run.res.seconds, 3),
        "updates_per_s": round(run.res.frames_per_s),
        "speed": round(replay.speed, 2),
        "capacity_per_instance": round(replay.capacity, 1),
        "transport": run.transport,
        "policy": bgp.policy,
        "forecaster": forecaster,
        "bfd": run.bfd,
        **summary,
        "scale_actions": int(run.status["protocols"]["bgp"]["scale_actions"]),
        "forecast_errors": run.status["forecast_errors"],
        "session_moves": run.stats["moves"],
        "sessions_moved": run.moved,
        "duplicates_dropped": sum(int(i["duplicates"]) for i in run.infos.values()),
        "lost_or_misordered": len(run.problems),
        "identical_ribs": not run.problems,
        "loc_rib_prefixes": sum(sum(i.get("loc_rib", {}).values()) for i in run.infos.values()),
        "problems": run.problems[:10],
        "telemetry": str(telemetry_root),
    }
    out["plots"] = [str(p) for p in plot_demo(run.timeline, bgp.slo_ms, plots)] if plots is not None else []
    return out


def run_offload(
    paths: list[Path],
    sessions: int,
    vrouters: int,
    backend: str,
    telemetry_root: Path,
    duration_s: float,
    forecaster: bool = True,
    plots: Path | None = None,
    bfd_sessions: int = 100,
    say: Say | None = None,
) -> dict[str, Any]:
    """Replay the dumps' sessions through the cluster in compressed real time while the VPSM
    scales the BGP instances with the predictive policy on the TPE's forecasts; returns what it
    measured. `say` hears each phase as it starts (and the replay's progress)."""
    say = say or (lambda _msg: None)
    from apsv.runtime.cluster import start_local_ray

    replay = _plan_replay(paths, sessions, vrouters, duration_s)
    say("starting a local Ray")
    ray_info = start_local_ray(num_cpus=16)
    bgp = _bgp_plan(backend, replay.capacity)
    app: str | None = None
    started_serve = False
    version = None
    models = Path(tempfile.mkdtemp(prefix="apsv-demo-models-"))
    try:
        if forecaster:
            say("training the forecaster on the dumps' churn and serving it with Ray Serve")
            app, started_serve, version = _start_forecaster(paths, models)
        bfd = _bfd_plan(backend)
        plans = [bgp, bfd] if bfd_sessions else [bgp]
        run = _deploy_and_replay(plans, replay, bfd_sessions, telemetry_root, app, ray_info, say)
    finally:
        if forecaster:
            _stop_forecaster(started_serve, own_ray=not ray_info.get("reused"))
        shutil.rmtree(models, ignore_errors=True)
    served = {"app": app, "model": version} if app else None
    return _offload_result(replay, run, bgp, backend, vrouters, served, telemetry_root, plots)


def demo(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    sessions: int = typer.Option(120, "--sessions", min=1, help="BGP sessions to replay."),
    vrouters: int = typer.Option(12, "--vrouters", min=1, help="Virtual routers they belong to."),
    backend: str = typer.Option("process", "--backend", help="Stack instance backend: process or docker."),
    duration: float = typer.Option(45.0, "--duration", min=5.0, help="Seconds the recorded span is replayed in."),
    forecaster: bool = typer.Option(True, "--forecaster/--no-forecaster", help="Serve the TPE (predictive)."),
    bfd_sessions: int = typer.Option(100, "--bfd-sessions", min=0, help="BFD sessions (each with a remote end)."),
    plots: Path = typer.Option(Path("apsv-demo"), "--plots", help="Directory for the PNG plots."),
    telemetry: Path = typer.Option(None, "--telemetry", help="Telemetry directory (default: a new temp dir)."),
    files: list[Path] = typer.Argument(None, help="MRT update dumps (default: the bundled real samples)."),
) -> None:
    """Run the main job end to end on bundled real BGP data and print a summary."""
    tune_gc()
    if backend not in ("process", "docker"):
        typer.echo(f"apsv demo: --backend {backend!r}: expected process or docker", err=True)
        raise typer.Exit(2)
    if sessions < vrouters:
        typer.echo(f"apsv demo: --sessions {sessions} is fewer than --vrouters {vrouters}", err=True)
        raise typer.Exit(2)
    paths = files or bundled_samples()
    for path in paths:
        if not path.is_file():
            typer.echo(f"apsv demo: {path}: no such file", err=True)
            raise typer.Exit(2)
    from apsv.ops import clear_starting, mark_starting
    from apsv.runtime.cluster import stdout_for_one_object

    console = Console(stderr=True)
    mark_starting("apsv demo")  # `apsv status` says the demo is starting until its deployment is recorded
    try:
        with console.status("decoding the MRT dumps", spinner="dots") as st:
            decoded = [_decode(p) for p in paths]
            root = telemetry or Path(tempfile.mkdtemp(prefix="apsv-telemetry-"))
            with stdout_for_one_object(as_json):
                offload = run_offload(
                    paths, sessions, vrouters, backend, root, duration, forecaster, plots, bfd_sessions, say=st.update
                )
    finally:
        clear_starting()
    b = offload["bfd"]
    ok = (
        offload["identical_ribs"]
        and all(r["errors"] == 0 for r in decoded)
        and (b is None or b["remote_up"] == b["cluster_up"] == b["sessions"])
    )
    if as_json:
        typer.echo(json.dumps({"files": decoded, "offload": offload, "ok": ok}))
    else:
        print_report(decoded, offload)
    if not ok:
        raise typer.Exit(1)

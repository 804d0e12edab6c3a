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
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from apsv.mrt.stats import mrt_stats
from apsv.tuning import tune_gc

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


def _stop_forecaster(started: bool) -> None:
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(DEMO_APP)
    if started:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]


class BfdPairs:
    """BFD sessions offloaded to the cluster, each facing a remote peer played here.

    The remote ends are the same sans-I/O `BfdSession` run in this process; this class is the
    wire and the agent between them: every transmit interval it delivers each remote end's
    current packet to its cluster session, and it hands each cluster session's transmission
    program (what the agent would send) to the remote end. Both sides come Up by RFC 5880's
    three-way handshake, through the offload path to a BFD stack instance."""

    def __init__(self, im: Any, n: int, tx_ms: float = 300.0) -> None:
        from apsv.bfd.session import BfdSession, BfdSessionConfig
        from apsv.frame import ProtocolId
        from apsv.runtime.client import OffloadClient

        self.n, self.tx = n, tx_ms / 1000.0
        self.keys = [(1, 1000 + i // 10, int(ProtocolId.BFD), i + 1) for i in range(n)]  # 10 per router
        self.client = OffloadClient(im, on_output=self._output, max_batch_delay_s=0.005, metrics_label="demo-bfd")
        now = time.time()
        self.remote = []
        self.packet: list[bytes] = []
        for i in range(n):
            peer = BfdSession(
                BfdSessionConfig(
                    peer_address=f"127.0.1.{i % 250 + 1}",
                    local_address=f"127.0.2.{i % 250 + 1}",
                    local_discriminator=100_000 + i,
                    desired_min_tx_ms=tx_ms,
                    required_min_rx_ms=tx_ms,
                )
            )
            self.remote.append(peer)
            self.packet.append(self._program_packet(peer.start(now)) or b"")
        specs = [
            (
                k,
                "bfd",
                {
                    "peer_address": f"127.0.2.{i % 250 + 1}",
                    "local_address": f"127.0.1.{i % 250 + 1}",
                    "local_discriminator": i + 1,
                    "desired_min_tx_ms": tx_ms,
                    "required_min_rx_ms": tx_ms,
                },
                0,
            )
            for i, k in enumerate(self.keys)
        ]
        refused = [v for v in self.client.open_sessions(specs).values() if v.startswith("error")]
        if refused:
            raise RuntimeError(f"{len(refused)} BFD sessions refused: {refused[0]}")
        self.programs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-bfd", daemon=True)

    @staticmethod
    def _program_packet(events: list[Any]) -> bytes | None:
        from apsv.bfd.program import TxProgram as Program
        from apsv.stack import TxProgram

        packet = None
        for ev in events:
            if isinstance(ev, TxProgram):
                packet = Program.decode(ev.data).packet
        return packet

    def _output(self, f: Any) -> None:
        from apsv.bfd.program import TxProgram as Program
        from apsv.frame import FrameKind

        if f.kind != FrameKind.TX_PROGRAM:
            return
        self.programs += 1
        prog = Program.decode(f.payload)
        peer = self.remote[f.session - 1]
        for pkt in (prog.once, prog.packet):
            if pkt:
                got = self._program_packet(peer.data_received(pkt, time.time()))
                if got is not None:
                    self.packet[f.session - 1] = got

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.time()
            for k, pkt in zip(self.keys, self.packet, strict=True):
                if pkt:
                    self.client.send(k, pkt)
            self.client.flush()
            while time.time() - t0 < self.tx and not self._stop.is_set():
                self.client.service()
                self.client.poll()
                time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop transmitting; the state of both ends of every pair."""
        from apsv.bfd.packet import State

        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()
        up = sum(1 for p in self.remote if p.state is State.UP)
        return {"sessions": self.n, "remote_up": up, "programs": self.programs, "tx_ms": self.tx * 1000}


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
) -> dict[str, Any]:
    """Replay the dumps' sessions through the cluster in compressed real time while the VPSM
    scales the BGP instances with the predictive policy on the TPE's forecasts; returns what it
    measured."""
    import ray

    from apsv.frame import ProtocolId
    from apsv.ops import clear_state, write_state
    from apsv.runtime.client import OffloadClient
    from apsv.runtime.cluster import deploy, start_local_ray
    from apsv.runtime.driver import load_streams, local_digests, plan_sessions, replay, session_infos, verify
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import ProtocolPlan

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
    info = start_local_ray(num_cpus=16)
    bgp = ProtocolPlan(
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
    app: str | None = None
    started_serve = False
    version = None
    models = Path(tempfile.mkdtemp(prefix="apsv-demo-models-"))
    try:
        if forecaster:
            app, started_serve, version = _start_forecaster(paths, models)
        bfd = ProtocolPlan(
            "bfd",
            backend=backend,
            min_instances=1,
            max_instances=2,
            allocation=Allocation(cpu=0.1, memory_bytes=256 << 20),
            policy="fixed",
            slo_ms=10.0,
        )
        plans = [bgp, bfd] if bfd_sessions else [bgp]
        dep = deploy(plans, telemetry_root=telemetry_root, interval_s=1.0, suffix="-demo", forecaster_app=app)
        # `apsv status` (another shell) finds this deployment while it runs
        write_state(
            {
                "address": ray.get_runtime_context().gcs_address,
                "namespace": dep.namespace,
                "multiplexer": dep.multiplexer_name,
                "vpsm": "apsv-vpsm-demo",
                "owner": "apsv demo",
                "owner_pid": os.getpid(),
                "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH", str(Path.home() / ".ray" / "auth_token")),
                "temp_dir": info.get("temp_dir"),
                "started_head": False,
                "forecaster_app": app,
                "telemetry_dir": str(telemetry_root),
            }
        )
        try:
            client = OffloadClient(dep.multiplexer, max_batch_delay_s=0.01)
            placed = client.open_sessions([(s.key, "bgp", s.config(), False) for s in plan])
            refused = {k: v for k, v in placed.items() if v.startswith("error")}
            if refused:
                raise RuntimeError(f"sessions refused: {refused}")
            pairs = BfdPairs(dep.multiplexer, bfd_sessions) if bfd_sessions else None
            if pairs is not None:
                pairs.start()
            t0 = time.time()
            res = replay(client, plan, speed=speed)
            time.sleep(1.5)  # a last control step sees the end
            bfd_result = pairs.stop() if pairs is not None else None
            transport = client.transport
            client.close()
            timeline = ray.get(dep.vpsm.get_timeline.remote("bgp", t0))
            # Asked where each session is now (the VPSM keeps scaling meanwhile); one still in a
            # hand-over after the multiplexer's retries is asked again until it lands.
            infos = session_infos(dep)
            keys = [s.key for s in plan] + (pairs.keys if pairs is not None else [])
            for _ in range(20):
                missing = [k for k in keys if k not in infos]
                if not missing:
                    break
                time.sleep(0.25)
                infos.update(session_infos(dep, missing))
            problems = verify(plan, infos, reference)
            stats = ray.get(dep.multiplexer.stats.remote())
            status = ray.get(dep.vpsm.status.remote())
            moved = ray.get(dep.multiplexer.moved_sessions.remote())
            ray.get(dep.vpsm.flush_telemetry.remote())
        finally:
            dep.stop()
            clear_state()
    finally:
        if forecaster:
            _stop_forecaster(started_serve)
        shutil.rmtree(models, ignore_errors=True)
    summary = summarize(timeline, bgp.slo_ms)
    if bfd_result is not None:
        states = [i["state"] for k, i in infos.items() if k[2] == int(ProtocolId.BFD)]
        bfd_result["cluster_up"] = sum(1 for st in states if st == "UP")
    out = {
        "backend": backend,
        "sessions": len(plan),
        "vrouters": vrouters,
        "recorded_peers": len(streams),
        "updates": res.frames,
        "seconds": round(res.seconds, 3),
        "updates_per_s": round(res.frames_per_s),
        "speed": round(speed, 2),
        "capacity_per_instance": round(capacity, 1),
        "transport": transport,
        "policy": bgp.policy,
        "forecaster": {"app": app, "model": version} if app else None,
        "bfd": bfd_result,
        **summary,
        "scale_actions": int(status["protocols"]["bgp"]["scale_actions"]),
        "forecast_errors": status["forecast_errors"],
        "session_moves": stats["moves"],
        "sessions_moved": moved,
        "duplicates_dropped": sum(int(i["duplicates"]) for i in infos.values()),
        "lost_or_misordered": len(problems),
        "identical_ribs": not problems,
        "loc_rib_prefixes": sum(sum(i.get("loc_rib", {}).values()) for i in infos.values()),
        "problems": problems[:10],
        "telemetry": str(telemetry_root),
    }
    out["plots"] = [str(p) for p in plot_demo(timeline, bgp.slo_ms, plots)] if plots is not None else []
    return out


def summarize(timeline: list[dict[str, Any]], slo_ms: float) -> dict[str, Any]:
    """Latency percentiles over every message, instances over time, the forecast's error against
    what came, SLO-violation seconds - from the VPSM's per-step record."""
    from apsv.scaling.latency import merge, quantile

    hist = merge(timeline)
    load = np.array([float(r["load"]) for r in timeline])
    p50 = np.array([float(r.get("forecast", {}).get("p50", np.nan)) for r in timeline])
    p90 = np.array([float(r.get("forecast", {}).get("p90", np.nan)) for r in timeline])
    # the forecast made at step t for step t+1, against the load measured at t+1
    ok = np.isfinite(p50[:-1]) & (load[1:] > 0)
    actual = load[1:][ok]
    wape = float(np.abs(p50[:-1][ok] - actual).sum() / actual.sum()) if ok.any() else None
    cover = float((actual <= p90[:-1][ok]).mean()) if ok.any() else None
    inst = [int(r["instances"]) for r in timeline]
    return {
        "latency_ms": {f"p{q}": round(quantile(hist, q / 100), 2) for q in (50, 90, 99)} if hist.sum() else None,
        "latency_samples": int(hist.sum()),
        "instances_over_time": inst,
        "instances_max": max(inst, default=0),
        "instances_mean": round(float(np.mean(inst)), 2) if inst else 0.0,
        "forecast_wape": round(wape, 3) if wape is not None else None,
        "forecast_p90_coverage": round(cover, 3) if cover is not None else None,
        "forecast_steps": int(ok.sum()),
        "slo_ms": slo_ms,
        "slo_violation_s": int(sum(1 for r in timeline if r.get("p99_ms") is not None and r["p99_ms"] > slo_ms)),
        "steps": len(timeline),
    }


def plot_demo(timeline: list[dict[str, Any]], slo_ms: float, directory: Path) -> list[Path]:
    """Load, forecast band and instances over time; the message latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apsv.scaling.latency import LATENCY_BINS_MS, merge

    directory.mkdir(parents=True, exist_ok=True)
    t = np.array([float(r["ts"]) for r in timeline])
    t = t - t[0] if t.size else t
    load = np.array([float(r["load"]) for r in timeline])
    fc = {q: np.array([float(r.get("forecast", {}).get(q, np.nan)) for r in timeline]) for q in ("p10", "p50", "p90")}
    paths = []
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t, load, color="black", lw=1.0, label="BGP UPDATEs/s (measured)")
    ax.plot(t[1:], fc["p50"][:-1], color="tab:blue", lw=0.9, label="TPE p50, one step ahead")
    ax.fill_between(t[1:], fc["p10"][:-1], fc["p90"][:-1], color="tab:blue", alpha=0.2, label="TPE p10-p90")
    ax2 = ax.twinx()
    ax2.step(t, [r["instances"] for r in timeline], where="post", color="tab:red", lw=1.4, label="instances")
    ax.set_xlabel("s")
    ax.set_ylabel("messages/s")
    ax2.set_ylabel("BGP stack instances")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    ax.set_title("apsv demo: load, forecast and predictive scaling", fontsize=9)
    fig.tight_layout()
    paths.append(directory / "demo-scaling.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    hist = merge(timeline)
    fig, ax = plt.subplots(figsize=(6, 4))
    if hist.sum():
        ax.plot(np.sqrt(LATENCY_BINS_MS[:-1] * LATENCY_BINS_MS[1:]), np.cumsum(hist) / hist.sum())
    ax.axvline(slo_ms, color="red", ls="--", lw=0.8, label=f"SLO {slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("message latency, agent receive -> applied (ms)")
    ax.set_ylabel("fraction of messages")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(directory / "demo-latency-cdf.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


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
    from apsv.runtime.cluster import stdout_for_one_object

    console = Console(stderr=True)
    with console.status("decoding the bundled MRT dumps", spinner="dots") as st:
        decoded = [_decode(p) for p in paths]
        st.update(
            "training the forecaster, starting Ray, Serve, the multiplexer and the VPSM; replaying "
            f"{sessions} BGP sessions over ~{duration:g} s"
        )
        root = telemetry or Path(tempfile.mkdtemp(prefix="apsv-telemetry-"))
        with stdout_for_one_object(as_json):
            offload = run_offload(paths, sessions, vrouters, backend, root, duration, forecaster, plots, bfd_sessions)
    b = offload["bfd"]
    ok = (
        offload["identical_ribs"]
        and all(r["errors"] == 0 for r in decoded)
        and (b is None or b["remote_up"] == b["cluster_up"] == b["sessions"])
    )
    if as_json:
        typer.echo(json.dumps({"files": decoded, "offload": offload, "ok": ok}))
    else:
        _render(decoded, offload)
    if not ok:
        raise typer.Exit(1)


def _render(decoded: list[dict[str, Any]], o: dict[str, Any]) -> None:
    console = Console()
    t = Table(title="Real BGP data through the BGP-4 decoder")
    t.add_column("")
    for r in decoded:
        t.add_column(str(r["file"]), justify="right", overflow="fold")
    for label, key in (
        ("MRT records", "records"),
        ("UPDATE messages", "updates"),
        ("prefixes announced", "announced"),
        ("prefixes withdrawn", "withdrawn"),
        ("decode errors", "errors"),
        ("decode rate (prefixes/s)", "prefixes_per_second"),
    ):
        t.add_row(label, *(f"{r[key]:,}" for r in decoded))
    console.print(t)
    t2 = Table(title=f"Offloaded to a local Ray cluster ({o['backend']} backend, {o['transport']} transport)")
    t2.add_column("")
    t2.add_column("", justify="right")
    lat = o["latency_ms"] or {}
    fc = o["forecaster"]
    rows = [
        ("BGP sessions / virtual routers", f"{o['sessions']} / {o['vrouters']} (from {o['recorded_peers']} peers)"),
        ("UPDATEs replayed", f"{o['updates']:,} in {o['seconds']} s ({o['speed']:g}x real time)"),
        ("latency p50 / p90 / p99", " / ".join(f"{lat.get(k, 0):.1f}" for k in ("p50", "p90", "p99")) + " ms"),
        ("SLO-violation seconds", f"{o['slo_violation_s']} of {o['steps']} (p99 > {o['slo_ms']:g} ms)"),
        ("policy / forecaster", f"{o['policy']} / " + (f"TPE {fc['model']} on Ray Serve" if fc else "none")),
        (
            "forecast error (1 step ahead)",
            f"WAPE {o['forecast_wape']}, p90 covers {o['forecast_p90_coverage']}"
            if o["forecast_wape"] is not None
            else "n/a",
        ),
        ("instances over time", _spark(o["instances_over_time"])),
        ("instances max / mean", f"{o['instances_max']} / {o['instances_mean']} ({o['scale_actions']} scale actions)"),
        ("live session moves", f"{o['session_moves']} ({o['sessions_moved']} sessions moved)"),
        ("redelivered frames dropped", str(o["duplicates_dropped"])),
        ("lost or out-of-order sessions", str(o["lost_or_misordered"])),
        (
            "BFD sessions Up (cluster / remote)",
            f"{o['bfd']['cluster_up']} / {o['bfd']['remote_up']} of {o['bfd']['sessions']} at {o['bfd']['tx_ms']:g} ms"
            if o["bfd"]
            else "none",
        ),
        ("Loc-RIB = in-process replay", "yes, every session" if o["identical_ribs"] else "NO"),
        ("Loc-RIB prefixes (all sessions)", f"{o['loc_rib_prefixes']:,}"),
        ("telemetry (Parquet)", o["telemetry"]),
        ("plots", " ".join(o["plots"])),
    ]
    for label, value in rows:
        t2.add_row(label, value)
    console.print(t2)
    for p in o["problems"]:
        console.print(f"[red]{p}[/red]")


def _spark(values: list[int]) -> str:
    """Instances per step as one line of digits (a step per character, at most 90)."""
    if len(values) > 90:
        k = -(-len(values) // 90)
        values = [max(values[i : i + k]) for i in range(0, len(values), k)]
    return "".join(str(min(v, 9)) for v in values)

"""`apsv demo`: the main job end to end, on bundled real BGP data and a local Ray cluster.

1. Decode the bundled MRT update dumps (real RIPE RIS and RouteViews data) and check them.
2. Start a local Ray cluster (token auth on, loopback only), deploy the multiplexer and the VPSM
   with BGP stack instances on the embedded default backend (process; `--backend docker` for
   containers).
3. Replay every recorded peer as BGP sessions of many virtual routers through the offload path,
   while the VPSM scales 1 -> 3 -> 1 instances - every session moved live at least once.
4. Check every session against a plain in-process replay of the same messages: each frame
   applied exactly once, in order, the same Loc-RIB. Telemetry lands in Parquet.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from apsv.mrt.stats import mrt_stats
from apsv.tuning import tune_gc

BUNDLED = ("ris.rrc06.updates.1427846400.gz", "routeviews.updates.20161101.0000.bz2")


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


def run_offload(
    paths: list[Path], sessions: int, vrouters: int, backend: str, telemetry_root: Path, speed: float | None
) -> dict[str, Any]:
    """The replay through the cluster, with a live 1 -> 3 -> 1 scale; returns what it measured."""
    import ray

    from apsv.runtime.client import OffloadClient
    from apsv.runtime.cluster import deploy, start_local_ray
    from apsv.runtime.driver import load_streams, local_digests, plan_sessions, replay, session_infos, verify
    from apsv.runtime.instance import Allocation
    from apsv.runtime.vpsm import ProtocolPlan

    streams = load_streams(paths)
    plan = plan_sessions(streams, sessions, vrouters)
    reference = local_digests(plan)
    start_local_ray(num_cpus=8)
    bgp = ProtocolPlan(
        "bgp",
        backend=backend,
        min_instances=1,
        max_instances=3,
        allocation=Allocation(cpu=0.5, memory_bytes=512 << 20),
        policy="fixed",
    )
    dep = deploy([bgp], telemetry_root=telemetry_root, interval_s=0.5, suffix="-demo")
    try:
        client = OffloadClient(dep.multiplexer)
        placed = client.open_sessions([(s.key, "bgp", s.config(), False) for s in plan])
        refused = {k: v for k, v in placed.items() if v.startswith("error")}
        if refused:
            raise RuntimeError(f"sessions refused: {refused}")
        total = sum(len(s.stream.messages) for s in plan)
        steps = [(0.25, 3), (0.6, 1)]
        fired: list[Any] = []

        def progress(sent: int, _total: int) -> None:
            while steps and sent >= steps[0][0] * total:
                _, n = steps.pop(0)
                fired.append(dep.vpsm.scale_to.remote("bgp", n))  # not awaited: traffic keeps flowing

        res = replay(client, plan, speed=speed, on_progress=progress, progress_every=200)
        ray.get(fired)
        transport = client.transport
        client.close()
        infos = session_infos(dep)
        problems = verify(plan, infos, reference)
        stats = ray.get(dep.multiplexer.stats.remote())
        status = ray.get(dep.vpsm.status.remote())
        moved = ray.get(dep.multiplexer.moved_sessions.remote())
        ray.get(dep.vpsm.flush_telemetry.remote())
    finally:
        dep.stop()
    events = [e for e in status["events"] if e["event"] in ("instantiate", "destroy", "rebalance")]
    return {
        "backend": backend,
        "sessions": len(plan),
        "vrouters": vrouters,
        "recorded_peers": len(streams),
        "updates": res.frames,
        "seconds": round(res.seconds, 3),
        "updates_per_s": round(res.frames_per_s),
        "transport": transport,
        "instances_timeline": [e["event"] + ":" + str(e.get("instance", e.get("moved", ""))) for e in events],
        "session_moves": stats["moves"],
        "sessions_moved": moved,
        "duplicates_dropped": sum(int(i["duplicates"]) for i in infos.values()),
        "lost_or_misordered": len(problems),
        "identical_ribs": not problems,
        "loc_rib_prefixes": sum(sum(i.get("loc_rib", {}).values()) for i in infos.values()),
        "problems": problems[:10],
        "telemetry": str(telemetry_root),
    }


def demo(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    sessions: int = typer.Option(120, "--sessions", min=1, help="BGP sessions to replay."),
    vrouters: int = typer.Option(12, "--vrouters", min=1, help="Virtual routers they belong to."),
    backend: str = typer.Option("process", "--backend", help="Stack instance backend: process or docker."),
    speed: float = typer.Option(0.0, "--speed", min=0.0, help="Replay speed: 0 as fast as possible, 1 real time."),
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
    decoded = [_decode(p) for p in paths]
    root = telemetry or Path(tempfile.mkdtemp(prefix="apsv-telemetry-"))
    offload = run_offload(paths, sessions, vrouters, backend, root, speed or None)
    ok = offload["identical_ribs"] and all(r["errors"] == 0 for r in decoded)
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
    for label, value in (
        ("BGP sessions / virtual routers", f"{o['sessions']} / {o['vrouters']} (from {o['recorded_peers']} peers)"),
        ("UPDATEs replayed", f"{o['updates']:,} in {o['seconds']} s ({o['updates_per_s']:,}/s)"),
        ("instances (VPSM)", " ".join(o["instances_timeline"])),
        ("live session moves", f"{o['session_moves']} ({o['sessions_moved']} sessions moved)"),
        ("redelivered frames dropped", str(o["duplicates_dropped"])),
        ("lost or out-of-order sessions", str(o["lost_or_misordered"])),
        ("Loc-RIB = in-process replay", "yes, every session" if o["identical_ribs"] else "NO"),
        ("Loc-RIB prefixes (all sessions)", f"{o['loc_rib_prefixes']:,}"),
        ("telemetry (Parquet)", o["telemetry"]),
    ):
        t2.add_row(label, value)
    console.print(t2)
    for p in o["problems"]:
        console.print(f"[red]{p}[/red]")

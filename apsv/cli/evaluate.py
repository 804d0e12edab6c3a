"""`apsv evaluate TRACE`: compare scaling policies on a load trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def evaluate(
    trace: str = typer.Argument(
        ..., help="CSV / one-value-per-line series, an MRT update dump, or synthetic:bfd[:PEAK_SESSIONS]"
    ),
    policies: str = typer.Option(
        "static,reactive,ray_serve,threshold,predictive,oracle", "--policies", help="comma-separated"
    ),
    mode: str = typer.Option("sim", "--mode", help="sim (the simulator) or live (the real system)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    column: str | None = typer.Option(None, "--column", help="CSV value column"),
    season: int | None = typer.Option(None, "--season", min=1, help="seasonal period of the series in samples"),
    peak_rate: float = typer.Option(20_000.0, "--peak-rate", min=1.0, help="messages/s the series' peak becomes"),
    capacity: float = typer.Option(2_000.0, "--capacity", min=1.0, help="messages/s one instance serves"),
    start_latency: float = typer.Option(3.0, "--start-latency", min=0.0, help="instance start latency, seconds"),
    slo_ms: float | None = typer.Option(None, "--slo-ms", help="p99 latency SLO (default: BGP 100, BFD 10)"),
    vrouters: int = typer.Option(1000, "--vrouters", min=1),
    nodes: int = typer.Option(100, "--nodes", min=1),
    max_instances: int = typer.Option(64, "--max-instances", min=1),
    steps: int = typer.Option(600, "--forecaster-steps", min=1, help="training steps of the forecaster"),
    sample_step: bool = typer.Option(
        False,
        "--sample-step",
        help="play the series at its own sampling step (one decision per sample) instead of one sample a second",
    ),
    plots: Path | None = typer.Option(Path("apsv-evaluate"), "--plots", help="directory for the PNG plots"),
    speed: float = typer.Option(
        0.5, "--speed", min=0.01, help="live: trace seconds per wall second (0.5: half the Ray calls per trace second)"
    ),
    live_peak_rate: float = typer.Option(
        1000.0, "--live-peak-rate", min=1.0, help="live: messages per wall second the trace's peak becomes"
    ),
    live_steps: int | None = typer.Option(
        None, "--live-steps", min=60, help="live: replay only this many steps of the evaluated part"
    ),
    live_start: int = typer.Option(0, "--live-start", min=0, help="live: first step of the evaluated part to replay"),
) -> None:
    """Simulate each policy on the trace (the first 30 % trains the forecaster); print SLO-violation
    seconds, instance-seconds, scale actions and lost messages; write plots. With `--mode live`,
    also replay the trace through the real system (local Ray, process backend) policy by policy
    and compare it with the simulator run on the same steps with the live system's measured
    service rate, latency floor and start latency."""
    from apsv.evaluation.compare import evaluate as run
    from apsv.forecast.series import SeriesError
    from apsv.scaling.simulator import SimConfig
    from apsv.scaling.traces import at_sample_step, load_trace

    if mode not in ("sim", "live"):
        typer.echo(f"apsv evaluate: --mode {mode!r}: expected sim or live", err=True)
        raise typer.Exit(2)
    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    try:
        tr = load_trace(trace, column=column, season=season, peak_rate=peak_rate)
        if sample_step:
            tr = at_sample_step(tr)
        slo = slo_ms if slo_ms is not None else (10.0 if tr.protocol == "bfd" else 100.0)
        cfg = SimConfig(
            capacity=capacity,
            start_latency_s=start_latency,
            slo_ms=slo,
            vrouters=vrouters,
            nodes=nodes,
            max_instances=max_instances,
        )
        doc = run(tr, cfg, names, forecaster_steps=steps)
    except (SeriesError, ValueError) as e:
        typer.echo(f"apsv evaluate: {e}", err=True)
        raise typer.Exit(2) from e
    if mode == "live":
        _live(doc, cfg, names, speed, live_peak_rate, live_start, live_steps, plots, as_json)
    else:
        _sim(doc, cfg, plots, as_json)


def _sim(doc: dict[str, Any], cfg: Any, plots: Path | None, as_json: bool) -> None:
    """Write the simulated comparison's plots; print it as JSON or as a table."""
    from apsv.evaluation.compare import claims, plot, public

    written = plot(doc, plots) if plots is not None else []
    out = public(doc)
    out["claims"] = claims(doc)
    out["plots"] = [str(p) for p in written]
    if as_json:
        typer.echo(json.dumps(out, default=str))
        return
    typer.echo(f"{doc['trace']} ({doc['protocol']}): {doc['steps']} s evaluated, SLO {cfg.slo_ms:g} ms")
    typer.echo(f"{'policy':12s} {'SLO-viol s':>10s} {'instance-s':>11s} {'actions':>8s} {'lost':>10s} {'p99 ms':>8s}")
    for p, r in out["policies"].items():
        typer.echo(
            f"{p:12s} {r['slo_violation_s']:10.0f} {r['instance_s']:11.0f} {r['scale_actions']:8d} "
            f"{r['lost']:10.0f} {r['p99_ms']:8.1f}"
        )
    _echo_claims_and_plots(out)


def _echo_claims_and_plots(out: dict[str, Any]) -> None:
    for k, v in out["claims"].items():
        typer.echo(f"{k}: {v}")
    for p in out["plots"]:
        typer.echo(f"wrote {p}")


def _live(
    doc: dict[str, Any],
    cfg: Any,
    names: tuple[str, ...],
    speed: float,
    peak_rate: float,
    start: int,
    steps: int | None,
    plots: Path | None,
    as_json: bool,
) -> None:
    """Replay the evaluated part from step `start` through the live system; print it beside the
    simulator's run on the same steps, as JSON or as a table."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from apsv.evaluation.live import LiveConfig, evaluate_live, live_json, plot_live
    from apsv.runtime.cluster import start_local_ray, stdout_for_one_object

    test, fc = _live_window(doc, start)
    live = LiveConfig(speed=speed, peak_rate=peak_rate, max_steps=steps)
    with (
        stdout_for_one_object(as_json),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} s"),
            TimeRemainingColumn(),
            transient=True,
            disable=as_json,
        ) as bar,
    ):
        start_local_ray(num_cpus=16)
        tasks: dict[str, Any] = {}

        def progress(policy: str, k: int, n: int) -> None:
            if policy not in tasks:
                tasks[policy] = bar.add_task(f"live {policy}", total=n)
            bar.update(tasks[policy], completed=k)

        tables = doc["_tables"][start:] if doc["_tables"] is not None else None
        res = evaluate_live(
            test,
            cfg,
            names,
            live,
            configs=doc["policy_configs"],
            forecasts=fc,
            progress=progress,
            table_backlog=tables,
        )
    out = live_json(doc["trace"], res)
    out["plots"] = [str(p) for p in plot_live(doc["trace"], res, plots)] if plots is not None else []
    if as_json:
        typer.echo(json.dumps(out, default=str))
        return
    _echo_live_table(doc["trace"], out, speed, cfg.slo_ms)
    _echo_claims_and_plots(out)


def _live_window(doc: dict[str, Any], start: int) -> tuple[Any, Any]:
    """The evaluated part from step `start` and the forecasts made for it; exits with status 2
    where `start` is off the forecasts' cadence or leaves fewer than 60 steps."""
    from apsv.scaling.simulator import Forecasts

    test = doc["_test"][start:]
    fc: Forecasts | None = doc["_forecasts"]
    if fc is not None and start:
        if start % fc.every:
            typer.echo(f"apsv evaluate: --live-start must be a multiple of {fc.every} (the forecast cadence)", err=True)
            raise typer.Exit(2)
        fc = Forecasts(fc.every, {q: v[start // fc.every :] for q, v in fc.values.items()})
    if test.size < 60:
        typer.echo(f"apsv evaluate: --live-start {start} leaves {test.size} steps; at least 60 needed", err=True)
        raise typer.Exit(2)
    return test, fc


def _echo_live_table(trace: str, out: dict[str, Any], speed: float, slo_ms: float) -> None:
    """The calibration, then each policy's figures live beside the simulator's."""
    cal = out["calibration"]
    typer.echo(
        f"{trace}: {out['steps']} steps live at {speed:g}x, SLO {slo_ms:g} ms; one instance serves "
        f"{cal['capacity']:.0f} msgs/s live, floor {cal['base_latency_ms']:.1f} ms, "
        f"start {cal['start_latency_s']:.2f} s"
    )
    typer.echo(f"{'policy':12s} {'SLO-viol s':>17s} {'instance-s':>17s} {'actions':>13s} {'lost':>6s} {'p99 ms':>8s}")
    typer.echo(f"{'':12s} {'live / sim':>17s} {'live / sim':>17s} {'live / sim':>13s} {'live':>6s} {'live':>8s}")
    for p, r in out["policies"].items():
        sm = out["sim"][p]
        typer.echo(
            f"{p:12s} {r['slo_violation_s']:8.0f} /{sm['slo_violation_s']:7.0f} {r['instance_s']:8.0f} /"
            f"{sm['instance_s']:7.0f} {r['scale_actions']:6d} /{sm['scale_actions']:5d} "
            f"{r['lost']:6d} {r['p99_ms']:8.1f}"
        )

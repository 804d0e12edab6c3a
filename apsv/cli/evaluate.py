"""`apsv evaluate TRACE`: compare scaling policies on a load trace."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def evaluate(
    trace: str = typer.Argument(
        ..., help="CSV / one-value-per-line series, an MRT update dump, or synthetic:bfd[:PEAK_SESSIONS]"
    ),
    policies: str = typer.Option("static,reactive,threshold,predictive,oracle", "--policies", help="comma-separated"),
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
    plots: Path | None = typer.Option(Path("apsv-evaluate"), "--plots", help="directory for the PNG plots"),
) -> None:
    """Simulate each policy on the trace (the first 30 % trains the forecaster); print SLO-violation
    seconds, instance-seconds, scale actions and lost messages; write plots."""
    from apsv.forecast.evaluate import is_mrt, read_series
    from apsv.forecast.series import SeriesError
    from apsv.scaling.evaluate import claims, plot, public
    from apsv.scaling.evaluate import evaluate as run
    from apsv.scaling.simulator import SimConfig
    from apsv.scaling.traces import Trace, bfd_population, bgp_churn, from_series

    if mode != "sim":
        typer.echo("apsv evaluate: --mode live is not available yet (the simulator is; see docs/scaling.md)", err=True)
        raise typer.Exit(2)
    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    try:
        tr: Trace
        if trace.startswith("synthetic:bfd"):
            parts = trace.split(":")
            tr = bfd_population(int(parts[2]) if len(parts) > 2 else 20_000)
        else:
            path = Path(trace)
            if not path.is_file():
                typer.echo(f"apsv evaluate: {trace}: no such file", err=True)
                raise typer.Exit(2)
            tr = bgp_churn(path) if is_mrt(path) else from_series(read_series(path, column, season), peak_rate)
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
    for k, v in out["claims"].items():
        typer.echo(f"{k}: {v}")
    for p in written:
        typer.echo(f"wrote {p}")

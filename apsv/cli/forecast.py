"""`apsv forecast ...`: backtest the traffic forecasters on a series."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from apsv.forecast.series import SeriesError

forecast_app = typer.Typer(help="The traffic prediction engine: backtests and models.", no_args_is_help=True)


@forecast_app.command("backtest")
def backtest(
    file: Path = typer.Argument(..., help="CSV (header; value column), one value per line, or an MRT update dump"),
    column: str | None = typer.Option(None, "--column", help="CSV value column (MRT: prefixes or updates)"),
    season: int | None = typer.Option(
        None, "--season", min=1, help="seasonal period in steps (default: a day from timestamps, else 1)"
    ),
    horizon: int | None = typer.Option(
        None, "--horizon", min=1, help="steps ahead (default: min(season, 24), 10 without a season)"
    ),
    windows: int = typer.Option(10, "--windows", min=1, help="rolling-origin test windows"),
    models: str = typer.Option("seasonal_naive,ets,lstm,transformer", "--models", help="comma-separated model names"),
    steps: int = typer.Option(600, "--steps", min=1, help="training steps for the neural models"),
    max_gap: int | None = typer.Option(
        None, "--max-gap", min=0, help="longest run of missing values to interpolate (default: a season, at least 12)"
    ),
    plot: Path | None = typer.Option(None, "--plot", help="write a PNG of the last windows here"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Rolling-origin backtest: per-model MASE, MASE relative to seasonal naive, weighted quantile
    loss and p90 coverage."""
    from apsv.forecast.model_backtest import default_horizon, read_series, result_json, run_backtest

    if not file.is_file():
        typer.echo(f"apsv forecast: {file}: no such file", err=True)
        raise typer.Exit(2)
    try:
        series = read_series(file, column, season, max_gap=max_gap)
        h = horizon or default_horizon(series.season)
        names = tuple(n.strip() for n in models.split(",") if n.strip())
        result = run_backtest(series, h, windows, names, steps=steps)
    except (SeriesError, ValueError) as e:
        typer.echo(f"apsv forecast: {e}", err=True)
        raise typer.Exit(2) from e
    if plot is not None:
        from apsv.forecast.plots import plot_backtest

        plot_backtest(result, plot)
    if as_json:
        typer.echo(json.dumps(result_json(result)))
        return
    typer.echo(
        f"{result.series}: {result.length} values, season {result.season}, horizon {result.horizon}, "
        f"{len(result.origins)} windows"
    )
    typer.echo(f"{'model':16s} {'MASE':>8s} {'rel MASE':>9s} {'WQL':>8s} {'rel WQL':>8s} {'p90 cov':>8s} {'fit s':>7s}")
    for name, s in result.scores.items():
        note = "  (seasonal naive: too little history)" if s.fallback else ""
        typer.echo(
            f"{name:16s} {s.mase:8.3f} {s.relative_mase:9.3f} {s.wql:8.4f} {s.relative_wql:8.3f} "
            f"{s.p90_coverage:8.1%} {s.fit_seconds:7.1f}{note}"
        )

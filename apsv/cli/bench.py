"""`apsv bench ...`: the benchmarks, with results printed and saved as JSON."""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(help="Run APSV's benchmarks (baselines measured in the same run).", no_args_is_help=True)


@bench_app.command("offload")
def offload(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quick: bool = typer.Option(False, "--quick", help="Fewer messages (a smoke run)."),
    out: Path = typer.Option(Path("benchmarks/results/offload.json"), "--out", help="Where to save the JSON."),
) -> None:
    """Offload path vs a bare Ray batched echo: throughput, latency, copies, start and move times."""
    from apsv.bench.offload import main

    main(as_json=as_json, quick=quick, out=out)

"""`apsv bench ...`: the benchmarks, with results printed and saved as JSON."""

from __future__ import annotations

from pathlib import Path

import typer


def _counts(command: str, option: str, text: str) -> list[int]:
    """Comma-separated integers of an option, or a one-line error and exit 2."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        typer.echo(f"apsv bench {command}: {option} {text!r}: expected comma-separated integers", err=True)
        raise typer.Exit(2) from None


bench_app = typer.Typer(help="Run APSV's benchmarks (baselines measured in the same run).", no_args_is_help=True)


@bench_app.command("offload")
def offload(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quick: bool = typer.Option(False, "--quick", help="Fewer messages (a smoke run)."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
) -> None:
    """Offload path vs a bare Ray batched echo: throughput, latency, copies, start and move times."""
    from apsv.bench.offload import main

    main(as_json=as_json, quick=quick, out=out)


@bench_app.command("bgp-ingest")
def bgp_ingest(
    prefixes: int = typer.Option(100_000, "--prefixes", min=1, help="Prefixes the announcer sends per session."),
    peers: int = typer.Option(1, "--peers", min=1, max=64, help="Announcer sessions (each to its own address)."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Runs per receiver (the median is reported)."),
    receivers: str = typer.Option("apsv,frr,gobgp", "--receivers", help="Comma-separated: apsv, frr, gobgp."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
) -> None:
    """BIRD announces to APSV, FRR bgpd and GoBGP in turn: time to full RIB, CPU and memory."""
    from apsv.bench.ingest import main

    names = tuple(x.strip() for x in receivers.split(",") if x.strip())
    bad = [n for n in names if n not in ("apsv", "frr", "gobgp")]
    if bad:
        typer.echo(f"apsv bench bgp-ingest: unknown receiver(s) {bad} (apsv, frr, gobgp)", err=True)
        raise typer.Exit(2)
    main(prefixes, peers, repeat, as_json, out, names)


@bench_app.command("bfd-scale")
def bfd_scale(
    steps: str = typer.Option("100,200,400,800,1600", "--steps", help="Session counts to try, in order."),
    hold: float = typer.Option(10.0, "--hold", min=1.0, help="Seconds each count must stay Up."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
) -> None:
    """BFD sessions held Up at 100 ms x 3 against FRR bfdd (namespaces; needs root)."""
    from apsv.bench.bfd_scale import main

    main(_counts("bfd-scale", "--steps", steps), hold, as_json, out)


@bench_app.command("restart")
def restart(
    sessions: int = typer.Option(200, "--sessions", min=10, help="BGP sessions replayed (10 per virtual router)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
) -> None:
    """Kill -9 the multiplexer, the VPSM, then both, mid-replay: nothing lost, the longest stall."""
    from apsv.bench.restart import main

    main(sessions, as_json, out)


@bench_app.command("chaos")
def chaos(
    minutes: float = typer.Option(30.0, "--minutes", min=1.0, help="How long faults are injected."),
    every: float = typer.Option(20.0, "--every", min=5.0, help="Seconds between faults (each after recovery)."),
    seed: int = typer.Option(1, "--seed", help="Seeds the faults' order and targets."),
    bgp: int = typer.Option(8, "--bgp", min=1, max=250, help="BIRD's BGP sessions to the agent."),
    bfd: int = typer.Option(16, "--bfd", min=1, max=2000, help="bfdd's BFD sessions with the agent."),
    prefixes: int = typer.Option(1000, "--prefixes", min=1, help="Real routes on each BIRD session."),
    replay: int = typer.Option(40, "--replay", min=10, help="BGP sessions replaying MRT churn, each round."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
) -> None:
    """A fault every 20 s under real load, checked by an independent observer (needs root, BIRD, bfdd, Docker)."""
    from apsv.bench.chaos import main

    r = main(minutes, every, seed, bgp, bfd, prefixes, replay, as_json, out)
    if not r.get("ok"):
        raise typer.Exit(1)


@bench_app.command("consolidation")
def consolidation(
    vrouters: str = typer.Option("10,50,100", "--vrouters", help="Virtual router counts N, comma-separated."),
    prefixes: int = typer.Option(10_000, "--prefixes", min=1, help="Real routes announced to each virtual router."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Also draw PSS and CPU against N here (PNG)."),
) -> None:
    """N virtual routers' BGP on APSV vs an FRR bgpd per virtual router: time, CPU, PSS, crossover N."""
    from apsv.bench.consolidation import main

    counts = sorted(set(_counts("consolidation", "--vrouters", vrouters)))
    if not counts or counts[0] < 1 or counts[-1] > 254 * 256:
        typer.echo(f"apsv bench consolidation: --vrouters {vrouters!r}: each N from 1 to {254 * 256}", err=True)
        raise typer.Exit(2)
    try:
        main(counts, prefixes, as_json, out, plot)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"apsv bench consolidation: {e}", err=True)
        raise typer.Exit(2) from None


@bench_app.command("live-scale")
def live_scale(
    steps: str = typer.Option("250:500,500:1000,1000:2000", "--steps", help="BGP:BFD session counts, in order."),
    vrouters: int = typer.Option(100, "--vrouters", min=1, help="Virtual routers the sessions are dealt over."),
    prefixes: int = typer.Option(1000, "--prefixes", min=1, help="Real routes per BGP session."),
    hold: float = typer.Option(60.0, "--hold", min=5.0, help="Seconds each step is held once converged."),
    bfd_interval: int = typer.Option(300, "--bfd-interval", min=50, help="BFD transmit/receive interval, ms."),
    churn_every: float = typer.Option(5.0, "--churn-every", min=0.0, help="Seconds per slice flap (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Path = typer.Option(None, "--out", help="Also save the JSON here."),
) -> None:
    """BGP (BIRD) and BFD (FRR bfdd) sessions through one agent on `apsv up`: p99, false downs, cost."""
    from apsv.bench.live_scale import main

    pairs = []
    for item in steps.split(","):
        bgp, _, bfd = item.partition(":")
        counts = _counts("live-scale", "--steps", f"{bgp},{bfd or 0}")
        if len(counts) != 2:
            typer.echo(f"apsv bench live-scale: --steps {steps!r}: expected BGP:BFD pairs, e.g. 250:500", err=True)
            raise typer.Exit(2)
        pairs.append((counts[0], counts[1]))
    main(pairs, vrouters, prefixes, hold, bfd_interval, churn_every, as_json, out)

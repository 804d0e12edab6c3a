"""`apsv agent ...`: check an agent configuration, or run an agent against a running cluster."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

agent_app = typer.Typer(help="The virtual router's agent: sockets on one side, the APSV cluster on the other.")


def _load(config: Path):  # type: ignore[no-untyped-def]
    from apsv.agent.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@agent_app.command("check")
def check(config: Path = typer.Argument(..., help="The agent's TOML configuration.")) -> None:
    """Validate a configuration and list the sessions it defines (exit 2, with each problem, if invalid)."""
    cfg = _load(config)
    rows = [
        {"vrouter": v.id, "protocol": proto, "session": key[3], "key": list(key)}
        for key, proto, _c, v, _p in cfg.sessions()
    ]
    warnings = cfg.warnings()
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(json.dumps({"tenant": cfg.tenant, "sessions": rows, "warnings": warnings}))


@agent_app.command("run")
def run(
    config: Path = typer.Argument(..., help="The agent's TOML configuration."),
    address: str = typer.Option("auto", "--address", help="The Ray cluster to join (ray.init address)."),
    namespace: str = typer.Option("apsv", "--namespace", help="The namespace APSV's actors live in."),
    multiplexer: str = typer.Option("apsv-multiplexer", "--multiplexer", help="The multiplexer actor's name."),
) -> None:
    """Run the agent in this process until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    import ray

    from apsv.agent.actor import run_standalone

    cfg = _load(config)
    ray.init(address=address, namespace=namespace, log_to_driver=False)
    asyncio.run(run_standalone(cfg, multiplexer_name=multiplexer, namespace=namespace))

"""The `apsv` command line."""

from __future__ import annotations

from typing import Any

import typer
import typer.core

from apsv import __version__
from apsv.cli.agent import agent_app
from apsv.cli.bench import bench_app
from apsv.cli.bgp import bgp_app
from apsv.cli.demo import demo
from apsv.cli.evaluate import evaluate
from apsv.cli.forecast import forecast_app
from apsv.cli.mrt import mrt_app
from apsv.cli.ops import config, down, env, replay, status, up
from apsv.cli.stacks import stacks

_option_type = typer.core.TyperOption.display_type_rich


def _flag_without_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """A flag takes no value, so its help shows no type (typer's own shows `<bool>`)."""
    return None if self.is_flag else _option_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_without_type  # type: ignore[method-assign]

app = typer.Typer(
    name="apsv",
    help="APSV: Adaptive Protocol Stack Virtualization. Control-plane protocol stacks (BGP, BFD) offloaded "
    "from virtual routers to a Ray cluster, scaled ahead of demand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(mrt_app, name="mrt")
app.add_typer(bench_app, name="bench")
app.add_typer(agent_app, name="agent")
app.add_typer(bgp_app, name="bgp")
app.add_typer(forecast_app, name="forecast")
app.command()(demo)
app.command()(evaluate)
app.command()(stacks)
# operations (apsv/cli/ops.py): one config file, a deployment that outlives the command
app.command()(up)
app.command()(status)
app.command()(replay)
app.command()(down)
app.command()(env)
app.command()(config)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apsv {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """APSV command line."""


def main() -> None:
    app()

"""`apsv stacks`: the protocol stacks this installation can run."""

from __future__ import annotations

import json

import typer

from apsv.stacks.interface import REGISTRY


def stacks(as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text.")) -> None:
    """List the protocol stacks registered under the apsv.stacks entry points."""
    rows = []
    for name in REGISTRY.names():
        stack = REGISTRY.load(name)
        rows.append(
            {
                "name": name,
                "protocol_id": stack.protocol_id,
                "class": f"{type(stack).__module__}.{type(stack).__name__}",
            }
        )
    if as_json:
        typer.echo(json.dumps({"stacks": rows}))
    else:
        for r in rows:
            typer.echo(f"{r['name']:<8} id={r['protocol_id']:<4} {r['class']}")

"""`apsv mrt ...`: read MRT (RFC 6396) files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from apsv.bgp.errors import BgpError
from apsv.bgp.message import Update
from apsv.gc_tuning import tune_gc
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord, MrtError
from apsv.mrt.sessions import RecordedSessions
from apsv.mrt.stats import mrt_stats

mrt_app = typer.Typer(
    help="Read MRT (RFC 6396) dumps: BGP4MP, BGP4MP_ET, TABLE_DUMP, TABLE_DUMP_V2.", no_args_is_help=True
)


def _check(path: Path) -> None:
    if not path.is_file():
        typer.echo(f"apsv mrt: {path}: no such file", err=True)
        raise typer.Exit(2)


@mrt_app.command("stats")
def stats(
    file: Path = typer.Argument(..., help="MRT file (plain, gzip or bzip2)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    recover: bool = typer.Option(False, "--recover", help="Resynchronise after damaged record framing."),
) -> None:
    """Count records, UPDATE messages, announced and withdrawn prefixes, and errors (like bgpdump's summary)."""
    _check(file)
    tune_gc()
    s = mrt_stats(file, recover=recover)
    if s.records == 0 and s.errors:
        # nothing in it could be read as MRT: an error, not a summary of zero records
        typer.echo(f"apsv mrt: {file}: no MRT record could be read: {s.error_samples[0]}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(s.to_json()))
        return
    typer.echo(f"file        {file}")
    typer.echo(f"records     {s.records}")
    typer.echo(f"updates     {s.updates}")
    typer.echo(f"announced   {s.announced}")
    typer.echo(f"withdrawn   {s.withdrawn}")
    typer.echo(f"errors      {s.errors}")
    if s.rib_entries:
        typer.echo(f"rib         {s.rib_prefixes} prefixes, {s.rib_entries} entries")
    if s.messages:
        typer.echo("messages    " + ", ".join(f"{k} {v}" for k, v in sorted(s.messages.items())))
    if s.treat_as_withdraw or s.attribute_discards:
        typer.echo(f"rfc7606     {s.treat_as_withdraw} treat-as-withdraw, {s.attribute_discards} attribute discards")
    for e in s.error_samples:
        typer.echo(f"error       {e}")


@mrt_app.command("dump")
def dump(
    file: Path = typer.Argument(..., help="MRT file."),
    limit: int = typer.Option(0, "--limit", min=0, help="Stop after this many messages (0: all)."),
) -> None:
    """Print each BGP message of an update dump as one JSON line."""
    _check(file)
    sessions = RecordedSessions()
    n = 0
    with MrtReader(file) as reader:
        for item in reader:
            if isinstance(item, MrtError):
                typer.echo(json.dumps({"offset": item.offset, "error": item.reason}))
                continue
            if not isinstance(item, BgpMessageRecord):
                continue
            row: dict[str, object] = {"time": item.timestamp, "peer": item.peer_ip, "peer_as": item.peer_as}
            try:
                m = sessions.decode(item)
            except BgpError as e:
                row["error"] = str(e)
            else:
                row["type"] = type(m).__name__.upper()
                if isinstance(m, Update):
                    row["update"] = m.to_json()
            try:
                sys.stdout.write(json.dumps(row) + "\n")
            except BrokenPipeError:
                raise typer.Exit(0) from None
            n += 1
            if limit and n >= limit:
                break

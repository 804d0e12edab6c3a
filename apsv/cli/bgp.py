"""`apsv bgp ...`: the BGP sessions of the running deployment, in FRR's JSON shapes."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import typer

from apsv.cli.ops import JSON_HELP, _fail

bgp_app = typer.Typer(help="BGP sessions of the running deployment (FRR's `show bgp ...` JSON shapes).")

ADDRESS = typer.Option(None, "--address", help="Ray address (default: from the state file).")
NAMESPACE = typer.Option(None, "--namespace", help="APSV's namespace (default: from the state file).")
TOKEN = typer.Option(None, "--token-path", help="The cluster's token file.")


@bgp_app.command("summary")
def summary(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    address: str | None = ADDRESS,
    namespace: str | None = NAMESPACE,
    token_path: str | None = TOKEN,
) -> None:
    """Every BGP neighbour per virtual router: state, uptime, messages, prefixes accepted and sent."""
    from apsv import bgp_view, ops

    try:
        with ops.connected(address, namespace, token_path, job_name="apsv bgp summary") as (_t, _vpsm, im):
            out = bgp_view.collect_summary(im)
    except ops.OpsError as e:
        _fail("bgp summary", str(e), as_json)
    except Exception as e:  # a cluster that answers badly: still one line
        _fail("bgp summary", f"{type(e).__name__}: {e}".splitlines()[0], as_json)
    if as_json:
        typer.echo(json.dumps(out))
        return
    for vrf, fams in out.items():
        for fam, table in fams.items():
            typer.echo(f"virtual router {vrf} {fam}: router id {table['routerId']}, AS {table['as']}")
            typer.echo(
                f"  {'Neighbor':<28}{'AS':>11}{'MsgRcvd':>9}{'MsgSent':>9}{'Up/Down':>11}  "
                f"{'State/PfxRcd':<14}{'PfxSnt':>7}"
            )
            for peer, p in table["peers"].items():
                st = p["pfxRcd"] if p["state"] == "Established" else p["state"]
                typer.echo(
                    f"  {peer:<28}{p['remoteAs']:>11}{p['msgRcvd']:>9}{p['msgSent']:>9}{p['peerUptime']:>11}  "
                    f"{st!s:<14}{p['pfxSnt']:>7}"
                )


@bgp_app.command("route")
def route(
    vrouter: str = typer.Argument(..., help="The virtual router: TENANT/ID, or ID."),
    prefix: str | None = typer.Argument(None, help="One prefix (as 192.0.2.0/24)."),
    family: str = typer.Option("ipv4-unicast", "--family", help="ipv4-unicast or ipv6-unicast."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    address: str | None = ADDRESS,
    namespace: str | None = NAMESPACE,
    token_path: str | None = TOKEN,
) -> None:
    """A virtual router's Loc-RIB (every BGP session's best paths), or one prefix of it."""
    from apsv import bgp_view, ops

    if family not in ("ipv4-unicast", "ipv6-unicast"):
        _fail("bgp route", f"--family {family!r}: ipv4-unicast or ipv6-unicast", as_json, code=2)
    if not vrouter.rpartition("/")[2].isdigit() or not all(x.isdigit() for x in vrouter.split("/")):
        _fail("bgp route", f"virtual router {vrouter!r}: TENANT/ID or ID, in numbers", as_json, code=2)
    if prefix is not None:
        try:
            prefix = str(ipaddress.ip_network(prefix, strict=True))
        except ValueError as e:
            _fail("bgp route", f"prefix {prefix!r}: {e}", as_json, code=2)
    out: dict[str, Any]
    try:
        with ops.connected(address, namespace, token_path, job_name="apsv bgp route") as (_t, vpsm, im):
            out = bgp_view.collect_routes(im, vpsm, vrouter, family, prefix)
    except (ops.OpsError, LookupError) as e:
        _fail("bgp route", str(e), as_json)
    except Exception as e:
        _fail("bgp route", f"{type(e).__name__}: {e}".splitlines()[0], as_json)
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"virtual router {out.get('vrfName')}: router id {out.get('routerId')}, AS {out.get('localAS')}")
    typer.echo(f"  {'Network':<24}{'Next Hop':<26}{'Metric':>8}{'LocPrf':>8}  Path")
    for p, paths in out["routes"].items():
        for path in paths:
            lp, med = path.get("locPrf", ""), path.get("metric", "")
            mark = "S" if path.get("stale") else "*"
            nh, origin = path["nexthops"][0]["ip"], path["origin"][:1].lower()
            typer.echo(f"{mark}> {p:<24}{nh!s:<26}{med!s:>8}{lp!s:>8}  {path['path']} {origin}")

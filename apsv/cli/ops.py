"""`apsv up | status | replay | down | env | config`: run APSV on a Ray cluster from one config file.

Progress bars go to stderr, so ``--json`` output on stdout is always exactly one JSON object -
also when the command fails (``{"ok": false, "error": ...}``, exit status 1).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from apsv.config import ApsvConfig, ConfigError

CONFIG_HELP = "The APSV configuration (YAML; default: $APSV_CONFIG, else the built-in defaults)."
JSON_HELP = "Print one JSON object instead of tables."

err_console = Console(stderr=True)


def _fail(command: str, message: str, as_json: bool, code: int = 1, **details: Any) -> NoReturn:
    """The one-line error (on stderr; with --json the one object, `details` beside the error)."""
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message, **details}))
    else:
        err_console.print(f"[red]apsv {command}:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(command: str, config: Path | None, as_json: bool) -> ApsvConfig:
    from apsv.config import load_config

    try:
        return load_config(config)
    except ConfigError as e:
        _fail(command, str(e), as_json, code=2)


class _Steps:
    """A progress bar over named steps (the library calls it as each step starts)."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("", total=total)
        self.started = False

    def __call__(self, what: str) -> None:
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=what)

    def done(self) -> None:
        task = self.progress.tasks[0]
        self.progress.update(self.task, completed=task.total, description="done")


def _step_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


# ------------------------------------------------------------------------------------------------


def up(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Start a local Ray head (or join one) and deploy APSV on it.

    Deploys the multiplexer, the VPSM with each protocol's minimum instances, and the forecaster
    if enabled, as detached actors; returns once they run. `apsv down` undoes it.
    """
    from apsv import ops

    cfg = _load("up", config, as_json)
    t0 = time.perf_counter()
    try:
        with _step_bar() as bar:
            steps = _Steps(bar, ops.UP_STEPS)
            state = ops.up(cfg, progress=steps)
            steps.done()
    except ops.OpsError as e:
        _fail("up", str(e), as_json)
    state = {**state, "ok": True, "seconds": round(time.perf_counter() - t0, 2), "state_file": str(ops.state_path())}
    if as_json:
        typer.echo(json.dumps(state))
        return
    t = Table(title=f"APSV is up ({state['seconds']} s)", show_header=False)
    t.add_column("")
    t.add_column("")
    for label, key in (
        ("Ray address", "address"),
        ("namespace", "namespace"),
        ("token file", "token_path"),
        ("dashboard", "dashboard_url"),
        ("Ray temp dir (logs)", "temp_dir"),
        ("protocols", "protocols"),
        ("forecaster app", "forecaster_app"),
        ("telemetry (Parquet)", "telemetry_dir"),
        ("metrics endpoint", "metrics_url"),
        ("Prometheus configuration", "prometheus_config"),
        ("state file", "state_file"),
    ):
        value = state.get(key)
        if value is not None:
            t.add_row(label, ", ".join(value) if isinstance(value, list) else str(value))
    Console().print(t)
    _warn(state.get("warnings"))
    Console().print("Next: [bold]apsv status[/bold], [bold]apsv replay FILE[/bold], [bold]apsv down[/bold]")


def _warn(warnings: list[dict[str, str]] | None) -> None:
    for w in warnings or []:
        err_console.print(f"[yellow]warning ({w['cause']}):[/yellow] {escape(w['message'])}", highlight=False)


def down(
    force: bool = typer.Option(False, "--force", help="Also stop a deployment that a running `apsv demo` owns."),
    keep_logs: bool = typer.Option(False, "--keep-logs", help="Keep the local head's temp dir (Ray's logs)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Destroy the deployment and stop the Ray processes `apsv up` started.

    Instances, VPSM, multiplexer and forecaster go; of Ray's processes only those `apsv up`
    started are stopped (never other clusters on the machine).
    """
    from apsv import ops

    try:
        with _step_bar() as bar:
            steps = _Steps(bar, 2)
            out = ops.down(force=force, keep_logs=keep_logs, progress=steps)
            steps.done()
    except ops.OpsError as e:
        _fail("down", str(e), as_json)
    out["ok"] = True
    if as_json:
        typer.echo(json.dumps(out))
        return
    killed = ", ".join(out.get("actors_killed") or []) or "none"
    Console().print(
        f"APSV is down: actors killed: {killed}; instances destroyed: {out.get('instances_destroyed')}; "
        f"Ray processes stopped: {len(out['stopped_pids'])}"
        + (f" (logs kept in {out['temp_dir']})" if out.get("temp_dir") else ""),
        highlight=False,
    )
    if out.get("teardown_error"):
        err_console.print(f"[yellow]warning:[/yellow] {out['teardown_error']}")


def status(
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    address: str | None = typer.Option(None, "--address", help="Ray address (default: from the state file)."),
    namespace: str | None = typer.Option(None, "--namespace", help="APSV's namespace (default: from the state file)."),
    token_path: str | None = typer.Option(None, "--token-path", help="The cluster's token file."),
) -> None:
    """Show the running deployment: instances, sessions, buffers, forecasts, events.

    Instances per protocol with their policy and start latency, each instance's own traffic
    counters, sessions and live moves, buffer windows and queues, the forecaster's quantiles and
    the VPSM's recent events.
    """
    from apsv import ops

    try:
        st = ops.status(address=address, namespace=namespace, token_path=token_path)
    except ops.DeploymentStarting as e:  # not ready yet, like a missing deployment: exit status 1
        _fail("status", str(e), as_json, starting=e.starting)
    except ops.OpsError as e:
        _fail("status", str(e), as_json)
    except Exception as e:  # a cluster that answers badly: still one JSON object
        _fail("status", f"{type(e).__name__}: {e}".splitlines()[0], as_json)
    if as_json:
        typer.echo(json.dumps(st, default=str))
        return
    _render_status(st)


def _render_status(st: dict[str, Any]) -> None:
    console = Console()
    console.print(_cluster_line(st["cluster"]), highlight=False)
    protocols, instances = _instance_tables(st)
    console.print(protocols)
    for w in st.get("warnings", []):
        console.print(f"[yellow]warning ({w['cause']}):[/yellow] {escape(w['message'])}", highlight=False)
    console.print(instances)
    for line in _summary_lines(st):
        console.print(line, highlight=False)
    if st["forecasts"]:
        console.print(_forecast_table(st))
    if st["events"]:
        console.print(_events_table(st))


def _cluster_line(c: dict[str, Any]) -> str:
    return (
        f"[bold]{c['address']}[/bold] namespace {c['namespace']} ({c.get('owner') or 'unknown owner'}), "
        f"{c['nodes']} node(s), {_cpus(c)}" + (f", dashboard {c['dashboard_url']}" if c.get("dashboard_url") else "")
    )


def _cpus(c: dict[str, Any]) -> str:
    """The hosts' real cores, then Ray's logical CPUs: its scheduling slots, which a node may
    declare at any number (the demo's 16 on a 2-core host)."""
    slots = f"{_figure(c.get('cpus'))} Ray slots, {_figure(c.get('cpus_available'))} free"
    if c.get("host_cpus") is None:  # a node on another host: Ray does not know its cores
        return f"host cpus unknown ({slots})"
    return f"cpus {c['host_cpus']} ({slots})"


def _figure(x: Any) -> str:
    return "?" if x is None else f"{float(x):g}"


def _instance_tables(st: dict[str, Any]) -> tuple[Table, Table]:
    """A row per protocol (its policy, instance counts, bounds), and one per stack instance."""
    pt = Table(title="Protocols")
    cols = ("protocol", "backend", "policy", "running", "pending", "desired", "min..max", "start (s)", "trust")
    for col in cols:
        pt.add_column(col, justify="left" if col in ("protocol", "backend", "policy") else "right")
    it = Table(title="Stack instances")
    for col in ("instance", "sessions", "frames", "msgs/s", "busy", "queue", "start (s)", "state"):
        named = col in ("instance", "state")
        it.add_column(col, justify="left" if named else "right", no_wrap=named, min_width=8 if named else None)
    for proto, p in st["instances"].items():
        pt.add_row(
            proto,
            str(p.get("backend")),
            str(p.get("policy")),
            *_instances(st.get("protocols", {}).get(proto, {}), p.get("count")),
            f"{p.get('min')}..{p.get('max')}",
            f"{p.get('start_latency_s', 0):.3f}",
            "-" if p.get("forecast_trust") is None else f"{p['forecast_trust']:.2f}",
        )
        for m in p["members"]:
            it.add_row(
                m["id"],
                str(m.get("sessions")),
                _count(m.get("frames")),
                _count(m.get("msgs_per_s")),
                "-" if m.get("busy") is None else f"{m['busy']:.2f}",
                _count(m.get("queue_frames")),
                f"{m['start_latency_s']:.3f}",
                _state(m),
            )
    return pt, it


def _summary_lines(st: dict[str, Any]) -> list[str]:
    """Sessions, the frames offered and counted, and the buffers."""
    s, tr, b = st["sessions"], st["traffic"], st["buffer_pool"]
    offered = ", ".join(f"{k} {v:,}" for k, v in tr["offered"].items()) or "none"
    pools = b["client_pools_on_host"]
    return [
        f"sessions {s['total']} ({', '.join(f'{k} {v}' for k, v in s['by_protocol'].items())}) of "
        f"{s['clients']} client(s), live moves {s['moves']}, recoveries {s['recoveries']}",
        f"frames offered by clients: {offered}; at the instances {tr['frames_in']:,}, refused and re-sent "
        f"{tr['refused']:,}, duplicates {tr['duplicates']:,}, foreign {tr['foreign']:,}, "
        f"bad {tr['bad_frames']:,}",
        f"buffers: per-client windows {_mib(b['quota_bytes'])} over all instances, instance queues "
        f"{b['queue_frames']:,} frames, client pools on this host {pools['segments']} ({_mib(pools['bytes'])})",
    ]


def _forecast_table(st: dict[str, Any]) -> Table:
    """Each protocol's forecast quantiles over the next three steps."""
    quantiles = sorted({q for qs in st["forecasts"].values() for q in qs}, key=lambda q: int(q[1:]))
    f = Table(title=f"Forecast load, msgs/s over the next steps (forecast errors: {st['forecast_errors']})")
    f.add_column("protocol")
    for q in quantiles:
        f.add_column(q, justify="right")
    for proto, qs in st["forecasts"].items():
        f.add_row(proto, *(" ".join(f"{v:,.0f}" for v in qs.get(q, [])[:3]) for q in quantiles))
    return f


def _events_table(st: dict[str, Any]) -> Table:
    """The VPSM's last ten events."""
    e = Table(title=f"Recent VPSM events (step {st['vpsm_steps']})")
    e.add_column("time")
    e.add_column("event")
    e.add_column("details")
    for ev in st["events"][-10:]:
        details = ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items() if k not in ("ts", "event")
        )
        e.add_row(time.strftime("%H:%M:%S", time.localtime(ev["ts"])), ev["event"], details)
    return e


def _instances(counts: dict[str, Any], running: Any) -> tuple[str, str, str]:
    """(running, pending, desired); pending: asked of Ray, not placed yet; draining ones are
    shown beside the running ones."""
    if counts.get("desired") is None:
        return str(running), "-", "-"
    ran = str(counts.get("running"))
    if counts.get("draining"):
        ran += f" (+{counts['draining']} draining)"
    return ran, str(counts.get("pending", 0)), str(counts["desired"])


def _mib(n: Any) -> str:
    return "-" if n is None else f"{int(n) / (1 << 20):.1f} MiB"


def _state(m: dict[str, Any]) -> str:
    if not m.get("alive", True):
        return "dead"
    return "draining" if m.get("draining") or not m.get("accepting", True) else "up"


def _count(n: Any) -> str:
    """A figure an instance reports ("-" until its first report)."""
    return "-" if n is None else f"{n:,.0f}"


def replay(
    file: Path = typer.Argument(..., help="An MRT update dump (BGP4MP; .gz/.bz2 read as such)."),
    sessions: int | None = typer.Option(
        None, "--sessions", min=1, help="BGP sessions (default: one per recorded peer)."
    ),
    vrouters: int = typer.Option(1, "--vrouters", min=1, help="Virtual routers the sessions are spread over."),
    speed: float = typer.Option(0.0, "--speed", min=0.0, help="0: as fast as possible; 1: real time; 60: a minute/s."),
    tenant: int = typer.Option(1, "--tenant", min=1, help="Tenant id of the sessions (keep concurrent replays apart)."),
    verify: bool = typer.Option(False, "--verify", help="Check every session against an in-process replay."),
    keep: bool = typer.Option(False, "--keep", help="Leave the sessions open afterwards."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    address: str | None = typer.Option(None, "--address", help="Ray address (default: from the state file)."),
    namespace: str | None = typer.Option(None, "--namespace", help="APSV's namespace (default: from the state file)."),
) -> None:
    """Replay an MRT update dump against the running deployment.

    Each recorded peer becomes BGP sessions of virtual routers, its UPDATEs sent straight to
    the stack instances in recorded order; prints frames, seconds and rate.
    """
    from apsv import ops

    try:
        with Progress(
            TextColumn("replaying {task.fields[name]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("updates"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task("replay", total=None, name=file.name)

            def progress(sent: int, total: int) -> None:
                bar.update(task, completed=sent, total=total)

            out = ops.replay_file(
                file,
                sessions=sessions,
                vrouters=vrouters,
                speed=speed or None,
                tenant=tenant,
                verify=verify,
                keep=keep,
                address=address,
                namespace=namespace,
                progress=progress,
            )
    except ops.OpsError as e:
        _fail("replay", str(e), as_json)
    ok = out.get("verified", True)
    out["ok"] = ok
    if as_json:
        typer.echo(json.dumps(out))
    else:
        checked = "" if "verified" not in out else "; every session verified" if ok else "; VERIFICATION FAILED"
        Console().print(
            f"{out['frames']:,} UPDATEs from {out['recorded_peers']} recorded peers as {out['sessions']} sessions "
            f"of {out['vrouters']} virtual router{'s' * (out['vrouters'] != 1)} in {out['seconds']} s "
            f"({out['frames_per_s']:,.0f}/s, {out['transport']}){checked}",
            highlight=False,
        )
        for p in out.get("problems", []):
            err_console.print(f"[red]{p}[/red]")
    if not ok:
        raise typer.Exit(1)


def env(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Print the environment variables that join the recorded cluster.

    `eval "$(apsv env)"`, then `ray job submit ...`, `ray status` or a Python driver.
    """
    from apsv import ops

    try:
        state = ops.read_state()
    except ops.OpsError as e:
        _fail("env", str(e), as_json)
    if state is None:
        _fail("env", f"no deployment recorded in {ops.state_path()}", as_json)
    values = ops.auth_env(state.get("token_path"), state.get("auth_mode", "token"))
    values["RAY_ADDRESS"] = str(state["address"])
    values.update(ops.loopback_env(str(state["address"])))
    if state.get("dashboard_url"):
        values["RAY_API_SERVER_ADDRESS"] = str(state["dashboard_url"])  # `ray job` talks to the dashboard
    if as_json:
        typer.echo(json.dumps(values))
        return
    for k, v in values.items():
        typer.echo(f"export {k}={shlex.quote(v)}")


def config(
    file: Path | None = typer.Argument(None, help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check a configuration and print it with every default filled in.

    Environment overrides are applied. Exit status 2, naming each problem's file, field and
    reason, if it is invalid. Warns (exit status 0) when the protocols at max_instances plus the
    forecaster need more than the local head it would start offers.
    """
    from apsv.config import dump_config

    cfg = _load("config", file, as_json)
    warnings = cfg.fit_warnings()
    if as_json:
        out = {"ok": True, "source": cfg.source, "config": cfg.model_dump(mode="json"), "warnings": warnings}
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"# {cfg.source}")
        typer.echo(dump_config(cfg), nl=False)
        _warn(warnings)

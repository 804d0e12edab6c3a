"""Operating a deployment: `apsv up`, `status`, `replay`, `down`, and the state file between them.

`up` either joins a cluster (``ray.address``) or starts a local Ray head with ``ray start``:
loopback only, its own temp dir, Ray's token authentication on with a token file of its own. It
then deploys the multiplexer and the VPSM as named, detached actors (they outlive the command)
and, if configured, the forecaster's Serve application. What later commands need to find it all
again - address, token file, namespace, actor names, the processes it started - goes into a
state file, ``$APSV_STATE_DIR/state.json`` (default ``~/.apsv/state.json``). `apsv demo` writes
the same file for its own cluster while it runs, so `apsv status` can watch it.

Ray reads ``RAY_AUTH_MODE`` and the token's path when it is first imported, so every function
here sets them (`use_auth`) before Ray is imported, and refreshes Ray's cached settings if it
already was.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

from apsv.config import DEFAULTS_SOURCE, ApsvConfig, ForecasterSection, RaySection, format_size

STATE_VERSION = 1
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
MULTIPLEXER_NAME = "apsv-multiplexer"  # = apsv.runtime.cluster.MULTIPLEXER_NAME (not imported: Ray)
VPSM_NAME = "apsv-vpsm"  # = apsv.runtime.vpsm.VPSM_NAME
CALL_TIMEOUT_S = 60.0

Progress = Callable[[str], None]  # told each step as it starts


class OpsError(RuntimeError):
    """An operation that cannot be done; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# The state file


def state_dir() -> Path:
    """$APSV_STATE_DIR, else ~/.apsv."""
    return Path(os.environ.get("APSV_STATE_DIR") or Path.home() / ".apsv").expanduser()


def state_path() -> Path:
    return state_dir() / STATE_FILE


def write_state(info: Mapping[str, Any]) -> Path:
    """Record a running deployment (atomically, readable by the owner only). Keys, all optional
    but `address`: address, namespace, multiplexer, vpsm (actor names), token_path, auth_mode,
    temp_dir, pids ([{pid, create_time}] of processes to stop on `down`), started_head (whether
    `down` stops the cluster), owner ("apsv up", "apsv demo"), owner_pid (set when the actors
    live only as long as that process), forecaster_app, dashboard_url, metrics_export_port,
    telemetry_dir, config."""
    if not info.get("address"):
        raise ValueError("the state needs the cluster's 'address'")
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {
        "version": STATE_VERSION,
        "namespace": "apsv",
        "multiplexer": MULTIPLEXER_NAME,
        "vpsm": VPSM_NAME,
        "auth_mode": "token",
        "started_head": False,
        **dict(info),
        "written": time.time(),
    }
    path = d / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_state() -> dict[str, Any] | None:
    """The recorded deployment, or None if there is none."""
    path = state_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OpsError(f"{path}: unreadable state file ({e}); remove it if no deployment is running") from None
    if not isinstance(data, dict) or not data.get("address"):
        raise OpsError(f"{path}: not an APSV state file (no address); remove it if no deployment is running")
    return data


def clear_state() -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path().unlink()


# ------------------------------------------------------------------------------------------------
# Token authentication and connecting


def ensure_token(path: Path) -> Path:
    """A token file at `path` (made, owner-only, if missing: 256 random bits in hex)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def auth_env(token_path: str | None, mode: str = "token") -> dict[str, str]:
    """The environment a Ray process needs to join the cluster (`apsv env` prints it)."""
    env = {"RAY_AUTH_MODE": mode}
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env


def use_auth(token_path: str | None, mode: str = "token") -> None:
    """Make this process (and what it starts) use the cluster's token."""
    if token_path:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray prefers it to the file: the file is the truth here
    os.environ.update(auth_env(token_path, mode))
    if "ray" in sys.modules:
        # Ray caches RAY_AUTH_MODE and the token at import; refresh both the way Ray itself does
        # when it turns token auth on (ray._private.authentication.authentication_token_setup).
        with contextlib.suppress(ImportError, AttributeError):
            raylet: Any = importlib.import_module("ray._raylet")
            raylet.Config.initialize("")
            raylet.AuthenticationTokenLoader.instance().reset_cache()


def connect(address: str, namespace: str, token_path: str | None, auth_mode: str = "token") -> None:
    """Join the cluster as a driver (quietly: no worker logs, no INFO lines on the terminal)."""
    use_auth(token_path, auth_mode)
    import ray

    if ray.is_initialized():
        return  # an in-process caller (the demo) that is already connected
    env_address = os.environ.pop("RAY_ADDRESS", None)  # ours, not whatever the shell had
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:
        raise OpsError(
            f"cannot connect to the Ray cluster at {address}: {e}".splitlines()[0]
            + (f" (token file: {token_path})" if token_path else "")
        ) from None
    finally:
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address


def _ray_connected() -> bool:
    if "ray" not in sys.modules:  # not imported: certainly not connected (and no import cost)
        return False
    import ray

    return bool(ray.is_initialized())


def disconnect() -> None:
    if _ray_connected():
        import ray

        ray.shutdown()


# ------------------------------------------------------------------------------------------------
# A local head and its processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"  # the ray of this interpreter's environment
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise OpsError("the `ray` command is not installed beside this Python (pip install 'ray[default]')")
    return found


def cluster_processes(temp_dir: str, pids: list[dict[str, Any]] | None = None) -> list[psutil.Process]:
    """The processes of a cluster we started: every process whose command line names its temp
    dir (Ray passes it to each daemon), the recorded ones (if still the same process), and all
    their descendants (workers rename themselves `ray::...` and lose the temp dir)."""
    me = os.getpid()
    mine = {me, *(p.pid for p in psutil.Process(me).parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in mine and any(temp_dir in part for part in (p.info["cmdline"] or [])):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for rec in pids or []:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
            p = psutil.Process(int(rec["pid"]))
            if abs(p.create_time() - float(rec["create_time"])) < 1.0:  # not a reused pid
                found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for c in p.children(recursive=True):
                if c.pid not in mine:
                    found[c.pid] = c
    return list(found.values())


def stop_processes(temp_dir: str, pids: list[dict[str, Any]] | None = None, timeout: float = 15.0) -> list[int]:
    """Stop the cluster's processes (SIGTERM, then SIGKILL after `timeout`); returns their pids.
    Only these: `ray stop` would stop every Ray cluster of this user on the machine."""
    procs = cluster_processes(temp_dir, pids)

    def is_gcs(p: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return p.name() == "gcs_server"
        return False

    # The GCS last: the other daemons then exit in about two seconds; stopped together, the
    # GCS and the autoscaler's monitor wait on each other for longer than we would wait.
    gcs = [p for p in procs if is_gcs(p)]
    for group in ([p for p in procs if p not in gcs], gcs):
        for p in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(group, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
    return sorted(p.pid for p in procs)


@dataclass
class Head:
    address: str
    temp_dir: str
    token_path: str
    pids: list[dict[str, Any]] = field(default_factory=list)
    dashboard_url: str | None = None
    metrics_export_port: int | None = None


def start_head(rc: RaySection, token_path: Path, timeout: float = 120.0) -> Head:
    """`ray start --head` on loopback, in a temp dir of its own, with token auth on."""
    if rc.temp_dir:
        tmp = rc.temp_dir
        if cluster_processes(tmp):
            raise OpsError(f"ray.temp_dir {tmp} is in use by a running Ray cluster: choose another")
        Path(tmp).mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="apsv-ray-", dir="/tmp")  # short: socket paths are length-limited
    port = rc.port or free_port()
    for what, p in (("ray.port", rc.port), ("ray.metrics_export_port", rc.metrics_export_port)):
        if p is not None and port_in_use(p):
            raise OpsError(f"{what} {p} is in use: choose another port")
    if rc.include_dashboard and port_in_use(rc.dashboard_port, rc.dashboard_host):
        raise OpsError(
            f"ray.dashboard_port {rc.dashboard_port} is in use (another cluster's dashboard?): set another one "
            "(APSV__RAY__DASHBOARD_PORT=...) or ray.include_dashboard: false"
        )
    args = [
        ray_executable(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--temp-dir={tmp}",
        # Ray's client server defaults to 10001 for every head: a free port keeps clusters apart
        f"--ray-client-server-port={free_port()}",
        # likewise the dashboard agent's HTTP port (52365): without it, job submission fails
        f"--dashboard-agent-listen-port={free_port()}",
        f"--include-dashboard={str(rc.include_dashboard).lower()}",
        f"--dashboard-host={rc.dashboard_host}",
        f"--dashboard-port={rc.dashboard_port}",
        "--disable-usage-stats",
    ]
    if rc.num_cpus is not None:
        args.append(f"--num-cpus={rc.num_cpus}")
    if rc.object_store_memory is not None:
        args.append(f"--object-store-memory={rc.object_store_memory}")
    if rc.resources:
        args.append(f"--resources={json.dumps(rc.resources)}")
    if rc.metrics_export_port is not None:
        args.append(f"--metrics-export-port={rc.metrics_export_port}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(auth_env(str(token_path)))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Job entrypoints (`ray job submit -- python jobs/x.py`) run with the raylet's PATH: this
    # environment's python first, the one APSV is installed in.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        stop_processes(tmp)
        raise OpsError(f"`ray start --head` did not finish in {timeout:.0f} s (logs: {tmp})") from None
    if proc.returncode != 0:
        stop_processes(tmp)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise OpsError(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
    pids = []
    for proc_ in cluster_processes(tmp):
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.append({"pid": proc_.pid, "create_time": proc_.create_time(), "name": proc_.name()})
    return Head(
        address=f"127.0.0.1:{port}",
        temp_dir=tmp,
        token_path=str(token_path),
        pids=pids,
        dashboard_url=f"http://{rc.dashboard_host}:{rc.dashboard_port}" if rc.include_dashboard else None,
        metrics_export_port=rc.metrics_export_port,
    )


def _alive(state: Mapping[str, Any]) -> bool:
    """Whether a recorded deployment may still be running (for a head we started: its processes
    are; for a demo's: the demo is; otherwise we cannot tell without connecting: assume so)."""
    owner = state.get("owner_pid")
    if owner is not None and not psutil.pid_exists(int(owner)):
        return False
    if state.get("started_head") and state.get("temp_dir"):
        return bool(cluster_processes(str(state["temp_dir"]), state.get("pids")))
    return True


# ------------------------------------------------------------------------------------------------
# up


def _get(refs: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
    import ray

    return ray.get(refs, timeout=timeout)


def _step(progress: Progress | None, what: str) -> None:
    if progress is not None:
        progress(what)


UP_STEPS = 5  # start/join, connect, multiplexer, forecaster, VPSM + minimum instances


def up(cfg: ApsvConfig, *, progress: Progress | None = None) -> dict[str, Any]:
    """Start (or join) the cluster and deploy APSV on it; record it in the state file. Returns
    the recorded state."""
    old = read_state()
    if old is not None:
        if _alive(old):
            raise OpsError(
                f"a deployment is already recorded in {state_path()} ({old.get('owner', 'unknown')} at "
                f"{old['address']}): run `apsv down` first, or use another APSV_STATE_DIR"
            )
        clear_state()  # left behind by a deployment that is gone
    rc = cfg.ray
    sdir = state_dir()
    head: Head | None = None
    state: dict[str, Any]
    if rc.address is None:
        _step(progress, "starting a local Ray head")
        token = ensure_token(Path(os.path.expanduser(rc.auth_token_path)) if rc.auth_token_path else sdir / TOKEN_FILE)
        head = start_head(rc, token)
        state = {
            "address": head.address,
            "temp_dir": head.temp_dir,
            "token_path": head.token_path,
            "pids": head.pids,
            "started_head": True,
            "dashboard_url": head.dashboard_url,
            "metrics_export_port": head.metrics_export_port,
        }
    else:
        _step(progress, f"joining the Ray cluster at {rc.address}")
        token_path = (
            os.path.expanduser(rc.auth_token_path) if rc.auth_token_path else os.environ.get("RAY_AUTH_TOKEN_PATH")
        )
        state = {"address": rc.address, "token_path": token_path, "started_head": False}
    telemetry = cfg.telemetry_root(sdir)
    state.update(
        namespace=rc.namespace,
        multiplexer=MULTIPLEXER_NAME,
        vpsm=VPSM_NAME,
        owner="apsv up",
        config=None if cfg.source == DEFAULTS_SOURCE else str(Path(cfg.source).resolve()),
        protocols=[p.protocol for p in cfg.protocols],
        telemetry_dir=str(telemetry),
        forecaster_app=None,
    )
    write_state(state)  # now: a failure below still leaves `apsv down` something to clean up
    created: list[str] = []
    try:
        _step(progress, "connecting")
        connect(state["address"], rc.namespace, state.get("token_path"))
        _deploy(cfg, state, telemetry, progress, created)
    except BaseException as e:
        if created:  # only what this call made: never a deployment that was there before
            with contextlib.suppress(Exception):
                _teardown(state)
        disconnect()  # before the head goes: a connected driver would print its daemons' deaths
        if head is not None:
            stop_processes(head.temp_dir, head.pids)
            if isinstance(e, OpsError) and not rc.temp_dir:
                shutil.rmtree(head.temp_dir, ignore_errors=True)  # our refusal says it all; else keep the logs
        clear_state()
        raise
    finally:
        disconnect()
    write_state(state)
    return read_state() or state


def _deploy(
    cfg: ApsvConfig, state: dict[str, Any], telemetry: Path, progress: Progress | None, created: list[str]
) -> None:
    import ray

    from apsv.runtime.cluster import deploy
    from apsv.runtime.multiplexer import create_multiplexer

    ns = cfg.ray.namespace
    try:
        ray.get_actor(VPSM_NAME, namespace=ns)
    except ValueError:
        pass  # none: ours to make
    else:
        raise OpsError(f"an APSV deployment is already running in namespace {ns!r}: `apsv down`, or another namespace")
    try:
        ray.get_actor(MULTIPLEXER_NAME, namespace=ns)
        orphans = [VPSM_NAME]
    except ValueError:
        orphans = [VPSM_NAME, MULTIPLEXER_NAME]
    # What a deployment killed without `apsv down` kept in Ray's KV store: the new actors would
    # take it up as their own.
    forget_deployment(ns, orphans)
    if state.get("started_head"):
        _check_capacity(cfg)
    _step(progress, "starting the multiplexer")
    created.append(MULTIPLEXER_NAME)
    # Detached and created first: deploy() then finds it by name (get_if_exists) instead of
    # making one owned by this short-lived driver.
    im = create_multiplexer(MULTIPLEXER_NAME, namespace=ns, detached=True)
    ray.get(im.stats.remote(), timeout=CALL_TIMEOUT_S)
    app = None
    if cfg.forecaster.enabled:
        _step(progress, f"deploying the forecaster ({cfg.forecaster.app_name})")
        app = _deploy_forecaster(cfg.forecaster)
        state["forecaster_app"] = app
        f = cfg.forecaster
        state["forecaster_url"] = f"http://{f.http_host}:{f.http_port}{f.route_prefix}" if f.route_prefix else None
    else:
        _step(progress, "forecaster disabled")
    n = sum(p.min_instances for p in cfg.protocols)
    _step(progress, f"starting the VPSM and {n} stack instance{'s' * (n != 1)}")
    telemetry.mkdir(parents=True, exist_ok=True)
    deploy(
        cfg.plans(),
        namespace=ns,
        telemetry_root=telemetry,
        interval_s=cfg.vpsm.interval_s,
        forecaster_app=app,
    )


def _check_capacity(cfg: ApsvConfig) -> None:
    """Refuse a head that cannot hold the minimum instances: their actors would wait for
    resources forever, and so would `up`. (Only for a head we started: a joined cluster may
    autoscale to fit.)"""
    import ray

    r: Any = ray
    free = r.available_resources()
    cpu = sum(p.min_instances * p.allocation.cpu for p in cfg.protocols)
    mem = sum(p.min_instances * p.allocation.memory for p in cfg.protocols)
    if cfg.forecaster.enabled:
        cpu += cfg.forecaster.num_replicas * cfg.forecaster.num_cpus
    have_cpu, have_mem = float(free.get("CPU", 0.0)), float(free.get("memory", 0.0))
    if cpu > have_cpu + 1e-9:
        raise OpsError(
            f"the minimum instances (and forecaster) need {cpu:g} CPUs, the head has {have_cpu:g}: "
            "raise ray.num_cpus, or lower min_instances / allocation.cpu / forecaster.num_cpus"
        )
    if mem > have_mem:
        raise OpsError(
            f"the minimum instances need {format_size(mem)} of memory, the head has {format_size(int(have_mem))}: "
            "lower min_instances or allocation.memory"
        )


def _deploy_forecaster(f: ForecasterSection) -> str:
    from ray import serve

    from apsv.forecast.serving import ForecastService

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would garble the progress bar
    serve.start(http_options={"host": f.http_host, "port": f.http_port})
    app = ForecastService.options(
        num_replicas=f.num_replicas, ray_actor_options={"num_cpus": f.num_cpus}, user_config=f.user_config()
    ).bind()
    serve.run(app, name=f.app_name, route_prefix=f.route_prefix)  # returns once the app is running
    return f.app_name


def _teardown(state: Mapping[str, Any]) -> dict[str, Any]:
    """Destroy the deployment's actors (connected): instances, VPSM, multiplexer, Serve app.

    Ray restarts the VPSM and the multiplexer whenever their processes die, each taking up the
    state it keeps in Ray's KV store: they are killed for good (no_restart) and that state is
    forgotten, so that nothing rebuilds a deployment stopped on purpose."""
    import ray

    ns = state.get("namespace", "apsv")
    names = {"vpsm": state.get("vpsm", VPSM_NAME), "multiplexer": state.get("multiplexer", MULTIPLEXER_NAME)}
    out: dict[str, Any] = {"instances_destroyed": None, "actors_killed": []}
    handles: dict[str, Any] = {}
    for role, name in names.items():
        with contextlib.suppress(ValueError):
            handles[role] = ray.get_actor(name, namespace=ns)
    vpsm, im = handles.get("vpsm"), handles.get("multiplexer")
    if vpsm is not None:
        with contextlib.suppress(Exception):  # a VPSM that cannot answer is killed all the same
            before = _get(vpsm.status.remote())
            out["instances_destroyed"] = len(before["instances"])
        with contextlib.suppress(Exception):
            ray.get(vpsm.shutdown.remote(), timeout=120)  # stops the loop, destroys the instances, forgets
    if im is not None:
        with contextlib.suppress(Exception):
            _get(im.forget.remote())
    for role, handle in handles.items():
        ray.kill(handle, no_restart=True)
        out["actors_killed"].append(names[role])
    forget_deployment(ns, names.values())  # what an actor that could not answer left behind
    if state.get("forecaster_app"):
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        with contextlib.suppress(Exception):
            serve.delete(str(state["forecaster_app"]))
            out["forecaster_deleted"] = state["forecaster_app"]
    return out


def forget_deployment(namespace: str, names: Iterable[str]) -> None:
    """Drop what the named control-plane actors of `namespace` keep in Ray's KV store (connected;
    only for actors that are gone, or about to be: a live one would write it again)."""
    from apsv.runtime import persist

    for name in names:
        with contextlib.suppress(Exception):
            persist.forget(f"{namespace}/{name}")


# ------------------------------------------------------------------------------------------------
# down


def down(*, force: bool = False, keep_logs: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Destroy the recorded deployment and stop the Ray processes `up` started (only those)."""
    state = read_state()
    if state is None:
        raise OpsError(f"no deployment recorded in {state_path()}")
    owner_pid = state.get("owner_pid")
    if owner_pid is not None and psutil.pid_exists(int(owner_pid)) and not force:
        raise OpsError(
            f"the deployment belongs to a running {state.get('owner', 'process')} (pid {owner_pid}), which "
            "stops it when it ends; use --force to stop it anyway"
        )
    out: dict[str, Any] = {"address": state["address"], "namespace": state.get("namespace")}
    if _alive(state):
        _step(progress, "destroying the deployment")
        try:
            connect(
                state["address"],
                state.get("namespace", "apsv"),
                state.get("token_path"),
                state.get("auth_mode", "token"),
            )
            out.update(_teardown(state))
        except OpsError as e:
            out["teardown_error"] = str(e)
        finally:
            disconnect()
    else:
        _step(progress, "the cluster is gone already")
    stopped: list[int] = []
    if state.get("started_head") and state.get("temp_dir"):
        _step(progress, "stopping the Ray processes")
        tmp = str(state["temp_dir"])
        stopped = stop_processes(tmp, state.get("pids"))
        if not keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        out["temp_dir"] = tmp if keep_logs else None
    out["stopped_pids"] = stopped
    clear_state()
    return out


# ------------------------------------------------------------------------------------------------
# status


def _target(
    state: Mapping[str, Any] | None, address: str | None, namespace: str | None, token_path: str | None
) -> dict[str, Any]:
    """Where to look: the state file's deployment, with any of it overridden."""
    if state is None and address is None:
        raise OpsError(f"no deployment recorded in {state_path()}: `apsv up` first, or give --address")
    t = dict(state or {})
    if address is not None:
        t["address"] = address
    if namespace is not None:
        t["namespace"] = namespace
    if token_path is not None:
        t["token_path"] = token_path
    t.setdefault("namespace", "apsv")
    t.setdefault("multiplexer", MULTIPLEXER_NAME)
    t.setdefault("vpsm", VPSM_NAME)
    t.setdefault("token_path", os.environ.get("RAY_AUTH_TOKEN_PATH"))
    return t


def _handles(t: Mapping[str, Any]) -> tuple[Any, Any]:
    import ray

    ns = t["namespace"]
    try:
        return ray.get_actor(t["vpsm"], namespace=ns), ray.get_actor(t["multiplexer"], namespace=ns)
    except ValueError:
        raise OpsError(
            f"no APSV deployment ({t['vpsm']}, {t['multiplexer']}) in namespace {ns!r} at {t['address']}"
        ) from None


@contextlib.contextmanager
def connected(
    address: str | None = None, namespace: str | None = None, token_path: str | None = None
) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(target, VPSM handle, multiplexer handle) of the recorded (or given) deployment."""
    t = _target(read_state(), address, namespace, token_path)
    was_connected = _ray_connected()
    connect(t["address"], t["namespace"], t.get("token_path"), t.get("auth_mode", "token"))
    try:
        vpsm, im = _handles(t)
        yield t, vpsm, im
    finally:
        if not was_connected:
            disconnect()


def _shm_segments() -> dict[str, int]:
    """Clients' shared-memory buffer pools on this host (apsv-pool-*)."""
    n = size = 0
    with contextlib.suppress(OSError):
        for p in Path("/dev/shm").glob("apsv-pool-*"):
            with contextlib.suppress(OSError):
                size += p.stat().st_size
                n += 1
    return {"segments": n, "bytes": size}


# An instance's counters of frames it refused for their client to re-send: the session moved
# away, the frame names an older route's epoch, it follows a gap, or its session waits for its
# restore.
REFUSED_KEYS = ("departed", "stale", "out_of_order", "pending")


def _num(x: Any) -> float:
    """A counter as reported, 0 where an instance has not reported it (yet)."""
    return 0.0 if x is None else float(x)


def _refused(load: Mapping[str, Any]) -> int | None:
    """An instance's refused frames (REFUSED_KEYS); None before its first report."""
    return int(sum(_num(load.get(k)) for k in REFUSED_KEYS)) if load else None


def collect_status(t: Mapping[str, Any], vpsm: Any, im: Any) -> dict[str, Any]:
    """One JSON-able picture of a deployment (connected): instances per protocol, sessions,
    traffic, forecasts, buffers, recent events.

    No frame passes the multiplexer, so the traffic figures are the instances' own counters as
    of the VPSM's last control step (`loads` in its status: asking the instances here would take
    the latency samples the control loop reads). They cover the instances running now: a
    destroyed instance's counters go with it. Sessions, placement and moves are the
    multiplexer's."""
    import ray

    r: Any = ray  # Ray's own annotations are partial
    vs, stats, placed, offered = ray.get(
        [vpsm.status.remote(), im.stats.remote(), im.instance_loads.remote(), im.arrivals.remote()],
        timeout=CALL_TIMEOUT_S,
    )
    own: dict[str, dict[str, Any]] = vs.get("loads", {})
    instances: dict[str, Any] = {}
    for proto, p in vs["protocols"].items():
        instances[proto] = {
            "count": p["instances"],
            "policy": p["policy"],
            "backend": p["backend"],
            "min": p["min"],
            "max": p["max"],
            "start_latency_s": round(float(p["start_latency_s"]), 4),
            "forecast_trust": p.get("forecast_trust"),
            "members": [],
        }
    by_protocol: dict[str, int] = {}
    for pl in placed.values():
        by_protocol[pl["protocol"]] = by_protocol.get(pl["protocol"], 0) + int(pl["sessions"])
    for iid, info in sorted(vs["instances"].items()):
        pl, load = placed.get(iid, {}), own.get(iid, {})
        busy = load.get("busy_fraction")
        rate = load.get("msgs_per_s")
        instances.setdefault(info["protocol"], {"count": 0, "members": []})["members"].append(
            {
                "id": iid,
                "start_latency_s": round(float(info["start_latency_s"]), 4),
                "sessions": pl.get("sessions"),  # routed there by the multiplexer
                "pending_sessions": load.get("pending_sessions"),  # waiting there for their restore
                "frames": load.get("frames_in"),  # reached it, refused ones included
                "msgs_per_s": None if rate is None else round(float(rate), 1),
                "busy": None if busy is None else round(float(busy), 4),
                "queue_frames": load.get("queue_depth"),
                "clients": load.get("clients"),
                "refused": _refused(load),
                "errors": load.get("errors"),
                "quota_bytes": pl.get("quota_bytes"),  # each client's window to it
                "accepting": pl.get("accepting"),
                "alive": pl.get("alive"),
                "draining": info.get("draining"),
            }
        )
    loads = [own[i] for i in vs["instances"] if i in own]
    return {
        "ok": True,
        "cluster": {
            "address": t["address"],
            "namespace": t["namespace"],
            "owner": t.get("owner"),
            "dashboard_url": t.get("dashboard_url"),
            "cpus": r.cluster_resources().get("CPU"),
            "cpus_available": r.available_resources().get("CPU"),
            "nodes": sum(1 for n in r.nodes() if n.get("Alive")),
        },
        "deployment": {
            "multiplexer": t["multiplexer"],
            "vpsm": t["vpsm"],
            "forecaster_app": t.get("forecaster_app"),
            "multiplexer_restarts": stats["restarts"],
            "vpsm_restarts": vs.get("restarts", 0),
        },
        "instances": instances,
        "sessions": {
            "total": stats["sessions"],
            "by_protocol": by_protocol,
            "states": stats["session_states"],
            "clients": stats["clients"],
            "moves": stats["moves"],
            "recoveries": stats["recoveries"],
            "sessions_recovered": stats["sessions_recovered"],
        },
        "traffic": {
            "offered": offered,  # per protocol, as the clients report it
            "frames_in": int(sum(_num(x.get("frames_in")) for x in loads)),
            "refused": int(sum(_num(x.get(k)) for x in loads for k in REFUSED_KEYS)),
            **{
                k: int(sum(_num(x.get(k)) for x in loads))
                for k in ("duplicates", "foreign", "unknown_session", "bad_frames", "errors")
            },
        },
        "forecasts": vs.get("forecasts", {}),
        "forecast_errors": vs.get("forecast_errors", 0),
        "buffer_pool": {
            # octets one client may have in flight, to all the instances together
            "quota_bytes": sum(int(x.get("quota_bytes", 0)) for x in placed.values()),
            "queue_frames": int(sum(_num(x.get("queue_depth")) for x in loads)),
            "client_pools_on_host": _shm_segments(),  # clients' shared-memory pools (this host)
        },
        "vpsm_steps": vs["steps"],
        "events": vs["events"][-20:],
    }


def status(address: str | None = None, namespace: str | None = None, token_path: str | None = None) -> dict[str, Any]:
    """The recorded (or given) deployment's status (see `collect_status`)."""
    state = read_state()
    if state is not None and address is None and not _alive(state):
        raise OpsError(
            f"the deployment recorded in {state_path()} is gone (its processes ended): `apsv down` clears it"
        )
    with connected(address, namespace, token_path) as (t, vpsm, im):
        return collect_status(t, vpsm, im)


# ------------------------------------------------------------------------------------------------
# replay


def replay_file(
    path: str | Path,
    *,
    sessions: int | None = None,
    vrouters: int = 1,
    speed: float | None = None,
    tenant: int = 1,
    verify: bool = False,
    keep: bool = False,
    address: str | None = None,
    namespace: str | None = None,
    token_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay an MRT update dump against the running deployment: every recorded peer becomes a
    BGP session (reused round-robin up to `sessions`, spread over `vrouters` virtual routers of
    `tenant`), its UPDATEs sent in recorded order through an OffloadClient (as fast as possible,
    or `speed` times real time). With `verify`, each session is checked against an in-process
    replay (every frame applied once, in order, the same Loc-RIB). The sessions are closed at the
    end unless `keep`."""
    from apsv.runtime.driver import load_streams, plan_sessions

    p = Path(path)
    if not p.is_file():
        raise OpsError(f"{p}: no such file")
    streams = load_streams([p])
    if not streams:
        raise OpsError(f"{p}: no BGP UPDATE messages from any peer to replay")
    n = sessions or len(streams)
    try:
        plan = plan_sessions(streams, n, vrouters, tenant)
    except ValueError as e:
        raise OpsError(str(e)) from None
    with connected(address, namespace, token_path) as (_t, vpsm, im):
        return _replay(im, vpsm, plan, streams, p, speed=speed, verify=verify, keep=keep, progress=progress)


def _replay(
    im: Any,
    vpsm: Any,
    plan: list[Any],
    streams: list[Any],
    path: Path,
    *,
    speed: float | None,
    verify: bool,
    keep: bool,
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    from apsv.runtime import driver
    from apsv.runtime.client import OffloadClient

    client = OffloadClient(im, metrics_label="apsv-replay")
    keys = [s.key for s in plan]
    opened: list[Any] = []
    try:
        placed = client.open_sessions([(s.key, "bgp", s.config(), 0) for s in plan])
        opened = [k for k, v in placed.items() if not v.startswith("error")]
        refused = {k: v for k, v in placed.items() if v.startswith("error")}
        if refused:
            k, why = next(iter(refused.items()))
            hint = " (another replay's sessions? use another --tenant)" if "already open" in why else ""
            raise OpsError(f"{len(refused)} of {len(plan)} sessions refused, e.g. {k}: {why}{hint}")
        total = sum(len(s.stream.messages) for s in plan)
        res = driver.replay(
            client, plan, speed=speed, on_progress=progress, progress_every=max(1, min(1000, total // 100))
        )
        if progress is not None:
            progress(res.frames, total)
        out: dict[str, Any] = {
            "file": str(path),
            "recorded_peers": len(streams),
            "sessions": len(plan),
            "vrouters": len({k[1] for k in keys}),
            "frames": res.frames,
            "seconds": round(res.seconds, 3),
            "frames_per_s": round(res.frames_per_s, 1),
            "transport": client.transport,
            "speed": speed,
        }
        if verify:
            reference = driver.local_digests(plan)
            infos = driver.session_infos(SimpleNamespace(vpsm=vpsm, multiplexer=im))
            problems = driver.verify(plan, infos, reference)
            out["verified"] = not problems
            out["problems"] = problems[:10]
        out["kept_open"] = keep
        return out
    finally:
        if opened and not keep:
            with contextlib.suppress(Exception):
                client.close_sessions(opened, timeout=CALL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            client.close()

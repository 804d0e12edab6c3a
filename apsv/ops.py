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
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

from apsv import capacity, scrape_config
from apsv.atomic_file import write_atomic
from apsv.config import DEFAULTS_SOURCE, ApsvConfig, ForecasterSection
from apsv.local_head import (
    SINGLE_NODE_ENV,
    Head,
    HeadError,
    cluster_processes,
    is_loopback,
    start_head,
    stop_processes,
)

STATE_VERSION = 1
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
MULTIPLEXER_NAME = "apsv-multiplexer"  # = apsv.runtime.cluster.MULTIPLEXER_NAME (not imported: Ray)
VPSM_NAME = "apsv-vpsm"  # = apsv.runtime.vpsm.VPSM_NAME
CALL_TIMEOUT_S = 60.0
JOB_NAME_KEY = "job_name"  # the job metadata the dashboard shows as a job's name
STATUS_MAX_AGE_S = 15.0  # a published status older than this is not the control loop's (it stopped)

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
    # Readers (status, down, another up) see the old state or the new one, never half of one.
    return write_atomic(d / STATE_FILE, json.dumps(data, indent=2, sort_keys=True))


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


def loopback_env(address: str) -> dict[str, str]:
    """What a process needs to reach a loopback-only head: Ray otherwise rewrites 127.0.0.1 in
    an address to the host's own address, where nothing of that head listens."""
    return {SINGLE_NODE_ENV: "0"} if is_loopback(address.rsplit(":", 1)[0]) else {}


def use_loopback(address: str) -> None:
    """Make this process reach a loopback-only head at `address` (`loopback_env`)."""
    env = loopback_env(address)
    os.environ.update(env)
    if env and "ray" in sys.modules:
        # Ray reads the switch once, at import (ray._private.ray_constants); services reads the
        # constant at each call.
        with contextlib.suppress(ImportError, AttributeError):
            constants: Any = importlib.import_module("ray._private.ray_constants")
            constants.ENABLE_RAY_CLUSTER = False


def connect(
    address: str, namespace: str, token_path: str | None, auth_mode: str = "token", job_name: str = "apsv"
) -> None:
    """Join the cluster as a driver (quietly: no worker logs, no INFO lines on the terminal),
    named `job_name` in the dashboard's job list."""
    use_auth(token_path, auth_mode)
    use_loopback(address)
    import ray

    if ray.is_initialized():
        return  # an in-process caller (the demo) that is already connected
    env_address = os.environ.pop("RAY_ADDRESS", None)  # ours, not whatever the shell had
    try:
        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.ERROR,
            job_config=ray.job_config.JobConfig(metadata={JOB_NAME_KEY: job_name}),
        )
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
# A recorded deployment's processes


def _alive(state: Mapping[str, Any]) -> bool:
    """Whether a recorded deployment may still be running (for a head we started: its processes
    are; for a demo's: the demo is; otherwise we cannot tell without connecting: assume so)."""
    owner = state.get("owner_pid")
    if owner is not None and not psutil.pid_exists(int(owner)):
        return False
    if state.get("started_head"):
        return bool(cluster_processes(state.get("process_session"), state.get("pids")))
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
        try:
            head = start_head(rc, token, auth_env(str(token)), offered=cfg.placement.roles().offered())
        except HeadError as e:
            raise OpsError(str(e)) from None
        state = {
            "address": head.address,
            "temp_dir": head.temp_dir,
            "token_path": head.token_path,
            "pids": head.pids,
            "process_session": head.session,
            "started_head": True,
            "dashboard_url": head.dashboard_url,
            "metrics_export_port": head.metrics_export_port,
            "client_server_port": head.client_server_port,
            "dashboard_agent_port": head.dashboard_agent_port,
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
        connect(state["address"], rc.namespace, state.get("token_path"), job_name="apsv up")
        _deploy(cfg, state, telemetry, progress, created)
    except BaseException as e:
        if created:  # only what this call made: never a deployment that was there before
            with contextlib.suppress(Exception):
                _teardown(state)
        disconnect()  # before the head goes: a connected driver would print its daemons' deaths
        if head is not None:
            stop_processes(head.session, head.pids)
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
    from apsv.runtime.roles import RoleError

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
    r: Any = ray
    state["warnings"] = cfg.fit_warnings(r.cluster_resources(), "the cluster")
    prom = scrape_config.write(state_dir(), scrape_config.node_targets(r.nodes()), {"apsv_namespace": ns})
    state["prometheus_config"] = str(prom)
    if state.get("metrics_export_port"):
        host = state["address"].rsplit(":", 1)[0]
        state["metrics_url"] = f"http://{host}:{state['metrics_export_port']}/metrics"
    _step(progress, "starting the multiplexer")
    created.append(MULTIPLEXER_NAME)
    roles = cfg.placement.roles()
    try:
        roles.check(r.cluster_resources(), ("control_plane", "stack_host"))
    except RoleError as e:
        raise OpsError(str(e)) from None
    # Detached and created first: deploy() then finds it by name (get_if_exists) instead of
    # making one owned by this short-lived driver.
    im = create_multiplexer(
        MULTIPLEXER_NAME,
        namespace=ns,
        detached=True,
        resources=roles.request("control_plane"),
        tenants=cfg.tenants.tenant_quotas(),
        client_lease_s=cfg.multiplexer.client_lease_s,
    )
    ray.get(im.stats.remote(), timeout=CALL_TIMEOUT_S)
    app = None
    if cfg.forecaster.enabled:
        _step(progress, f"deploying the forecaster ({cfg.forecaster.app_name})")
        app = deploy_forecaster(cfg.forecaster)
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
        roles=roles,
    )


def _check_capacity(cfg: ApsvConfig) -> None:
    """Refuse a head that cannot hold the minimum instances: their actors would wait for
    resources forever, and so would `up`. (Only for a head we started: a joined cluster may
    autoscale to fit.)"""
    import ray

    r: Any = ray
    free = r.available_resources()
    need = capacity.total(cfg.demands("min"))
    short = capacity.short_of(need, free)
    if short == "CPU":
        raise OpsError(
            f"the minimum instances (and forecaster) need {need['CPU']:g} CPUs, the head has "
            f"{float(free.get('CPU', 0.0)):g}: raise ray.num_cpus, or lower min_instances / allocation.cpu / "
            "forecaster.num_cpus"
        )
    if short is not None:
        raise OpsError(
            f"the minimum instances need {capacity.amount(short, need[short])}, the head has "
            f"{capacity.amount(short, float(free.get(short, 0.0)))}: lower min_instances or allocation.{short}"
        )


def deploy_forecaster(f: ForecasterSection) -> str:
    """Deploy (or deploy again) the forecaster Serve application; its name."""
    from ray import serve

    from apsv.forecast.serving import ForecastService

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would garble the progress bar
    serve.start(http_options={"host": f.http_host, "port": f.http_port})
    app = ForecastService.options(
        num_replicas=f.num_replicas, ray_actor_options={"num_cpus": f.num_cpus}, user_config=f.user_config(state_dir())
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
                job_name="apsv down",
            )
            out.update(_teardown(state))
        except OpsError as e:
            out["teardown_error"] = str(e)
        finally:
            disconnect()
    else:
        _step(progress, "the cluster is gone already")
    stopped: list[int] = []
    if state.get("started_head"):
        _step(progress, "stopping the Ray processes")
        stopped = stop_processes(state.get("process_session"), state.get("pids"))
        tmp = state.get("temp_dir")
        if tmp and not keep_logs:
            shutil.rmtree(str(tmp), ignore_errors=True)
        out["temp_dir"] = tmp if keep_logs else None
    with contextlib.suppress(OSError):
        scrape_config.clear_targets(state_dir())  # Prometheus stops scraping what is gone
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
    address: str | None = None,
    namespace: str | None = None,
    token_path: str | None = None,
    job_name: str = "apsv",
) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(target, VPSM handle, multiplexer handle) of the recorded (or given) deployment."""
    t = _target(read_state(), address, namespace, token_path)
    was_connected = _ray_connected()
    connect(t["address"], t["namespace"], t.get("token_path"), t.get("auth_mode", "token"), job_name)
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

    from apsv.runtime.vpsm import cluster_figures

    vs, parts = ray.get([vpsm.status.remote(), im.status_parts.remote()], timeout=CALL_TIMEOUT_S)
    return build_status(t, vs, parts, cluster_figures(), source="actors")


def build_status(
    t: Mapping[str, Any],
    vs: Mapping[str, Any],
    parts: Mapping[str, Any],
    cluster: Mapping[str, Any],
    source: str,
    as_of: float | None = None,
) -> dict[str, Any]:
    """`apsv status --json` from the VPSM's status, the multiplexer's `status_parts` and the
    cluster's figures, however they were read (`source`: "published" or "actors")."""
    stats, placed, offered = parts["stats"], parts["instance_loads"], parts["arrivals"]
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
        "source": source,  # published by the control loop, or asked of the actors now
        "as_of": round(as_of if as_of is not None else time.time(), 3),
        "cluster": {
            "address": t["address"],
            "namespace": t["namespace"],
            "owner": t.get("owner"),
            "dashboard_url": t.get("dashboard_url"),
            "cpus": cluster["resources"].get("CPU"),
            "cpus_available": cluster["available"].get("CPU"),
            "nodes": cluster["nodes"],
        },
        # per protocol: instances the policy wants, running, pending (asked of Ray, not placed
        # yet) and draining
        "protocols": {
            proto: {k: p.get(k) for k in ("desired", "running", "pending", "draining", "policy", "min", "max")}
            for proto, p in vs["protocols"].items()
        },
        # unplaceable demand: each pending instance Ray cannot place, with the resource it lacks
        "warnings": list(vs.get("warnings", [])),
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
        "forecaster": vs.get("forecaster"),
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
    t = _target(state, address, namespace, token_path)
    snap = published_status(t)
    if snap is not None and time.time() - float(snap["ts"]) <= STATUS_MAX_AGE_S:
        return build_status(t, snap["vpsm"], snap["multiplexer"], snap["cluster"], "published", float(snap["ts"]))
    # Nothing recent published (a VPSM without its control loop): ask the actors, as a driver.
    with connected(address, namespace, token_path, job_name="apsv status") as (t, vpsm, im):
        return collect_status(t, vpsm, im)


def published_status(t: Mapping[str, Any]) -> dict[str, Any] | None:
    """The status the VPSM's control loop last published in Ray's KV store, read through a GCS
    client: no driver, so no job in the dashboard's list. None if there is none."""
    from apsv.runtime.persist import STATUS_KEY

    use_auth(t.get("token_path"), t.get("auth_mode", "token"))
    use_loopback(t["address"])
    raylet: Any = importlib.import_module("ray._raylet")  # (no type stubs)

    key = f"apsv/{t['namespace']}/{t['vpsm']}/{STATUS_KEY}".encode()
    try:
        raw = raylet.GcsClient(address=t["address"]).internal_kv_get(key, namespace=None, timeout=10)
    except Exception as e:
        raise OpsError(
            f"cannot reach the Ray cluster at {t['address']}: {e}".splitlines()[0]
            + (f" (token file: {t['token_path']})" if t.get("token_path") else "")
        ) from None
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        snap = json.loads(raw)
        if isinstance(snap, dict) and {"ts", "vpsm", "multiplexer", "cluster"} <= set(snap):
            return snap
    return None


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
    with connected(address, namespace, token_path, job_name=f"apsv replay {p.name}") as (_t, vpsm, im):
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

"""`apsv up` and `apsv down`: a local head or a joined cluster, the control plane and the
forecaster deployed, and all of it taken down again."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil

from apsv import capacity, scrape_config
from apsv.config import DEFAULTS_SOURCE, ApsvConfig, ForecasterSection
from apsv.local_head import (
    Head,
    HeadError,
    start_head,
    stop_processes,
)
from apsv.ops.access import _alive, auth_env, connect, disconnect, ensure_token
from apsv.ops.base import CALL_TIMEOUT_S, MULTIPLEXER_NAME, TOKEN_FILE, VPSM_NAME, OpsError, Progress
from apsv.ops.state import clear_state, read_state, state_dir, state_path, write_state


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
    try:
        _dep, app = deploy_control_plane(cfg, telemetry, progress=progress)
    except RoleError as e:
        raise OpsError(str(e)) from None
    if app is not None:
        state["forecaster_app"] = app
        f = cfg.forecaster
        state["forecaster_url"] = f"http://{f.http_host}:{f.http_port}{f.route_prefix}" if f.route_prefix else None


def deploy_control_plane(
    cfg: ApsvConfig, telemetry: Path, *, run_loop: bool = True, progress: Progress | None = None
) -> tuple[Any, str | None]:
    """A configuration's control plane on the connected cluster: the multiplexer (detached,
    its tenants' quotas and client lease), the forecaster's Serve application if enabled, the
    VPSM and each protocol's minimum instances. What `apsv up` and jobs/deploy.py both run;
    returns the `Deployment` and the forecaster's application (None: none). RoleError if no
    node offers a role."""
    import ray

    from apsv.runtime.cluster import deploy
    from apsv.runtime.multiplexer import create_multiplexer

    ns = cfg.ray.namespace
    r: Any = ray
    roles = cfg.placement.roles()
    roles.check(r.cluster_resources(), ("control_plane", "stack_host"))
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
    else:
        _step(progress, "forecaster disabled")
    n = sum(p.min_instances for p in cfg.protocols)
    _step(progress, f"starting the VPSM and {n} stack instance{'s' * (n != 1)}")
    telemetry.mkdir(parents=True, exist_ok=True)
    dep = deploy(
        cfg.plans(),
        namespace=ns,
        telemetry_root=telemetry,
        telemetry_retention_hours=cfg.vpsm.telemetry_retention_hours,
        interval_s=cfg.vpsm.interval_s,
        run_loop=run_loop,
        forecaster_app=app,
        roles=roles,
    )
    return dep, app


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

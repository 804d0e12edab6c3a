"""Starting or joining Ray, and deploying APSV's actors on it.

`start_local_ray` uses a temp dir of its own (a stale ``ray_current_cluster`` file in Ray's
default one breaks the next ``ray.init(num_cpus=...)``), binds the dashboard to 127.0.0.1, and
keeps Ray's token authentication on (Ray's default). A temp dir it made is removed when the
process exits (after Ray shuts down), unless ``APSV_KEEP_RAY_LOGS`` is set.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from apsv.runtime.multiplexer import CLIENT_LEASE_S, create_multiplexer
from apsv.runtime.roles import Roles
from apsv.runtime.tenancy import TenantQuotas
from apsv.runtime.vpsm import VPSM_NAME, ProtocolPlan, create_vpsm

DEFAULT_ROLES = Roles()

NAMESPACE = "apsv"
MULTIPLEXER_NAME = "apsv-multiplexer"


@contextlib.contextmanager
def stdout_for_one_object(enabled: bool = True) -> Iterator[None]:
    """For a command whose stdout is one JSON object: Ray's driver prints the cluster's error
    messages ("(raylet) ... will be retried", an actor's death) to `sys.stdout` from a thread of
    its own, whatever `log_to_driver` says. Inside this, `sys.stdout` is stderr; on the way out
    a Ray connection made inside is shut down (no thread left to print) and stdout is the
    object's alone again. A connection made before (a caller's) is left to its caller."""
    if not enabled:
        yield
        return
    connected_before = ray.is_initialized()
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        if not connected_before and ray.is_initialized():
            ray.shutdown()
        sys.stdout = real


def start_local_ray(
    num_cpus: int = 8,
    *,
    temp_dir: str | Path | None = None,
    namespace: str = NAMESPACE,
    include_dashboard: bool = False,
    metrics_export_port: int | None = None,
    object_store_memory: int = 512 << 20,
    roles: Roles = DEFAULT_ROLES,
) -> dict[str, Any]:
    """A local single-node cluster (this process its driver) that plays every role."""
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "reused": True}
    # Unix sockets live under the temp dir and their paths are length-limited: keep it short.
    tmp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="apsv-ray-", dir="/tmp"))
    if not temp_dir and not os.environ.get("APSV_KEEP_RAY_LOGS"):
        atexit.register(_remove_temp_dir, tmp)  # runs before Ray's own exit hook: shut down first
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus,
        "namespace": namespace,
        "include_dashboard": include_dashboard,
        "dashboard_host": "127.0.0.1",
        "_node_ip_address": "127.0.0.1",  # nothing of Ray listens beyond loopback unless configured
        "_temp_dir": str(tmp),
        "object_store_memory": object_store_memory,
        "log_to_driver": bool(os.environ.get("APSV_RAY_LOGS")),
        "resources": roles.offered(),
    }
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    with _keep_ray_on_loopback():
        ray.init(**kwargs)
    return {"address": ray.get_runtime_context().gcs_address, "temp_dir": str(tmp), "reused": False}


@contextlib.contextmanager
def _keep_ray_on_loopback() -> Iterator[None]:
    """Ray replaces a loopback node address with the host's own address (its GCS, raylet and
    workers then listen there) unless it deems the cluster single-node: so it deems while
    `ray.init` starts this node. Ray read the switch when it was imported, so the constant is
    set, not the environment - a `ray start` this process runs later may join other nodes."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _remove_temp_dir(tmp: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Deployment:
    multiplexer: Any
    vpsm: Any
    namespace: str
    multiplexer_name: str = MULTIPLEXER_NAME

    def stop(self) -> None:
        """Destroy the instances, then the VPSM and the multiplexer, and what they kept in Ray's
        KV store (a stopped deployment is not rebuilt)."""
        try:
            ray.get(self.vpsm.shutdown.remote(), timeout=120)
            ray.get(self.multiplexer.forget.remote(), timeout=30)
        finally:
            ray.kill(self.vpsm, no_restart=True)
            ray.kill(self.multiplexer, no_restart=True)


def deploy(
    plans: list[ProtocolPlan],
    *,
    namespace: str = NAMESPACE,
    telemetry_root: str | Path | None = None,
    interval_s: float = 1.0,
    run_loop: bool = True,
    suffix: str = "",
    forecaster_app: str | None = None,
    roles: Roles = DEFAULT_ROLES,
    tenants: TenantQuotas | None = None,
    client_lease_s: float | None = None,
    telemetry_retention_hours: int | None = None,
) -> Deployment:
    """Create the multiplexer and the VPSM, and bring every protocol to its minimum instances.
    The control plane goes to a node of the `control_plane` role, instances to `stack_host`
    nodes (`roles`); RoleError if no node offers one of them. `tenants`: the tenants' quotas
    (runtime/tenancy.py; none by default); `client_lease_s`: the multiplexer's client lease
    (how long a client may go without a route watch before its sessions are closed);
    `telemetry_retention_hours`: the hours of Parquet telemetry kept (None: all)."""
    r: Any = ray
    roles.check(r.cluster_resources(), ("control_plane", "stack_host"))
    im_name = MULTIPLEXER_NAME + suffix
    im = create_multiplexer(
        im_name,
        namespace=namespace,
        resources=roles.request("control_plane"),
        tenants=tenants,
        client_lease_s=CLIENT_LEASE_S if client_lease_s is None else client_lease_s,
    )
    ray.get(im.stats.remote())  # created and answering
    vpsm = create_vpsm(
        plans,
        multiplexer_name=im_name,
        namespace=namespace,
        telemetry_root=telemetry_root,
        interval_s=interval_s,
        name=VPSM_NAME + suffix,
        forecaster_app=forecaster_app,
        resources=roles.request("control_plane"),
        instance_resources=roles.request("stack_host"),
        telemetry_retention_hours=telemetry_retention_hours,
    )
    ray.get(vpsm.start.remote(run_loop))
    return Deployment(im, vpsm, namespace, im_name)


def find_deployment(
    namespace: str = NAMESPACE, multiplexer: str = MULTIPLEXER_NAME, vpsm: str = VPSM_NAME
) -> tuple[Any, Any]:
    """The running deployment's multiplexer and VPSM (named actors); LookupError saying what to
    run when there is none. A driver not yet connected joins the current cluster (inside `ray
    job submit`, the job's)."""
    if not ray.is_initialized():
        ray.init(namespace=namespace)
    try:
        return ray.get_actor(multiplexer, namespace=namespace), ray.get_actor(vpsm, namespace=namespace)
    except ValueError:
        raise LookupError(f"no APSV deployment in namespace {namespace!r} (jobs/deploy.py or apsv up first)") from None

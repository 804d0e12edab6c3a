"""`apsv status`: what the control loop publishes, or what is collected from the actors."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from apsv.ops.access import _alive, _ray_connected, connect, disconnect, use_auth, use_loopback
from apsv.ops.base import (
    CALL_TIMEOUT_S,
    MULTIPLEXER_NAME,
    STATUS_MAX_AGE_S,
    VPSM_NAME,
    DeploymentStarting,
    OpsError,
)
from apsv.ops.state import read_starting, read_state, state_path


def _target(
    state: Mapping[str, Any] | None, address: str | None, namespace: str | None, token_path: str | None
) -> dict[str, Any]:
    """Where to look: the state file's deployment, with any of it overridden."""
    if state is None and address is None:
        starting = read_starting()
        if starting is not None:
            raise DeploymentStarting(starting)
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
    stats, placed = parts["stats"], parts["instance_loads"]
    own: dict[str, dict[str, Any]] = vs.get("loads", {})
    loads = [own[i] for i in vs["instances"] if i in own]
    return {
        "ok": True,
        "source": source,  # published by the control loop, or asked of the actors now
        "as_of": round(as_of if as_of is not None else time.time(), 3),
        "cluster": _cluster(t, cluster),
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
        "instances": _instances(vs, placed, own),
        "sessions": _sessions(stats, placed),
        "traffic": _traffic(parts["arrivals"], loads),
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


def _cluster(t: Mapping[str, Any], cluster: Mapping[str, Any]) -> dict[str, Any]:
    """Where the deployment runs, and the cluster's CPUs: "cpus" and "cpus_available" are Ray's
    logical CPUs (scheduling slots, which a node may declare at any number: the demo declares
    16 for its fractional actors), "host_cpus" the real cores of its hosts (None where Ray's
    figures cannot tell them)."""
    return {
        "address": t["address"],
        "namespace": t["namespace"],
        "owner": t.get("owner"),
        "dashboard_url": t.get("dashboard_url"),
        "cpus": cluster["resources"].get("CPU"),
        "cpus_available": cluster["available"].get("CPU"),
        "host_cpus": cluster.get("host_cpus"),  # (absent from a status an older VPSM published)
        "nodes": cluster["nodes"],
    }


def _instances(
    vs: Mapping[str, Any], placed: Mapping[str, Any], own: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Per protocol: its instance count, policy and bounds, and each instance's own figures."""
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
    for iid, info in sorted(vs["instances"].items()):
        member = _member(iid, info, placed.get(iid, {}), own.get(iid, {}))
        instances.setdefault(info["protocol"], {"count": 0, "members": []})["members"].append(member)
    return instances


def _member(iid: str, info: Mapping[str, Any], placement: Mapping[str, Any], load: Mapping[str, Any]) -> dict[str, Any]:
    """One instance: the VPSM's record of it, the multiplexer's placement, its own last load."""
    busy = load.get("busy_fraction")
    rate = load.get("msgs_per_s")
    return {
        "id": iid,
        "start_latency_s": round(float(info["start_latency_s"]), 4),
        "sessions": placement.get("sessions"),  # routed there by the multiplexer
        "pending_sessions": load.get("pending_sessions"),  # waiting there for their restore
        "frames": load.get("frames_in"),  # reached it, refused ones included
        "msgs_per_s": None if rate is None else round(float(rate), 1),
        "busy": None if busy is None else round(float(busy), 4),
        "queue_frames": load.get("queue_depth"),
        "clients": load.get("clients"),
        "refused": _refused(load),
        "errors": load.get("errors"),
        "quota_bytes": placement.get("quota_bytes"),  # each client's window to it
        "accepting": placement.get("accepting"),
        "alive": placement.get("alive"),
        "draining": info.get("draining"),
    }


def _sessions(stats: Mapping[str, Any], placed: Mapping[str, Any]) -> dict[str, Any]:
    """The multiplexer's sessions, per protocol by where it placed them."""
    by_protocol: dict[str, int] = {}
    for pl in placed.values():
        by_protocol[pl["protocol"]] = by_protocol.get(pl["protocol"], 0) + int(pl["sessions"])
    return {
        "total": stats["sessions"],
        "by_protocol": by_protocol,
        "states": stats["session_states"],
        "clients": stats["clients"],
        "moves": stats["moves"],
        "recoveries": stats["recoveries"],
        "sessions_recovered": stats["sessions_recovered"],
    }


def _traffic(offered: Mapping[str, Any], loads: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Frames the clients offered, and the instances' own counters summed."""
    return {
        "offered": offered,  # per protocol, as the clients report it
        "frames_in": int(sum(_num(x.get("frames_in")) for x in loads)),
        "refused": int(sum(_num(x.get(k)) for x in loads for k in REFUSED_KEYS)),
        **{
            k: int(sum(_num(x.get(k)) for x in loads))
            for k in ("duplicates", "foreign", "unknown_session", "bad_frames", "errors")
        },
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

"""The local Ray head `apsv up` starts, and how `apsv down` finds exactly its processes again.

`ray start --head` runs in a process session of its own (``setsid``): every daemon it starts,
and every worker those start, inherits that session id (Ray's workers make process groups of
their own, never sessions). The session id is recorded, so `down` stops the processes of that
session and nothing else - not another cluster, not an operator's Prometheus whose command line
happens to name the head's temp dir. Linux does not hand out a pid that is still some live
process's session id, so a recorded session cannot be mistaken for a newer one.

Loopback for real: Ray replaces ``--node-ip-address=127.0.0.1`` with the host's address unless
it runs single-node (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes Ray's node address
the loopback one); its listeners then bind 127.0.0.1 where Ray lets them. The ones it does not
are listed, with why, in `apsv/data/ray_listeners.json` (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from apsv.config import RaySection

# Ray's single-node switch: "0" keeps a node's address (and what binds to it) on loopback, and
# keeps a client from rewriting a loopback address to the host's (ray._private.services).
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class HeadError(RuntimeError):
    """The head cannot be started; the message says why and what to do."""


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


def is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"  # the ray of this interpreter's environment
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise HeadError("the `ray` command is not installed beside this Python (pip install 'ray[default]')")
    return found


def _not_me() -> set[int]:
    me = os.getpid()
    return {me, *(p.pid for p in psutil.Process(me).parents())}


def mentions(temp_dir: str) -> list[psutil.Process]:
    """Processes whose command line names `temp_dir` (Ray passes it to each daemon): whether a
    temp dir is in use - never what to stop."""
    mine = _not_me()
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if p.pid not in mine and any(temp_dir in part for part in (p.info["cmdline"] or [])):
                found.append(p)
    return found


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def cluster_processes(session: int | None, pids: list[dict[str, Any]] | None = None) -> list[psutil.Process]:
    """The processes of a head we started: those of its process `session`, the recorded ones
    (if still the same process) and all their descendants."""
    mine = _not_me()
    found: dict[int, psutil.Process] = {}
    if session is not None:
        for p in psutil.process_iter():
            if p.pid not in mine and _session_of(p.pid) == session:
                found[p.pid] = p
    for rec in pids or []:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
            p = psutil.Process(int(rec["pid"]))
            if abs(p.create_time() - float(rec["create_time"])) < 1.0 and p.pid not in mine:  # not a reused pid
                found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for c in p.children(recursive=True):
                if c.pid not in mine:
                    found[c.pid] = c
    return list(found.values())


def stop_processes(session: int | None, pids: list[dict[str, Any]] | None = None, timeout: float = 10.0) -> list[int]:
    """Stop a head's processes (SIGTERM, then SIGKILL after `timeout`); returns their pids.
    Only these: `ray stop` would stop every Ray cluster of this user on the machine."""
    procs = cluster_processes(session, pids)

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
    # A worker forked while the others stopped (the raylet restarting one) is of the session too.
    late = [p for p in cluster_processes(session) if p.pid not in {q.pid for q in procs}]
    for p in late:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(late, timeout=5)
    return sorted(p.pid for p in [*procs, *late])


@dataclass
class Head:
    address: str
    temp_dir: str
    token_path: str
    session: int  # the process session of every process of the head
    pids: list[dict[str, Any]] = field(default_factory=list)
    dashboard_url: str | None = None
    metrics_export_port: int | None = None
    client_server_port: int | None = None
    dashboard_agent_port: int | None = None


def _ports(rc: RaySection) -> dict[str, int]:
    """The head's ports: the configured ones (refused if taken), free ones for the others."""
    chosen = {}
    for what in ("port", "metrics_export_port", "client_server_port", "dashboard_agent_port"):
        p = getattr(rc, what)
        if p is not None and port_in_use(p, rc.node_ip_address):
            raise HeadError(
                f"ray.{what} {p} is in use (another deployment?): choose another port, or null for a free one"
            )
        chosen[what] = p if p is not None else free_port()
    if rc.include_dashboard and port_in_use(rc.dashboard_port, rc.dashboard_host):
        raise HeadError(
            f"ray.dashboard_port {rc.dashboard_port} is in use (another cluster's dashboard?): set another one "
            "(APSV__RAY__DASHBOARD_PORT=...) or ray.include_dashboard: false"
        )
    return chosen


def start_head(
    rc: RaySection,
    token_path: Path,
    env_overrides: dict[str, str],
    offered: dict[str, float] | None = None,
    timeout: float = 120.0,
) -> Head:
    """`ray start --head` in a process session of its own and a temp dir of its own, token auth
    on, offering the role resources `offered` (a local head plays every role) beside
    `ray.resources`."""
    if rc.temp_dir:
        tmp = rc.temp_dir
        if mentions(tmp):
            raise HeadError(f"ray.temp_dir {tmp} is in use by a running Ray cluster: choose another")
        Path(tmp).mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="apsv-ray-", dir="/tmp")  # short: socket paths are length-limited
    ports = _ports(rc)
    args = [
        ray_executable(),
        "start",
        "--head",
        f"--node-ip-address={rc.node_ip_address}",
        f"--port={ports['port']}",
        f"--temp-dir={tmp}",
        f"--ray-client-server-port={ports['client_server_port']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_port']}",
        f"--metrics-export-port={ports['metrics_export_port']}",
        f"--include-dashboard={str(rc.include_dashboard).lower()}",
        f"--dashboard-host={rc.dashboard_host}",
        f"--dashboard-port={rc.dashboard_port}",
        "--disable-usage-stats",
    ]
    if rc.num_cpus is not None:
        args.append(f"--num-cpus={rc.num_cpus}")
    if rc.object_store_memory is not None:
        args.append(f"--object-store-memory={rc.object_store_memory}")
    resources = {**(offered or {}), **rc.resources}
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(env_overrides)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if is_loopback(rc.node_ip_address):
        env[SINGLE_NODE_ENV] = "0"  # single-node: Ray keeps its address on loopback
    # Job entrypoints (`ray job submit -- python jobs/x.py`) run with the raylet's PATH: this
    # environment's python first, the one APSV is installed in.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = Path(tmp) / "apsv-ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    session = proc.pid
    address = f"{rc.node_ip_address}:{ports['port']}"
    try:
        rc_ = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_processes(session)
        raise HeadError(f"`ray start --head` did not finish in {timeout:.0f} s (logs: {tmp})") from None
    if rc_ != 0:
        stop_processes(session)
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
        raise HeadError(f"`ray start --head` failed (exit {rc_}; logs: {tmp}):\n{tail}")
    pids = []
    for p in cluster_processes(session):
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.append({"pid": p.pid, "create_time": p.create_time(), "name": p.name()})
    return Head(
        address=address,
        temp_dir=tmp,
        token_path=str(token_path),
        session=session,
        pids=pids,
        dashboard_url=f"http://{rc.dashboard_host}:{rc.dashboard_port}" if rc.include_dashboard else None,
        metrics_export_port=ports["metrics_export_port"],
        client_server_port=ports["client_server_port"],
        dashboard_agent_port=ports["dashboard_agent_port"],
    )

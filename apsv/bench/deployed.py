"""A real APSV deployment for a benchmark, as an operator makes one: `apsv up` from a
configuration (a local head in a process session of its own, a private state directory), this
process joined as a driver, and one agent actor holding the virtual routers' sessions. Every
process of the deployment is in the head's session, which is how a benchmark counts its cost
(this process, the harness, is not). `close` stops the agent and runs `apsv down`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def config(protocols: list[dict[str, Any]], forecaster_cpus: float = 0.5) -> dict[str, Any]:
    """`apsv up`'s configuration for `protocols`, the forecaster on, every port a free one (a
    benchmark must not collide with a deployment already running)."""
    from apsv.local_head import free_port

    ports = {"metrics_export_port": None, "client_server_port": None, "dashboard_agent_port": None}
    return {
        "ray": {
            "num_cpus": float(os.cpu_count() or 2),
            "object_store_memory": "512MiB",
            "dashboard_port": free_port(),
            **ports,
        },
        "protocols": protocols,
        "forecaster": {"enabled": True, "num_cpus": forecaster_cpus, "http_port": free_port()},
    }


def _apsv(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    cmd = [str(Path(sys.executable).parent / "apsv"), *args, "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"apsv {' '.join(args)} failed: {(out.stderr or out.stdout).strip()[-800:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class Deployed:
    def __init__(
        self, cfg: dict[str, Any], vrouters: list[dict[str, Any]], workdir: Path, job_name: str, **agent: Any
    ) -> None:
        import yaml

        from apsv import ops

        state_dir = workdir / "state"
        state_dir.mkdir(mode=0o700)
        path = workdir / "apsv.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self._env = {**os.environ, "APSV_STATE_DIR": str(state_dir)}
        self._env.pop("RAY_ADDRESS", None)
        self._old_state_dir = os.environ.get("APSV_STATE_DIR")
        self._conn: Any = None
        self.agent: Any = None
        t0 = time.monotonic()
        state = _apsv(["up", "--config", str(path)], self._env, timeout=300)
        self._session, self._pids = state.get("process_session"), state.get("pids")
        try:
            os.environ["APSV_STATE_DIR"] = str(state_dir)
            self._conn = ops.connected(job_name=job_name)
            target, self.vpsm, self.im = self._conn.__enter__()
            self.target: dict[str, Any] = target
            self.agent = self._start_agent(vrouters, target, agent)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - t0

    @staticmethod
    def _start_agent(vrouters: list[dict[str, Any]], target: dict[str, Any], extra: dict[str, Any]) -> Any:
        import ray

        from apsv.agent.actor import create_agent_actor
        from apsv.agent.config import parse_config

        cfg = parse_config({"tenant": 1, "vrouters": vrouters, "buffer_bytes": 4 << 20, **extra})
        agent = create_agent_actor(cfg, multiplexer_name=target["multiplexer"], namespace=target["namespace"])
        ray.get(agent.start.remote(), timeout=300)
        return agent

    def processes(self) -> list[psutil.Process]:
        from apsv.local_head import cluster_processes

        return cluster_processes(self._session, self._pids)

    def session_infos(self) -> list[dict[str, Any]]:
        """Every session's info from the instance holding it (no RIB digest: cheap to poll).
        Where each session is is asked every time: the VPSM moves sessions as it scales."""
        import ray

        routes = ray.get(self.im.routes_table.remote())
        handles = ray.get(self.vpsm.instance_handles.remote())
        refs = [handles[i].session_infos.remote([tuple(k) for k in ks], False) for i, ks in routes.items()]
        return [i for got in ray.get(refs) for i in got.values() if i is not None]

    def instances(self) -> int:
        import ray

        return len(ray.get(self.vpsm.instance_handles.remote()))

    def close(self) -> None:
        import ray

        try:
            if self.agent is not None:
                with contextlib.suppress(Exception):
                    ray.get(self.agent.stop.remote(), timeout=60)
                self.agent = None
            if self._conn is not None:
                self._conn.__exit__(None, None, None)
                self._conn = None
        finally:
            with contextlib.suppress(Exception):
                _apsv(["down"], self._env, timeout=120)
            if self._old_state_dir is None:
                os.environ.pop("APSV_STATE_DIR", None)
            else:
                os.environ["APSV_STATE_DIR"] = self._old_state_dir

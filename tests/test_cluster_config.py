"""cluster.yaml and cluster-onprem.yaml: Ray's own validation, security defaults, and a local
cluster started with the head's and a worker's `ray start` options (`ray up` needs SSH)."""

from __future__ import annotations

import copy
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from apsv import local_head

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_validates_the_cluster_config(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load(name))))
    bad = load(name)
    bad["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("name", CONFIGS)
def test_security_defaults(name: str) -> None:
    cfg = load(name)
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "disable" not in (head + workers).lower()
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for perm in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm.get("IpRanges", []))


def test_custom_resources_name_the_roles() -> None:
    aws = load("cluster.yaml")
    resources = {k: v.get("resources", {}) for k, v in aws["available_node_types"].items()}
    assert {"stack_host", "vrouter_host", "control_plane"} <= {r for rs in resources.values() for r in rs}
    onprem = " ".join(load("cluster-onprem.yaml")["worker_start_ray_commands"])
    assert '"stack_host": 1' in onprem and '"vrouter_host": 1' in onprem


def _ray_start_args(command: str) -> list[str]:
    """The `ray start` options of a start command (without the autoscaler's bootstrap file)."""
    words = shlex.split(command)
    i = words.index("start")
    return [w for w in words[i + 1 :] if not w.startswith("--autoscaling-config") and not w.startswith("--address")]


@pytest.mark.slow
def test_equivalent_local_cluster_with_ray_start(tmp_path: Path) -> None:
    """The on-prem head and worker options, on loopback, with token auth on."""
    cfg = load("cluster-onprem.yaml")
    head = _ray_start_args(cfg["head_start_ray_commands"][-1])
    worker = _ray_start_args(cfg["worker_start_ray_commands"][-1])
    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp = tempfile.mkdtemp(prefix="apsv-c-", dir="/tmp")  # Ray's socket paths are length-limited
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--num-cpus=1", "--disable-usage-stats"]
    head = [a for a in head if not a.startswith("--port")] + [f"--port={port}", "--include-dashboard=false"]
    sessions: list[int] = []  # each `ray start` in a process session of its own: stopped whole

    def ray_start(*args: str) -> None:
        p = subprocess.Popen([ray_bin, "start", *args], env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        sessions.append(p.pid)
        assert p.wait(timeout=120) == 0, args

    try:
        ray_start(*head, *common)
        ray_start(f"--address=127.0.0.1:{port}", *worker, *common)
        probe = (
            "import json, ray, time\n"
            f"ray.init(address='127.0.0.1:{port}')\n"
            "for _ in range(60):\n"
            "    r = ray.cluster_resources()\n"
            "    if r.get('stack_host'): break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps(r))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True, timeout=120
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["control_plane"] == 1 and res["stack_host"] == 1 and res["vrouter_host"] == 1
        # without the token the cluster refuses the driver
        bad = {**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")}
        (tmp_path / "wrong").write_text(secrets.token_hex(32))
        refused = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}'); print(ray.cluster_resources())"],
            env=bad,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode != 0
    finally:
        for session in sessions:  # every process each `ray start` left, Ray's client server included
            local_head.stop_processes(session)
        escaped = local_head.mentions(tmp)  # a process that left its session: killed, and a failure
        for p in escaped:
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not escaped, [p.pid for p in escaped]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

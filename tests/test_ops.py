"""`apsv up | status | replay | down` as an operator runs them: separate processes, a local Ray head
of their own (token auth on), a state file in a temp dir - and nothing of ours left afterwards."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from apsv import ops
from tests.conftest import manifest, manifest_counts

SAMPLE = "mrt/libbgpstream-test/ris.rrc06.updates.1427846400.gz"  # 2 peers, real RIPE RIS updates


def apsv(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "apsv"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from apsv.cli import main; main()"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def as_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The command's stdout is exactly one JSON object (progress and logs go to stderr)."""
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def clean_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APSV__", "RAY_"))}
    env.pop("APSV_CONFIG", None)
    env["APSV_STATE_DIR"] = str(state)
    return env


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("APSV_STATE_DIR", str(d))
    return d


# ------------------------------------------------------------------------------------------------
# Without a cluster


def test_state_file_round_trip(state_dir: Path) -> None:
    assert ops.read_state() is None
    path = ops.write_state({"address": "127.0.0.1:1234", "owner": "apsv demo", "owner_pid": os.getpid()})
    assert path == state_dir / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    st = ops.read_state()
    assert st is not None
    assert st["address"] == "127.0.0.1:1234" and st["namespace"] == "apsv" and st["vpsm"] == "apsv-vpsm"
    assert st["version"] == ops.STATE_VERSION and st["auth_mode"] == "token"
    ops.clear_state()
    assert ops.read_state() is None
    with pytest.raises(ValueError, match="address"):
        ops.write_state({"namespace": "x"})
    path.write_text("{not json")
    with pytest.raises(ops.OpsError, match="unreadable state file"):
        ops.read_state()


def test_a_dead_owner_leaves_a_stale_state(state_dir: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    ops.write_state({"address": "127.0.0.1:1", "owner": "apsv demo", "owner_pid": p.pid})
    with pytest.raises(ops.OpsError, match="is gone"):
        ops.status()
    ops.write_state({"address": "127.0.0.1:1", "owner": "apsv demo", "owner_pid": os.getpid()})
    with pytest.raises(ops.OpsError, match="belongs to a running apsv demo"):
        ops.down()  # the demo stops its own deployment


def test_commands_without_a_deployment(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "state")
    r = apsv("status", "--json", env=env)
    assert r.returncode == 1
    assert as_json(r) == {
        "ok": False,
        "error": f"no deployment recorded in {tmp_path / 'state' / 'state.json'}: `apsv up` first, or give --address",
    }
    r = apsv("down", env=env)
    assert r.returncode == 1 and "no deployment recorded" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("protocols:\n  - protocol: bgp\n    max_instances: 0\n")
    r = apsv("up", "--config", str(bad), "--json", env=env)
    assert r.returncode == 2
    assert as_json(r)["error"] == f"{bad}: protocols[0].max_instances: Input should be greater than or equal to 1"


class _Method:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def remote(self) -> Any:
        return self.answer  # `ray.get` is the identity below


class _Actor:
    def __init__(self, **answers: Any) -> None:
        for name, answer in answers.items():
            setattr(self, name, _Method(answer))


def test_status_reads_the_instances_own_counters(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """Traffic figures are the instances' own (the VPSM's last loads), placement the multiplexer's;
    an instance that has not reported yet shows nothing rather than zeros."""
    import ray

    from apsv.cli.ops import _render_status

    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.5})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    counters = {"departed": 3, "stale": 2, "out_of_order": 1, "duplicates": 4, "foreign": 5}
    counters |= {"unknown_session": 6, "bad_frames": 7, "errors": 8, "clients": 2, "pending_sessions": 0}
    vpsm = _Actor(
        status={
            "protocols": {
                "bgp": {"instances": 2, "policy": "reactive", "backend": "process", "min": 1, "max": 4}
                | {"start_latency_s": 0.41}
            },
            "instances": {
                "bgp-1": {"protocol": "bgp", "start_latency_s": 0.4, "draining": False},
                "bgp-2": {"protocol": "bgp", "start_latency_s": 0.42, "draining": True},
            },
            "loads": {
                "bgp-1": counters
                | {"sessions": 5, "frames_in": 1000, "msgs_per_s": 250.0, "busy_fraction": 0.5, "queue_depth": 40}
                | {"accepting": True}
            },  # bgp-2 has not reported yet
            "restarts": 1,
            "steps": 12,
            "events": [{"ts": 1.0, "event": "instantiate", "instance": "bgp-2", "start_latency_s": 0.42}],
            "forecasts": {"bgp": {"p50": [1.0, 2.0], "p90": [3.0, 4.0]}},
            "forecast_errors": 0,
        }
    )
    place = {"protocol": "bgp", "busy": 0.5, "endpoint": "", "alive": True}
    im = _Actor(
        stats={"sessions": 6, "session_states": {"live": 6}, "clients": 2, "moves": 3, "recoveries": 0}
        | {"sessions_recovered": 0, "restarts": 0},
        instance_loads={
            "bgp-1": place | {"sessions": 5, "quota_bytes": 4 << 20, "accepting": True},
            "bgp-2": place | {"sessions": 1, "quota_bytes": 4 << 20, "accepting": False},
        },
        arrivals={"bgp": 990},
    )
    t = {"address": "127.0.0.1:1", "namespace": "apsv", "multiplexer": "apsv-multiplexer", "vpsm": "apsv-vpsm"}
    st = ops.collect_status(t, vpsm, im)
    json.dumps(st)
    assert st["traffic"] == {
        "offered": {"bgp": 990},
        "frames_in": 1000,
        "refused": 6,
        "duplicates": 4,
        "foreign": 5,
        "unknown_session": 6,
        "bad_frames": 7,
        "errors": 8,
    }
    one, two = st["instances"]["bgp"]["members"]
    assert (one["id"], one["sessions"], one["frames"], one["busy"], one["queue_frames"], one["refused"]) == (
        "bgp-1",
        5,
        1000,
        0.5,
        40,
        6,
    )
    assert (two["sessions"], two["frames"], two["busy"], two["refused"], two["draining"]) == (1, None, None, None, True)
    assert st["sessions"] == {
        "total": 6,
        "by_protocol": {"bgp": 6},
        "states": {"live": 6},
        "clients": 2,
        "moves": 3,
        "recoveries": 0,
        "sessions_recovered": 0,
    }
    assert st["buffer_pool"]["quota_bytes"] == 8 << 20 and st["buffer_pool"]["queue_frames"] == 40
    assert st["deployment"]["vpsm_restarts"] == 1 and st["vpsm_steps"] == 12
    _render_status(st)
    out = capsys.readouterr().out
    assert "bgp-1" in out and "draining" in out and "frames offered by clients: bgp 990" in out


# ------------------------------------------------------------------------------------------------
# The operator's round trip


def ours(temp_dir: str, pids: list[dict[str, Any]]) -> list[int]:
    """Live processes of the cluster `apsv up` started (by temp dir or recorded pid)."""
    return [p.pid for p in ops.cluster_processes(temp_dir, pids)]


@pytest.mark.slow
@pytest.mark.ray
def test_up_status_replay_down(tmp_path: Path, data_dir: Path) -> None:
    env = clean_env(tmp_path / "state")
    config = tmp_path / "apsv.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ray": {"num_cpus": 2, "include_dashboard": False, "object_store_memory": "128MiB"},
                "protocols": [
                    {
                        "protocol": "bgp",
                        "min_instances": 1,
                        "max_instances": 2,
                        "policy": "reactive",
                        "allocation": {"cpu": 0.5, "memory": "256MiB", "buffer_quota": "4MiB"},
                    }
                ],
                "vpsm": {"interval_s": 0.5},
            }
        )
    )
    t0 = time.monotonic()
    up = apsv("up", "--config", str(config), "--json", env=env)
    state: dict[str, Any] = {}
    try:
        assert up.returncode == 0, up.stderr
        state = as_json(up)
        assert state["ok"] and state["started_head"] and state["address"].startswith("127.0.0.1:")
        token = Path(state["token_path"])
        assert token.parent == tmp_path / "state" and stat.S_IMODE(token.stat().st_mode) == 0o600
        assert ours(state["temp_dir"], state["pids"]), "the head's processes run"
        recorded = json.loads((tmp_path / "state" / "state.json").read_text())
        assert recorded["address"] == state["address"] and recorded["vpsm"] == "apsv-vpsm"

        again = apsv("up", "--config", str(config), "--json", env=env)
        assert again.returncode == 1 and "already recorded" in as_json(again)["error"]

        st = apsv("status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        s = as_json(st)
        bgp = s["instances"]["bgp"]
        assert bgp["count"] == 1 and bgp["policy"] == "reactive" and (bgp["min"], bgp["max"]) == (1, 2)
        assert [m["id"] for m in bgp["members"]] == ["bgp-1"] and bgp["members"][0]["alive"]
        assert bgp["members"][0]["accepting"] and not bgp["members"][0]["draining"]
        assert bgp["start_latency_s"] > 0
        assert s["sessions"]["total"] == 0 and s["buffer_pool"]["quota_bytes"] == 4 << 20
        assert {"instances", "sessions", "traffic", "forecasts", "buffer_pool", "events"} <= set(s)
        assert s["deployment"]["multiplexer_restarts"] == s["deployment"]["vpsm_restarts"] == 0

        # 6 sessions of 3 virtual routers over the file's 2 recorded peers: 3 x its UPDATEs
        updates = manifest_counts(manifest()[SAMPLE])["UPDATE"]
        rp = apsv("replay", str(data_dir / SAMPLE), "--sessions", "6", "--vrouters", "3", "--verify", "--json", env=env)
        assert rp.returncode == 0, rp.stderr
        r = as_json(rp)
        assert r["recorded_peers"] == 2 and r["sessions"] == 6 and r["vrouters"] == 3
        assert r["frames"] == 3 * updates
        assert r["verified"] and r["problems"] == []  # each frame applied once, in order, the same RIB
        assert r["seconds"] > 0 and r["frames_per_s"] > 0

        # The instances' counters as of the VPSM's last control step: wait for one after the replay.
        # Each frame reached an instance once, plus those it refused (to be re-sent) or held for a
        # restore - none of which the verification above found applied twice.
        sent = 3 * updates
        deadline = time.monotonic() + 20
        while True:
            after = as_json(apsv("status", "--json", env=env))
            tr = after["traffic"]
            applied_or_held = tr["frames_in"] - tr["refused"] - tr["duplicates"] - tr["foreign"] - tr["unknown_session"]
            if applied_or_held >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert tr["offered"] == {"bgp": sent}  # as the replay's client reported them
        assert applied_or_held >= sent and tr["frames_in"] >= sent
        assert tr["bad_frames"] == 0 and tr["foreign"] == 0
        assert sum(m["frames"] for m in after["instances"]["bgp"]["members"]) == tr["frames_in"]
        assert after["sessions"]["total"] == 0  # the replay closed its sessions

        dn = apsv("down", "--json", env=env)
        assert dn.returncode == 0, dn.stderr
        d = as_json(dn)
        assert d["ok"] and set(d["actors_killed"]) == {"apsv-vpsm", "apsv-multiplexer"}
        assert d["instances_destroyed"] == 1 and d["stopped_pids"]
        assert ours(state["temp_dir"], state["pids"]) == [], "no Ray process of ours is left"
        assert not Path(state["temp_dir"]).exists()
        assert not (tmp_path / "state" / "state.json").exists()
        assert time.monotonic() - t0 < 90
    finally:
        if state.get("temp_dir"):  # whatever failed above, leave nothing running
            ops.stop_processes(state["temp_dir"], state.get("pids"))


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_up_leaves_nothing_running(tmp_path: Path) -> None:
    """A head too small for the minimum instances: refused with the reason, the head stopped."""
    env = clean_env(tmp_path / "state")
    temp_dir = tempfile.mkdtemp(prefix="apsv-o-", dir="/tmp")  # Ray's socket paths are length-limited
    config = tmp_path / "apsv.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ray": {"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir},
                "protocols": [{"protocol": "bgp", "min_instances": 3, "max_instances": 3}],
            }
        )
    )
    try:
        r = apsv("up", "--config", str(config), "--json", env=env)
        assert r.returncode == 1
        assert as_json(r)["error"].startswith("the minimum instances (and forecaster) need 1.5 CPUs, the head has 1")
        assert not (tmp_path / "state" / "state.json").exists()
        assert list(Path(temp_dir).glob("session_*")), "the head did start"
        assert ours(temp_dir, []) == [], "and was stopped"
    finally:
        ops.stop_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

"""`apsv up | status | replay | down` as an operator runs them: separate processes, a local Ray head
of their own (token auth on), a state file in a temp dir - and nothing of ours left afterwards."""

from __future__ import annotations

import contextlib
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

from apsv import local_head, ops
from tests.conftest import manifest, manifest_counts

# Ports Ray picks (free ones) instead of the stable defaults: a deployment already running on
# this machine keeps its own.
QUOTA = {"buffer_quota": "4MiB"}
FREE_PORTS = {"metrics_export_port": None, "client_server_port": None, "dashboard_agent_port": None}
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


def test_status_reads_the_instances_own_counters(capsys: Any) -> None:
    """Traffic figures are the instances' own (the VPSM's last loads), placement the multiplexer's;
    an instance that has not reported yet shows nothing rather than zeros; desired, running and
    pending instances and the unplaceable demand are shown."""
    from apsv.cli.ops import _instances, _render_status

    counters = {"departed": 3, "stale": 2, "out_of_order": 1, "duplicates": 4, "foreign": 5}
    counters |= {"unknown_session": 6, "bad_frames": 7, "errors": 8, "clients": 2, "pending_sessions": 0}
    vs = {
        "protocols": {
            "bgp": {"instances": 2, "policy": "reactive", "backend": "process", "min": 1, "max": 4}
            | {"start_latency_s": 0.41, "desired": 3, "running": 1, "pending": 1, "draining": 1}
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
        "warnings": [
            {"cause": "cpu", "protocol": "bgp", "instance": "bgp-3", "waiting_s": 12.0}
            | {"message": "bgp-3 cannot be placed: it needs 0.5 CPUs, the cluster has 0.25 CPUs free"}
        ],
    }
    place = {"protocol": "bgp", "busy": 0.5, "endpoint": "", "alive": True}
    parts = {
        "stats": {"sessions": 6, "session_states": {"live": 6}, "clients": 2, "moves": 3, "recoveries": 0}
        | {"sessions_recovered": 0, "restarts": 0},
        "instance_loads": {
            "bgp-1": place | {"sessions": 5, "quota_bytes": 4 << 20, "accepting": True},
            "bgp-2": place | {"sessions": 1, "quota_bytes": 4 << 20, "accepting": False},
        },
        "arrivals": {"bgp": 990},
    }
    cluster = {"resources": {"CPU": 16.0}, "available": {"CPU": 0.25}, "nodes": 1, "host_cpus": 2}
    t = {"address": "127.0.0.1:1", "namespace": "apsv", "multiplexer": "apsv-multiplexer", "vpsm": "apsv-vpsm"}
    t |= {"dashboard_url": "http://127.0.0.1:8265"}
    st = ops.build_status(t, vs, parts, cluster, "published", as_of=100.0)
    json.dumps(st)
    assert st["source"] == "published" and st["as_of"] == 100.0
    # Ray's logical CPUs (scheduling slots) and the host's real cores, side by side
    assert (st["cluster"]["cpus"], st["cluster"]["cpus_available"], st["cluster"]["host_cpus"]) == (16.0, 0.25, 2)
    assert st["protocols"]["bgp"] == {"desired": 3, "running": 1, "pending": 1, "draining": 1} | {
        "policy": "reactive",
        "min": 1,
        "max": 4,
    }
    assert [w["cause"] for w in st["warnings"]] == ["cpu"]
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
    assert "cpus 2 (16 Ray slots, 0.25 free), dashboard http://127.0.0.1:8265" in " ".join(out.split())
    assert "bgp-3 cannot be placed" in " ".join(out.split())
    assert _instances(st["protocols"]["bgp"], 2) == ("1 (+1 draining)", "1", "3")  # the table's cells


def test_host_cpus_are_known_for_this_host_only(capsys: Any) -> None:
    """The real cores: this host's where every node is on it (several nodes on one host count
    it once), else unknown (None) rather than a guess; a status without them (an older VPSM's)
    shows them as unknown."""
    from apsv.cli.ops import _cpus
    from apsv.ops.status import _cluster as cluster_section
    from apsv.runtime.vpsm.inspection import host_cpus

    def node(node_id: str, address: str, hostname: str = "h1") -> dict[str, Any]:
        return {"NodeID": node_id, "NodeManagerAddress": address, "NodeManagerHostname": hostname, "Alive": True}

    here = [node("a", "127.0.0.1"), node("b", "127.0.0.1")]
    assert host_cpus(here, "a", 2) == 2
    assert host_cpus([*here, node("c", "10.0.0.2", "h2")], "a", 2) is None  # its cores are not recorded
    assert host_cpus(here, "z", 2) is None  # this process on none of the nodes
    assert host_cpus(here, "a", None) is None  # os.cpu_count() could not tell
    cluster = {"resources": {"CPU": 16.0}, "available": {"CPU": 16.0}, "nodes": 3}  # no host_cpus
    c = cluster_section({"address": "x", "namespace": "apsv"}, cluster)
    assert c["host_cpus"] is None and c["cpus"] == 16.0
    assert _cpus(c) == "host cpus unknown (16 Ray slots, 16 free)"


def test_starting_marker(state_dir: Path) -> None:
    """Private, this process's until the deployment is recorded; a marker whose process ended
    (or whose pid another process now has) is stale and goes."""
    import psutil

    assert ops.read_starting() is None
    path = ops.mark_starting("apsv demo")
    assert path == state_dir / "starting.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    starting = ops.read_starting()
    assert starting is not None and set(starting) == {"owner", "pid", "since"}
    assert starting["owner"] == "apsv demo" and starting["pid"] == os.getpid()
    assert time.time() - 60 < starting["since"] <= time.time()
    ops.clear_starting()
    assert not path.exists() and ops.read_starting() is None
    ops.clear_starting()  # (none: nothing to do)

    ops.mark_starting("apsv demo")
    marker = json.loads(path.read_text())
    ops.write_state({"address": "127.0.0.1:1", "owner": "apsv demo", "owner_pid": os.getpid()})
    assert not path.exists(), "a recorded deployment is no longer starting"

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(ended.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)  # until it has ended (a zombie: not reaped yet)
    path.write_text(json.dumps(marker | {"pid": ended.pid, "create_time": psutil.Process(ended.pid).create_time()}))
    assert ops.read_starting() is None and not path.exists()  # stale: its process ended
    ended.wait()
    path.write_text(json.dumps(marker | {"pid": ended.pid}))
    ops.clear_starting()
    assert path.exists(), "another process's marker is not this process's to clear"
    assert ops.read_starting() is None and not path.exists()  # stale: its process ended
    path.write_text(json.dumps(marker | {"create_time": marker["create_time"] - 3600}))
    assert ops.read_starting() is None and not path.exists()  # stale: the pid is another process's now
    path.write_text("{not json")
    assert ops.read_starting() is None and not path.exists()


def test_status_while_a_deployment_is_starting(state_dir: Path) -> None:
    """No deployment recorded yet, but a running process is starting one: `status` says so (one
    line; in JSON `starting` beside the error), exit status 1 as for no deployment at all."""
    ops.mark_starting("apsv demo")  # this process: running
    with pytest.raises(ops.DeploymentStarting, match=rf"^apsv demo is starting \(pid {os.getpid()}, since "):
        ops.status()
    env = clean_env(state_dir)
    r = apsv("status", "--json", env=env)
    assert r.returncode == 1
    doc = as_json(r)
    assert doc["ok"] is False and doc["starting"]["pid"] == os.getpid() and doc["starting"]["owner"] == "apsv demo"
    assert doc["error"].startswith(f"apsv demo is starting (pid {os.getpid()}, since ")
    r = apsv("status", env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert "apsv status: apsv demo is starting" in r.stderr and "not recorded yet" in r.stderr
    ops.clear_starting()
    r = apsv("status", "--json", env=env)
    assert r.returncode == 1 and as_json(r)["error"].startswith("no deployment recorded")


# ------------------------------------------------------------------------------------------------
# The operator's round trip


def small_head(tmp_path: Path, bgp: dict[str, Any], **sections: Any) -> Path:
    """A configuration for a 2-CPU local head (free ports: a deployment already running on this
    machine keeps its own) with one BGP protocol (`bgp` over a small allocation)."""
    protocol = {"protocol": "bgp", "min_instances": 1, "allocation": {"cpu": 0.5, "memory": "256MiB"}} | bgp
    config = tmp_path / "apsv.yaml"
    head = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": "128MiB", **FREE_PORTS}
    config.write_text(yaml.safe_dump({"ray": head, "protocols": [protocol], **sections}))
    return config


def ours(state: dict[str, Any]) -> list[int]:
    """Live processes of the cluster `apsv up` started (its process session, recorded pids)."""
    return [p.pid for p in local_head.cluster_processes(state["process_session"], state["pids"])]


@pytest.mark.slow
@pytest.mark.ray
def test_up_status_replay_down(tmp_path: Path, data_dir: Path) -> None:
    env = clean_env(tmp_path / "state")
    config = small_head(
        tmp_path,
        {
            "max_instances": 2,
            "policy": "reactive",
            "allocation": {"cpu": 0.5, "memory": "256MiB", "buffer_quota": "4MiB"},
        },
        vpsm={"interval_s": 0.5},
    )
    up = apsv("up", "--config", str(config), "--json", env=env)
    state: dict[str, Any] = {}
    try:
        assert up.returncode == 0, up.stderr
        state = as_json(up)
        assert state["ok"] and state["started_head"] and state["address"].startswith("127.0.0.1:")
        token = Path(state["token_path"])
        assert token.parent == tmp_path / "state" and stat.S_IMODE(token.stat().st_mode) == 0o600
        assert ours(state), "the head's processes run"
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
        assert s["cluster"]["host_cpus"] == os.cpu_count()  # one node, on this host

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
        assert ours(state) == [], "no Ray process of ours is left"
        assert not Path(state["temp_dir"]).exists()
        assert not (tmp_path / "state" / "state.json").exists()
    finally:
        if state.get("temp_dir"):  # whatever failed above, leave nothing running
            local_head.stop_processes(state.get("process_session"), state.get("pids"))


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
                "ray": {"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir, **FREE_PORTS},
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
        assert local_head.mentions(temp_dir) == [], "and was stopped"
    finally:
        for p in local_head.mentions(temp_dir):
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def listeners_of(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, bound address, port) of every listening TCP socket of `pids`."""
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.name(), c.laddr.ip, c.laddr.port))
    return out


def allowed_listener(name: str, ip: str) -> bool:
    """Loopback, or a listener Ray cannot bind elsewhere (apsv/data/ray_listeners.json)."""
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    if (mapped or address).is_loopback:
        return True
    allow = json.loads((Path(ops.__file__).parents[1] / "data" / "ray_listeners.json").read_text())["listeners"]
    return any(name.startswith(a["process"]) for a in allow)


@pytest.mark.slow
@pytest.mark.ray
def test_unplaceable_scale_up_is_reported_and_down_stops_exactly_the_deployment(tmp_path: Path) -> None:
    """A scale-up beyond the head's CPUs: `status` shows it pending, with the cause; `down` then
    takes seconds, stops every process of the deployment (by process tree) and nothing else."""
    env = clean_env(tmp_path / "state")
    config = small_head(
        tmp_path,
        {
            "max_instances": 4,
            "policy": "static",
            "policy_config": {"instances": 4},  # 4 x 0.75 CPU on 2 CPUs: two cannot be placed
            "allocation": {"cpu": 0.75, "memory": "256MiB"} | QUOTA,
        },
        vpsm={"interval_s": 0.5},
        forecaster={"enabled": False},
    )
    checked = apsv("config", str(config), "--json", env=env)
    assert checked.returncode == 0
    [w] = as_json(checked)["warnings"]
    assert w["cause"] == "cpu" and "needs 3 CPUs" in w["message"] and "the local head has 2 CPUs" in w["message"]

    up = apsv("up", "--config", str(config), "--json", env=env)
    state: dict[str, Any] = {}
    foreign = None
    try:
        assert up.returncode == 0, up.stderr
        state = as_json(up)
        assert [x["cause"] for x in state["warnings"]] == ["cpu"]
        # an operator's process that names the head's temp dir (as a Prometheus scraping Ray's
        # generated configuration does): not the deployment's
        foreign = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)", f"--config={state['temp_dir']}/prometheus.yml"]
        )
        deadline = time.monotonic() + 90
        while True:
            st = apsv("status", "--json", env=env)
            assert st.returncode == 0, st.stdout + st.stderr
            s = as_json(st)
            # each start is reported once it has waited its own start latency: the two are asked
            # for one after the other, so their warnings can appear one status apart
            if len(s["warnings"]) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert s["source"] == "published"  # read from the KV store: no driver, no job
        assert s["protocols"]["bgp"] | {"policy": None} == {
            "desired": 4,
            "running": 2,
            "pending": 2,
            "draining": 0,
            "policy": None,
            "min": 1,
            "max": 4,
        }
        assert sorted(w["instance"] for w in s["warnings"]) == ["bgp-3", "bgp-4"]
        assert all(w["cause"] == "cpu" and w["protocol"] == "bgp" and w["waiting_s"] > 0 for w in s["warnings"])
        pending_events = [e for e in s["events"] if e["event"] == "pending"]
        assert sorted(e["instance"] for e in pending_events) == ["bgp-3", "bgp-4"]
        assert [e["cause"] for e in pending_events] == ["cpu", "cpu"]

        # what listens: loopback, or a listener Ray cannot bind there (the documented allowlist)
        tree = set(ours(state))
        bound = listeners_of(tree)
        assert bound, "the head listens somewhere"
        assert [b for b in bound if not allowed_listener(b[0], b[1])] == []

        # pending instances do not hold `down` up (waiting for them would wait for ever): it
        # returns within the helper's generous timeout
        dn = apsv("down", "--json", env=env)
        assert dn.returncode == 0, dn.stderr
        import psutil

        left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == [], "every process of the deployment's tree is gone"
        gcs = state["address"]
        cmdlines = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
        assert ours(state) == []
        assert not [c for c in cmdlines if "ray.util.client.server" in c and gcs in c], "Ray's client server too"
        assert foreign.poll() is None, "the operator's process survives"
    finally:
        if foreign is not None:
            foreign.kill()
            foreign.wait()
        if state.get("process_session"):
            local_head.stop_processes(state["process_session"], state.get("pids"))
        if state.get("temp_dir"):
            shutil.rmtree(state["temp_dir"], ignore_errors=True)

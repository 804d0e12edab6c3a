"""The Ray jobs in jobs/, submitted with `ray job submit --working-dir .` to a local head started
with `ray start --head` - loopback, a temp dir of its own, token authentication on, the dashboard
(which takes job submissions) on a free loopback port: deploy, replay, dump a virtual router's
RIB, evaluate scaling policies - and a submission without the token refused."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mrtparse
import psutil
import pytest

from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.nlri import prefix_str
from apsv.bgp.session import BgpSession
from apsv.runtime.recorded_sessions import load_streams, plan_sessions
from apsv.runtime.roles import Roles
from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# What the jobs do not need: keeps the working-dir upload small (Ray honours .gitignore too).
EXCLUDES = [".git", "benchmarks", "tests", "docs"]
UPDATES = "mrt/bgpdump-testdata/updates.20100722.2015.gz"  # 14 recorded peers, IPv4 and IPv6
TRACE = "timeseries/cortez-internet-traffic/A1H.txt"
CONFIG = """\
protocols:
  - protocol: bgp
    min_instances: 1
    max_instances: 2
    policy: reactive
    allocation: {{cpu: 0.25, memory: 256MiB}}
vpsm:
  interval_s: 1.0
  telemetry_dir: {telemetry}
"""

# A job that reports whether the deployment's control-plane actors took up a predecessor's state.
FRESH = """\
import json, ray
ray.init(namespace="apsv")
vpsm, im = ray.get_actor("apsv-vpsm"), ray.get_actor("apsv-multiplexer")
status, stats = ray.get([vpsm.status.remote(), im.stats.remote()])
print(json.dumps({"vpsm_restarts": status["restarts"], "multiplexer_restarts": stats["restarts"],
                  "rebuilt_sessions": stats["rebuilt_sessions"]}))
"""


@pytest.fixture(scope="module")
def head() -> Iterator[dict[str, Any]]:
    tmp = tempfile.mkdtemp(prefix="apsv-j-", dir="/tmp")  # Ray's socket paths are length-limited
    token = Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        # A job's entrypoint runs with the raylet's PATH: this environment's python first.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    dashboard = _free_port()
    args = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        f"--temp-dir={tmp}",
        "--num-cpus=4",
        "--object-store-memory=200000000",
        # one node playing every role, as cluster.yaml's nodes declare them
        f"--resources={json.dumps(Roles().offered())}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        # every head defaults to the same ports for these: other clusters on this host hold them
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(args, env=env, check=True, capture_output=True, timeout=180)
        yield {"tmp": tmp, "env": env, "url": f"http://127.0.0.1:{dashboard}", "token": token}
    finally:
        _stop(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(temp_dir: str) -> None:
    """Stop this cluster's processes only (never `ray stop`): those naming its temp dir, and
    their descendants (Ray's workers and agents rename themselves: their command lines do not)."""
    me = os.getpid()
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != me and any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def submit(
    head: dict[str, Any], *entrypoint: str, env: dict[str, str] | None = None, expect_ok: bool = True
) -> tuple[int, str, Any]:
    """`ray job submit --working-dir <repo> -- python ...`: (exit status, output, the job's JSON).
    Retries while the dashboard's agent is not up yet (right after `ray start`)."""
    sid = f"apsv-test-{secrets.token_hex(4)}"
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        head["url"],
        "--submission-id",
        sid,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        "python",
        *entrypoint,
    ]
    deadline = time.monotonic() + 120
    while True:
        p = subprocess.run(cmd, env=env or head["env"], capture_output=True, text=True, timeout=600, check=False)
        out = p.stdout + p.stderr
        if "No available agent" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    doc = None
    for line in out.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
    if expect_ok:
        assert p.returncode == 0, out[-3000:]
        status = subprocess.run(
            [RAY, "job", "status", "--address", head["url"], sid],
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # the CLI's words for JobStatus.SUCCEEDED
        assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
        assert doc is not None, out[-3000:]
    return p.returncode, out, doc


def _reference_ribs(path: Path, sessions: int, vrouters: int) -> dict[tuple[int, ...], set[str]]:
    """Each planned session's Loc-RIB prefixes, from an in-process replay of its stream."""
    plan = plan_sessions(load_streams([path]), sessions, vrouters)
    out: dict[tuple[int, ...], set[str]] = {}
    for s in plan:
        cfg = dict(s.config())
        opts = cfg.pop("replay")
        session = BgpSession.established(BgpSessionConfig.model_validate(cfg), asn4=bool(opts["asn4"]))
        for msg, ts in zip(s.stream.messages, s.stream.times, strict=True):
            session.data_received(msg, ts)
        out[s.key] = {prefix_str(p, fam[0]) for fam, loc in session.loc_rib.items() for p in loc.best}
    return out


def _dump_prefixes(path: Path) -> tuple[list[dict[str, Any]], dict[int, set[str]]]:
    """mrtparse's reading of a TABLE_DUMP_V2 file: its peers, and each peer's prefixes."""
    peers: list[dict[str, Any]] = []
    by_peer: dict[int, set[str]] = {}
    for m in mrtparse.Reader(str(path)):
        d = m.data
        assert not d.get("err"), d
        if "peer_entries" in d:
            peers = d["peer_entries"]
        for e in d.get("rib_entries", []):
            by_peer.setdefault(e["peer_index"], set()).add(f"{d['prefix']}/{d['length']}")
    return peers, by_peer


@pytest.mark.slow
@pytest.mark.ray
def test_jobs_on_a_token_protected_cluster(head: dict[str, Any], data_dir: Path) -> None:
    tmp = Path(head["tmp"])
    # The entrypoint's python is this environment's, and apsv comes from the uploaded working dir.
    _rc, out, doc = submit(
        head,
        "-c",
        "import json, sys, apsv; print(json.dumps({'python': sys.executable, 'apsv': apsv.__file__}))",
    )
    assert Path(doc["python"]).parent == Path(sys.executable).parent
    assert "working_dir_files" in doc["apsv"]

    # deploy: the multiplexer and the VPSM outlive the job...
    config = tmp / "apsv.yaml"
    config.write_text(CONFIG.format(telemetry=tmp / "telemetry"))
    _rc, _out, dep = submit(head, "jobs/deploy.py", "--config", str(config))
    assert dep["instances"] == {"bgp": 1} and dep["config"] == str(config)
    # ...so a second deploy finds them running, and refuses.
    rc, out, _ = submit(head, "jobs/deploy.py", "--config", str(config), expect_ok=False)
    assert rc != 0 and "already running" in out

    # replay: every recorded peer's UPDATEs as 8 sessions of 2 virtual routers, checked exactly.
    updates = data_dir / UPDATES
    _rc, _out, rep = submit(head, "jobs/replay.py", str(updates), "--sessions", "8", "--vrouters", "2", "--verify")
    assert rep["verified"] is True and rep["sessions"] == 8 and rep["kept_open"] is True
    reference = _reference_ribs(updates, 8, 2)
    assert rep["frames"] == sum(k[4] for k in rep["session_keys"])

    # rib_dump: the whole virtual router 1/1 (one peer per session), then one session of it.
    out_all = tmp / "vr-1-1.mrt.gz"
    _rc, _out, dump = submit(head, "jobs/rib_dump.py", "--vrouter", "1/1", "--out", str(out_all))
    mine = {k: v for k, v in reference.items() if k[:2] == (1, 1)}
    assert len(dump["sessions"]) == len(mine) == 4
    peers, by_peer = _dump_prefixes(out_all)
    index = {f"{p['peer_ip']}/AS{p['peer_as']}": i for i, p in enumerate(peers)}
    assert len(index) == len(peers) == 4
    for s in dump["sessions"]:
        key = (1, 1, 1, s["session"])
        assert by_peer.get(index[s["peer"]], set()) == mine[key], key  # its Loc-RIB, prefix for prefix
    assert dump["entries"] == sum(len(v) for v in mine.values())

    out_one = tmp / "vr-1-1-s2.mrt"
    _rc, _out, one = submit(head, "jobs/rib_dump.py", "--vrouter", "1/1", "--session", "2", "--out", str(out_one))
    peers, by_peer = _dump_prefixes(out_one)
    assert len(peers) == 1 and [s["session"] for s in one["sessions"]] == [2]
    assert by_peer[0] == mine[(1, 1, 1, 2)] and one["prefixes"] == len(mine[(1, 1, 1, 2)])

    # evaluate: the simulator on a real trace, a Ray task; JSON and plots written by the driver.
    result = tmp / "eval" / "result.json"
    _rc, _out, ev = submit(
        head,
        "jobs/evaluate.py",
        str(data_dir / TRACE),
        "--policies",
        "static,reactive,predictive",
        "--forecaster-steps",
        "20",
        "--out",
        str(result),
    )
    assert set(ev["policies"]) == {"static", "reactive", "predictive"}
    assert json.loads(result.read_text())["policies"] == ev["policies"]
    assert ev["plots"] and all(Path(p).is_file() for p in ev["plots"])

    # --replace: the running deployment (and its sessions) destroyed, a fresh one in its place.
    _rc, _out, again = submit(head, "jobs/deploy.py", "--config", str(config), "--replace")
    assert again["replaced"] is True and again["instances"] == {"bgp": 1}
    # ...which took up nothing the old one kept in Ray's KV store (its plan, its control state).
    _rc, _out, fresh = submit(head, "-c", FRESH)
    assert fresh == {"vpsm_restarts": 0, "multiplexer_restarts": 0, "rebuilt_sessions": 0}, fresh
    rc, out, _ = submit(head, "jobs/rib_dump.py", "--vrouter", "1/1", "--out", str(tmp / "gone.mrt"), expect_ok=False)
    assert rc != 0 and "has no BGP session" in out

    # Without the cluster's token, or with another one, the dashboard refuses the submission.
    wrong = tmp / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    for env in (
        {**head["env"], "RAY_AUTH_TOKEN_PATH": str(wrong)},
        {
            **{k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")},
            "HOME": str(tmp),  # no ~/.ray/auth_token to fall back on
        },
    ):
        rc, out, _ = submit(head, "-c", "print('never runs')", env=env, expect_ok=False)
        assert rc != 0 and "never runs" not in out
        assert "Authentication" in out or "token" in out.lower(), out[-2000:]


class _Remote:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def remote(self, *args: Any) -> Any:
        answer = self.answer
        return lambda: answer(*args) if callable(answer) else answer  # run by the fake ray.get


def test_rib_dump_follows_a_session_that_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session leaves the instance it was routed to before that instance is asked: it is
    looked up again and snapshot where it went."""
    import ray

    from jobs import rib_dump

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref())
    monkeypatch.setattr(time, "sleep", lambda s: None)  # between its looks
    key = (1, 1, 1, 0)
    routes = iter(["bgp-1", "bgp-2"])

    def gone(k: Any) -> Any:
        raise KeyError(k)  # what an instance says of a session it no longer holds

    im = SimpleNamespace(route_of=_Remote(lambda k: next(routes)))
    handles = {"bgp-1": SimpleNamespace(snapshot=_Remote(gone))}
    handles_later = {**handles, "bgp-2": SimpleNamespace(snapshot=_Remote(lambda k: (b"blob", None)))}
    calls = iter([handles, handles_later])  # bgp-2 started after the first look
    vpsm = SimpleNamespace(instance_handles=_Remote(lambda: next(calls)))
    assert rib_dump.snapshot_sessions(im, vpsm, [key]) == {key: b"blob"}

"""A real Prometheus (Debian's) against a live `apsv up` deployment with traffic and a scale-up:
every expression of the Grafana dashboard must return series through Prometheus' HTTP API, and
every per-instance panel must keep the instances apart.

Prometheus runs with the configuration `apsv up` wrote (`<state dir>/prometheus/prometheus.yml`,
file-based discovery of each node's metrics endpoint), so the labels are what a scrape makes of
them: `instance` and `job` are the target's, and a metric label of the same name would be
renamed `exported_instance` and merge every stack instance into one series per target.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from apsv import local_head
from tests.test_ops import FREE_PORTS, allowed_listener, apsv, as_json, clean_env, listeners_of

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "grafana" / "apsv-dashboard.json"
SAMPLE = "mrt/libbgpstream-test/ris.rrc06.updates.1427846400.gz"  # 2 recorded peers
# Grafana's template variables as the dashboard's defaults resolve them
VARIABLES = {"$protocol": ".*", "$top": "10", "$__rate_interval": "1m"}

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("Debian's prometheus is not installed (scripts/install-peers.sh installs it); not skipped")
    return found


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables resolved) of every target of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for k, v in VARIABLES.items():
                expr = expr.replace(k, v)
            out.append((panel["title"], expr))
    return out


class Traffic(threading.Thread):
    """`apsv replay` over and over (120 sessions of 110 virtual routers: more than a client
    labels, so some fold into "other") until stopped."""

    def __init__(self, env: dict[str, str], path: Path) -> None:
        super().__init__(daemon=True)
        self.env, self.path = env, path
        self.stop = threading.Event()
        self.runs: list[dict[str, Any]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            r = apsv("replay", str(self.path), "--sessions", "120", "--vrouters", "110", "--json", env=self.env)
            if r.returncode == 0:
                self.runs.append(as_json(r))
            else:
                self.failures.append(r.stdout + r.stderr)
                time.sleep(1)


def test_prometheus_draws_every_panel(tmp_path: Path, data_dir: Path) -> None:
    prom_bin = prometheus_binary()
    state_dir = tmp_path / "state"
    env = clean_env(state_dir)
    config = tmp_path / "apsv.yaml"
    ports = {**FREE_PORTS, "metrics_export_port": local_head.free_port()}
    config.write_text(
        yaml.safe_dump(
            {
                "ray": {"num_cpus": 2, "include_dashboard": False, "object_store_memory": "256MiB", **ports},
                "protocols": [
                    {
                        "protocol": "bgp",
                        "min_instances": 1,
                        "max_instances": 3,
                        "policy": "reactive",
                        # a replay offers thousands of UPDATEs a second: the reactive rule scales up
                        "capacity_per_instance": 500,
                        "policy_config": {"upscale_delay_s": 1, "downscale_delay_s": 600},
                        "allocation": {"cpu": 0.25, "memory": "256MiB", "buffer_quota": "4MiB"},
                    },
                    {
                        "protocol": "bfd",
                        "min_instances": 1,
                        "max_instances": 1,
                        "policy": "reactive",
                        "allocation": {"cpu": 0.25, "memory": "128MiB", "buffer_quota": "1MiB"},
                    },
                ],
                "vpsm": {"interval_s": 1.0},
                # the forecast panel needs the forecaster; seasonal naive until a model is promoted
                "forecaster": {"enabled": True, "num_cpus": 0, "registry": str(tmp_path / "models")},
            }
        )
    )
    up = apsv("up", "--config", str(config), "--json", env=env, timeout=300)
    state: dict[str, Any] = {}
    prom = traffic = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = as_json(up)
        prom_config = Path(state["prometheus_config"])
        assert prom_config == state_dir / "prometheus" / "prometheus.yml"
        targets = json.loads((state_dir / "prometheus" / "targets.json").read_text())
        assert targets[0]["targets"] == [f"127.0.0.1:{ports['metrics_export_port']}"]

        web = local_head.free_port()
        base = f"http://127.0.0.1:{web}"
        prom = subprocess.Popen(
            [
                prom_bin,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
        )
        traffic = Traffic(env, data_dir / SAMPLE)
        traffic.start()

        # The scale-up: the VPSM brings BGP to its maximum under the replays' load.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            st = as_json(apsv("status", "--json", env=env))
            if st.get("ok") and st["protocols"]["bgp"]["running"] == 3:
                break
            time.sleep(2)
        assert st["protocols"]["bgp"]["running"] == 3, (st, traffic.failures[-1:])
        assert st["protocols"]["bfd"]["running"] == 1
        running = sum(p["running"] for p in st["protocols"].values())  # 4 instances

        # What listens, the forecaster's Serve replica included: loopback or the documented allowlist.
        bound = listeners_of({p.pid for p in local_head.cluster_processes(state["process_session"], state["pids"])})
        assert [b for b in bound if not allowed_listener(b[0], b[1])] == []

        # Every expression returns series (each retried while the scrapes come in).
        pending = dict.fromkeys(expressions())
        answers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        deadline = time.monotonic() + 150
        while pending and time.monotonic() < deadline:
            for key in list(pending):
                got = query(base, key[1])
                if got:
                    answers[key] = got
                    del pending[key]
            time.sleep(3)
        assert not pending, f"expressions with no series: {list(pending)}; prometheus log: {tmp_path}/prometheus.log"
        assert traffic.runs, traffic.failures[-1:]

        # Per-instance panels keep the instances apart: as many series as instances run (at least).
        per_instance = {k: v for k, v in answers.items() if re.search(r"by \([^)]*instance", k[1])}
        assert len(per_instance) >= 5
        deadline = time.monotonic() + 60
        for (title, expr), first in per_instance.items():
            got = first
            while len(got) < running and time.monotonic() < deadline:
                time.sleep(3)
                got = query(base, expr)
            ids = {s["metric"].get("stack_instance") for s in got}
            assert len(got) >= running and len(ids) == len(got), (title, [s["metric"] for s in got])
        # the scrape's own labels: `instance` is the target, `job` the scrape job
        series = query(base, "ray_apsv_instance_sessions")
        assert {s["metric"]["instance"] for s in series} == {f"127.0.0.1:{ports['metrics_export_port']}"}
        assert {s["metric"]["job"] for s in series} == {"apsv"}
        assert not any("exported_instance" in s["metric"] for s in series)
        # counters are there before their first event: 0, not "no data"
        moves = query(base, 'ray_apsv_session_moves_total{reason="recovery"}')
        assert {s["metric"]["protocol"] for s in moves} == {"bgp", "bfd"}
        # the dashboard's protocol variable
        with urllib.request.urlopen(
            f"{base}/api/v1/label/protocol/values?match[]=ray_apsv_instance_sessions", timeout=10
        ) as r:
            assert set(json.loads(r.read())["data"]) == {"bgp", "bfd"}
    finally:
        if traffic is not None:
            traffic.stop.set()
            traffic.join(timeout=120)
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        if state:
            apsv("down", "--json", env=env)
        if state.get("process_session"):
            local_head.stop_processes(state["process_session"], state.get("pids"))

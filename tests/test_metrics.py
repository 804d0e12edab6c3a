"""APSV's Ray metrics on the node's Prometheus endpoint, and the Grafana dashboard that reads them.

One scenario on the shared local cluster drives every metric: echo sessions on more virtual
routers than get a label, sent by one client in a process of its own (as an agent's is), a
scale-up (rebalance moves), a scale-down (drain moves), VPSM steps with a forecaster (seasonal
naive on Serve). The endpoint is then polled until every name shows.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import ray

from apsv.frame import ProtocolId
from apsv.runtime.client import OffloadClient
from apsv.runtime.host import Key
from apsv.runtime.metrics import MAX_VROUTER_LABELS
from apsv.runtime.vpsm import ProtocolPlan

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "apsv-dashboard.json"
CLIENT = "metrics-test"

# Everything APSV exports (Ray adds the ray_ prefix, and _total to counters).
MULTIPLEXER = ["ray_apsv_session_moves_total"]
CLIENTS = [
    "ray_apsv_messages_total",
    "ray_apsv_vrouters_folded_total",
    "ray_apsv_client_batches_total",
    "ray_apsv_client_batch_latency_ms_bucket",
    "ray_apsv_client_buffers_in_use",
    "ray_apsv_client_buffers",
]
INSTANCES = [
    "ray_apsv_instance_frames_total",
    "ray_apsv_instance_batches_total",
    "ray_apsv_instance_sessions",
    "ray_apsv_instance_queue_frames",
    "ray_apsv_buffer_quota_bytes",
    "ray_apsv_instance_rss_bytes",
    "ray_apsv_instance_cpu_seconds",
    "ray_apsv_message_latency_ms_bucket",
]


class Scraped(NamedTuple):
    samples: dict[str, list[dict[str, str]]]
    agent_worker: str  # the WorkerId the scenario's client exports under


def samples(body: str) -> dict[str, list[dict[str, str]]]:
    """Sample names of a Prometheus text exposition -> the label sets they carry."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
        if m is None:
            continue
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append(labels)
    return out


def dashboard_metrics() -> set[str]:
    """Every metric a PromQL expression of the dashboard (panels and variables) names."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    names = set()
    for e in exprs:
        found = set(re.findall(r"\bray_[a-zA-Z0-9_:]+", e))
        assert found, f"an expression that names no ray_ metric: {e}"
        names |= found
    return names


@pytest.fixture(scope="module")
def scraped(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Scraped:
    from ray import serve

    from apsv.forecast.serving import ForecastService
    from apsv.runtime.cluster import deploy
    from tests.conftest import _free_port

    # The scenario's client runs in an actor, as an agent's does: what its process exports is
    # this one client's (this process also hosts every other test's clients). Defined here, it
    # travels by value (the workers need not import the tests).
    class Agent:
        def __init__(self, multiplexer: Any, keys: list[Key]) -> None:
            self.client = OffloadClient(multiplexer, metrics_label=CLIENT)
            self.keys = keys

        def open(self) -> list[str]:
            placed = self.client.open_sessions([(k, "echo", {}, False) for k in self.keys])
            return [v for v in placed.values() if v.startswith("error")]

        def traffic(self, rounds: int) -> None:
            for i in range(rounds * len(self.keys)):
                self.client.send(self.keys[i % len(self.keys)], b"ping")
            self.client.drain()

        def close(self) -> str:
            """Close the client (its last counts exported); the WorkerId they carry."""
            self.client.close()
            return str(ray.get_runtime_context().get_worker_id())

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    with contextlib.ExitStack() as stack:
        stack.callback(serve.shutdown)
        stack.callback(serve.delete, "tpe-metrics")
        serve.run(ForecastService.bind(), name="tpe-metrics", route_prefix=None)  # no registry: seasonal naive
        plan = ProtocolPlan("echo", min_instances=1, max_instances=3, policy="fixed", season=1)
        dep = deploy(
            [plan],
            suffix="-metrics",
            telemetry_root=tmp_path_factory.mktemp("telemetry"),
            run_loop=False,
            forecaster_app="tpe-metrics",
        )
        stack.callback(dep.stop)
        # One session on each of more virtual routers than get a label of their own.
        keys = [(1, vr, int(ProtocolId.ECHO), 1) for vr in range(1, MAX_VROUTER_LABELS + 11)]
        agent: Any = ray.remote(num_cpus=0)(Agent).remote(dep.multiplexer, keys)
        stack.callback(ray.kill, agent)
        assert ray.get(agent.open.remote()) == []
        ray.get(agent.traffic.remote(20))
        ray.get(dep.vpsm.step.remote())
        assert ray.get(dep.vpsm.scale_to.remote("echo", 2)) == 2  # up: new instance takes sessions (rebalance)
        ray.get(agent.traffic.remote(20))
        ray.get(dep.vpsm.step.remote())
        assert ray.get(dep.vpsm.scale_to.remote("echo", 1)) == 1  # down: the victim's sessions move (drain)
        ray.get(agent.traffic.remote(20))
        for _ in range(3):
            ray.get(dep.vpsm.step.remote())
            time.sleep(0.3)
        stats = ray.get(dep.multiplexer.stats.remote())
        assert stats["moves"] > 0
        worker: str = ray.get(agent.close.remote())
        want = set(MULTIPLEXER + CLIENTS + INSTANCES) | dashboard_metrics()
        url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
        deadline = time.time() + 90  # Ray's agent exports every few seconds; the machine is shared
        got: dict[str, list[dict[str, str]]] = {}
        while time.time() < deadline:
            try:
                got = samples(urllib.request.urlopen(url, timeout=10).read().decode())
            except OSError:
                got = {}
            if want <= set(got) and _labelled(got, worker):
                break
            time.sleep(2)
        return Scraped(got, worker)


def _labelled(got: dict[str, list[dict[str, str]]], worker: str) -> bool:
    """The label values this scenario produces have reached the endpoint."""
    msgs = {
        (x.get("protocol"), x.get("vrouter"))
        for x in got.get("ray_apsv_messages_total", [])
        if x.get("WorkerId") == worker
    }
    reasons = {x.get("reason") for x in got.get("ray_apsv_session_moves_total", [])}
    return {("echo", "1/1"), ("echo", "other")} <= msgs and {"rebalance", "drain"} <= reasons


def test_custom_metrics_on_the_endpoint(scraped: Scraped) -> None:
    got, worker = scraped
    missing = [n for n in MULTIPLEXER + CLIENTS + INSTANCES if n not in got]
    assert not missing, f"not on the metrics endpoint: {missing}"
    msgs = [x for x in got["ray_apsv_messages_total"] if x.get("protocol") == "echo"]
    assert all(re.fullmatch(r"\d+/\d+", x["vrouter"]) for x in msgs if x["vrouter"] != "other")
    # A client labels the first MAX_VROUTER_LABELS virtual routers it sends for and folds the rest
    # into "other", so the labels its process exports stay bounded whatever the routers' count.
    mine = {x["vrouter"] for x in msgs if x.get("WorkerId") == worker}
    assert mine == {f"1/{vr}" for vr in range(1, MAX_VROUTER_LABELS + 1)} | {"other"}, sorted(mine)
    assert worker in {x.get("WorkerId") for x in got["ray_apsv_vrouters_folded_total"]}
    assert worker in {x.get("WorkerId") for x in got["ray_apsv_client_batches_total"]}
    assert "ray_apsv_client_batch_latency_ms_count" in got
    assert {x.get("client") for x in got["ray_apsv_client_buffers"]} >= {CLIENT}
    assert {x["reason"] for x in got["ray_apsv_session_moves_total"]} >= {"rebalance", "drain"}
    for name in ("ray_apsv_buffer_quota_bytes", "ray_apsv_instance_queue_frames"):
        echo = [x for x in got[name] if x.get("protocol") == "echo"]
        # `stack_instance`: a label named `instance` is the scrape target's in Prometheus
        assert echo and all({"stack_instance", "protocol", "backend"} <= x.keys() for x in echo), name
        assert not any("instance" in x for x in echo), name


def test_every_dashboard_metric_exists(scraped: Scraped) -> None:
    names = dashboard_metrics()
    assert len(names) >= 15
    missing = sorted(n for n in names if n not in scraped.samples)
    assert not missing, f"the dashboard reads metrics the endpoint does not have: {missing}"


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for what in ("protocol", "virtual router", "instances", "forecast", "latency", "buffer", "moves", "cpu", "rss"):
        assert what in titles, what

"""APSV's Ray metrics on the node's Prometheus endpoint, and the Grafana dashboard that reads them.

One scenario on the shared local cluster drives every metric: echo sessions on more virtual
routers than get a label, a scale-up (rebalance moves), a scale-down (drain moves), VPSM steps
with a forecaster (seasonal naive on Serve). The endpoint is then polled until every name shows.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import ray

from apsv.frame import ProtocolId
from apsv.runtime.client import OffloadClient
from apsv.runtime.telemetry import MAX_VROUTER_LABELS
from apsv.runtime.vpsm import ProtocolPlan

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "apsv-dashboard.json"
CLIENT = "metrics-test"

# Everything APSV exports (Ray adds the ray_ prefix, and _total to counters).
MULTIPLEXER = [
    "ray_apsv_messages_total",
    "ray_apsv_vrouters_folded_total",
    "ray_apsv_session_moves_total",
    "ray_apsv_multiplexer_batches_total",
    "ray_apsv_multiplexer_batch_latency_ms_bucket",
    "ray_apsv_buffer_quota_used_bytes",
    "ray_apsv_buffer_quota_bytes",
]
CLIENTS = ["ray_apsv_client_buffers_in_use", "ray_apsv_client_buffers"]
INSTANCES = [
    "ray_apsv_instance_frames_total",
    "ray_apsv_instance_batches_total",
    "ray_apsv_instance_sessions",
    "ray_apsv_instance_rss_bytes",
    "ray_apsv_instance_cpu_seconds",
    "ray_apsv_message_latency_ms_bucket",
]


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
def scraped(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    from ray import serve

    from apsv.forecast.serving import ForecastService
    from apsv.runtime.cluster import deploy
    from tests.conftest import _free_port

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
        client = OffloadClient(dep.multiplexer, metrics_label=CLIENT)
        # One session on each of more virtual routers than get a label of their own.
        keys = [(1, vr, int(ProtocolId.ECHO), 1) for vr in range(1, MAX_VROUTER_LABELS + 11)]
        placed = client.open_sessions([(k, "echo", {}, False) for k in keys])
        assert not [v for v in placed.values() if v.startswith("error")]

        def traffic(rounds: int) -> None:
            for i in range(rounds * len(keys)):
                client.send(keys[i % len(keys)], b"ping")
            client.drain()

        traffic(20)
        ray.get(dep.vpsm.step.remote())
        assert ray.get(dep.vpsm.scale_to.remote("echo", 2)) == 2  # up: new instance takes sessions (rebalance)
        traffic(20)
        ray.get(dep.vpsm.step.remote())
        assert ray.get(dep.vpsm.scale_to.remote("echo", 1)) == 1  # down: the victim's sessions move (drain)
        traffic(20)
        for _ in range(3):
            ray.get(dep.vpsm.step.remote())
            time.sleep(0.3)
        stats = ray.get(dep.multiplexer.stats.remote())
        assert stats["moves"] > 0
        want = set(MULTIPLEXER + CLIENTS + INSTANCES) | dashboard_metrics()
        url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
        deadline = time.time() + 90  # Ray's agent exports every few seconds; the machine is shared
        got: dict[str, list[dict[str, str]]] = {}
        while time.time() < deadline:
            try:
                got = samples(urllib.request.urlopen(url, timeout=10).read().decode())
            except OSError:
                got = {}
            if want <= set(got) and _labelled(got):
                break
            time.sleep(2)
        client.close()
        return got


def _labelled(got: dict[str, list[dict[str, str]]]) -> bool:
    """The label values this scenario produces have reached the endpoint."""
    msgs = {(x.get("protocol"), x.get("vrouter")) for x in got.get("ray_apsv_messages_total", [])}
    reasons = {x.get("reason") for x in got.get("ray_apsv_session_moves_total", [])}
    return {("echo", "1/1"), ("echo", "other")} <= msgs and {"rebalance", "drain"} <= reasons


def test_custom_metrics_on_the_endpoint(scraped: dict[str, list[dict[str, str]]]) -> None:
    missing = [n for n in MULTIPLEXER + CLIENTS + INSTANCES if n not in scraped]
    assert not missing, f"not on the metrics endpoint: {missing}"
    msgs = scraped["ray_apsv_messages_total"]
    labels = {x["vrouter"] for x in msgs if x.get("protocol") == "echo"}
    assert "other" in labels  # virtual routers beyond the label limit are folded...
    # ...so each multiplexer's label count stays bounded (earlier tests' multiplexers in this Ray
    # session export theirs too: count per exporting worker)
    per_worker: dict[str, set[str]] = {}
    for x in msgs:
        if x.get("protocol") == "echo":
            per_worker.setdefault(x.get("WorkerId", ""), set()).add(x["vrouter"])
    assert max(len(v - {"other"}) for v in per_worker.values()) <= MAX_VROUTER_LABELS
    assert all(re.fullmatch(r"\d+/\d+", v) for v in labels - {"other"})
    assert {x["reason"] for x in scraped["ray_apsv_session_moves_total"]} >= {"rebalance", "drain"}
    quota = scraped["ray_apsv_buffer_quota_bytes"]
    assert all({"instance", "protocol"} <= x.keys() for x in quota)
    assert {x.get("client") for x in scraped["ray_apsv_client_buffers"]} >= {CLIENT}
    assert "ray_apsv_multiplexer_batch_latency_ms_count" in scraped


def test_every_dashboard_metric_exists(scraped: dict[str, list[dict[str, str]]]) -> None:
    names = dashboard_metrics()
    assert len(names) >= 15
    missing = sorted(n for n in names if n not in scraped)
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

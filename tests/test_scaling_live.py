"""`apsv evaluate --mode live`: a real trace window replayed through the live system (local Ray,
process backend), policy by policy, beside the simulator run with the live system's measured
service rate, latency floor and start latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apsv.cli import app
from apsv.forecast.model_backtest import read_series
from tests.conftest import cli_json

runner = CliRunner()


@pytest.mark.slow
@pytest.mark.ray
def test_live_evaluation_against_the_simulator(ray_cluster: Any, data_dir: Path, tmp_path: Path) -> None:
    a5m = read_series(data_dir / "timeseries/cortez-internet-traffic/A5M.txt", season=288)
    trace = tmp_path / "a5m-3000.txt"
    trace.write_text("\n".join(f"{v:.6g}" for v in a5m.values[:3000]) + "\n")
    r = runner.invoke(
        app,
        [
            "evaluate", str(trace), "--season", "288", "--mode", "live", "--policies", "predictive,oracle",
            "--max-instances", "24", "--forecaster-steps", "150", "--json", "--plots", str(tmp_path / "plots"),
            # the steepest rise of the evaluated part: 3.4k -> 16k msgs/s (trace) within a minute
            "--live-start", "775", "--live-steps", "60", "--live-peak-rate", "1000", "--speed", "0.5",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = cli_json(r)
    assert out["mode"] == "live" and out["steps"] == 60
    cal = out["calibration"]
    # the echo stack's service time sets what one live instance serves (minus Ray's per-call cost)
    assert 0.6 * 1000 / cal["delay_ms"] < cal["capacity"] <= 1000 / cal["delay_ms"] * 1.05
    assert 0 < cal["start_latency_s"] < 5
    # the host's cores and the stall of as many instances starting at once, handed to the simulator
    assert cal["node_cpus"] >= 1 and 0 <= cal["start_stall_s"] < 5
    assert out["sim_config"]["node_cpus"] == cal["node_cpus"] and out["sim_config"]["nodes"] == 1
    # the policies leave room for the measured fixed latency (floor + the agents' batching wait)
    fixed = out["sim_config"]["base_latency_ms"] + out["sim_config"]["batch_delay_ms"]
    assert out["policy_configs"]["predictive"]["fixed_latency_ms"] == pytest.approx(fixed) and fixed > 40
    for p in ("predictive", "oracle"):
        live, sim = out["policies"][p], out["sim"][p]
        assert {"slo_violation_s", "instance_s", "scale_actions", "lost"} <= live.keys()
        assert live["messages"] > 0.9 * 60 * 2000 * 0.4  # the window averages > 40 % of its peak
        # every message echoed back: applied exactly once (a handful may still be in a move)
        assert live["lost"] <= 0.001 * live["messages"]
        assert live["scale_actions"] >= 1 and sim["scale_actions"] >= 1  # both scaled into the rise
        # cost agrees in kind: the 20 % bound is the benchmark's (benchmarks/scaling_live.py
        # measures 1-4 % apart); on a loaded 2-core CI host the live side lags by up to a third
        assert out["agreement"][p]["instance_s"] <= 0.5, out["agreement"]
    # the calibration measured a live move (a second instance joining takes a share of the sessions)
    assert cal["moves"] > 0 and 0 < cal["move_s"] < 1.0
    names = sorted(p.name for p in (tmp_path / "plots").glob("*-live-*.png"))
    assert len(names) == 2 and names[0].endswith("-live-instances.png") and names[1].endswith("-live-latency-cdf.png")

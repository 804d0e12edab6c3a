"""The apsv command line, run as a user would run it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apsv.cli import app
from apsv.stacks.interface import REGISTRY, StackSession, load_stack
from tests.conftest import cli_json, manifest, manifest_counts, shared_data_dir

runner = CliRunner()


def test_help_and_version() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "mrt" in r.output and "demo" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("apsv ")


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("apsv")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout


def test_mrt_stats_json_keys_and_counts() -> None:
    path = "mrt/bgpdump-testdata/updates.20071015.1505.gz"
    r = runner.invoke(app, ["mrt", "stats", "--json", str(shared_data_dir() / path)])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    exp = manifest_counts(manifest()[path])
    assert (j["records"], j["updates"], j["announced"], j["withdrawn"], j["errors"]) == (
        exp["recs"],
        exp["UPDATE"],
        exp["ann"],
        exp["wd"],
        0,
    )


def test_mrt_stats_text_and_missing_file() -> None:
    r = runner.invoke(app, ["mrt", "stats", str(shared_data_dir() / "mrt/ryu-mrt/updates.20161101.0000.bz2")])
    assert r.exit_code == 0 and "updates     2623" in r.output
    r = runner.invoke(app, ["mrt", "stats", "/nonexistent.mrt"])
    assert r.exit_code == 2


def test_mrt_stats_on_what_is_not_mrt_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    not_mrt = tmp_path / "README.md"
    not_mrt.write_text("# a text file, not an MRT dump\n" * 20)
    dump = (shared_data_dir() / "mrt/bgpdump-testdata/updates.20070211.0141.gz").read_bytes()
    cut_early = tmp_path / "cut.gz"
    cut_early.write_bytes(dump[:40])  # the compressed stream ends before a whole record
    for path, why in ((not_mrt, "damaged MRT framing"), (cut_early, "compressed stream ends early")):
        r = subprocess.run(
            [str(Path(sys.executable).with_name("apsv")), "mrt", "stats", str(path)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.count("\n") == 1 and f"{path}: no MRT record could be read: " in r.stderr and why in r.stderr
    # cut later: the records before the cut are counted, and the cut is an error
    cut_late = tmp_path / "cut-late.gz"
    cut_late.write_bytes(dump[: len(dump) // 2])
    late = runner.invoke(app, ["mrt", "stats", "--json", str(cut_late)])
    j = json.loads(late.output)
    assert late.exit_code == 0 and j["records"] > 10_000 and j["errors"] >= 1


def test_mrt_dump_json_lines() -> None:
    r = runner.invoke(
        app, ["mrt", "dump", "--limit", "5", str(shared_data_dir() / "mrt/ryu-mrt/updates.20161101.0000.bz2")]
    )
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert len(lines) == 5 and all(x["type"] == "UPDATE" for x in lines)


@pytest.mark.slow
@pytest.mark.ray
def test_demo_runs_the_main_job_end_to_end(ray_cluster: Any, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    r = runner.invoke(
        app, ["demo", "--json", "--telemetry", str(tmp_path / "tel"), "--plots", str(plots), "--duration", "30"]
    )
    assert r.exit_code == 0, r.output
    out = cli_json(r)
    assert out["ok"] is True
    files = out["files"]
    assert len(files) == 2 and all(f["errors"] == 0 and f["updates"] > 700 for f in files)
    o = out["offload"]
    assert (o["sessions"], o["vrouters"], o["transport"]) == (120, 12, "shm")
    # every frame applied exactly once, in order, while instances came and went
    assert o["identical_ribs"] and o["lost_or_misordered"] == 0 and o["problems"] == []
    assert o["updates"] > 1000
    # the predictive policy on the served Transformer's forecasts scaled the instances with the load
    assert o["policy"] == "predictive" and o["forecaster"]["model"].startswith("v")
    assert o["forecast_errors"] == 0 and o["forecast_steps"] >= 10 and o["forecast_wape"] is not None
    assert o["instances_max"] >= 2 and o["scale_actions"] >= 2 and o["session_moves"] > 0
    assert o["latency_samples"] > 0.9 * o["updates"]  # (a sample taken while telemetry reads may be missed)
    assert 0 < o["latency_ms"]["p50"] <= o["latency_ms"]["p99"]
    # BFD: every offloaded session and its remote end came Up through the cluster
    b = o["bfd"]
    assert b["sessions"] == 100 and b["cluster_up"] == b["remote_up"] == 100
    assert sorted(p.name for p in plots.glob("*.png")) == ["demo-latency-cdf.png", "demo-scaling.png"]
    assert list((tmp_path / "tel").glob("hour=*/*.parquet"))


def test_stacks_register_through_entry_points() -> None:
    assert "bgp" in REGISTRY.names()
    stack = load_stack("bgp")
    s = stack.create_session({"local_as": 65001, "router_id": "192.0.2.1", "peer_as": 65002})
    assert isinstance(s, StackSession)
    restored = stack.restore_session(s.snapshot())
    assert restored.stats()["state"] == "Idle"
    r = runner.invoke(app, ["stacks", "--json"])
    assert {"name": "bgp", "protocol_id": 1, "class": "apsv.bgp.stack.BgpStack"} in json.loads(r.output)["stacks"]
    try:
        load_stack("ospf")
    except LookupError as e:
        assert "apsv.stacks" in str(e)
    else:
        raise AssertionError("an unknown protocol must be refused")


@pytest.mark.slow
def test_status_json_while_the_demo_runs(tmp_path: Path) -> None:
    """`apsv status --json` from another process finds the demo's deployment (its own local Ray
    cluster, token auth on) and answers with valid JSON while the demo runs."""
    import os
    import time

    apsv = str(Path(sys.executable).parent / "apsv")
    env = {**os.environ, "APSV_STATE_DIR": str(tmp_path / "state")}
    demo = subprocess.Popen(
        [
            apsv,
            "demo",
            "--json",
            "--duration",
            "25",
            "--bfd-sessions",
            "20",
            "--plots",
            str(tmp_path / "plots"),
            *[
                "--telemetry",
                str(tmp_path / "telemetry"),
            ],
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen: dict[str, Any] | None = None
    temp_dir = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and demo.poll() is None:
            r = subprocess.run(
                [apsv, "status", "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
            )
            doc = json.loads(r.stdout)  # always one JSON object, running or not
            if doc.get("ok", True) and doc.get("instances", {}).get("bgp"):
                seen = doc
                # the demo's own Ray temp dir (its logs), removed once the demo is over
                temp_dir = json.loads((tmp_path / "state" / "state.json").read_text()).get("temp_dir")
                break
            time.sleep(2)
        out, _ = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert demo.returncode == 0
    assert json.loads(out)["ok"] is True  # stdout is the one object: Ray's own messages go to stderr
    assert seen is not None, "apsv status never saw the demo's deployment"
    assert {"instances", "sessions", "forecasts", "buffer_pool"} <= seen.keys()
    assert seen["instances"]["bgp"]["count"] >= 1


def test_help_shows_no_type_for_a_flag() -> None:
    r = CliRunner().invoke(app, ["down", "--help"], env={"COLUMNS": "100"})
    assert r.exit_code == 0 and "--keep-logs" in r.output
    assert "<bool>" not in r.output
    r = CliRunner().invoke(app, ["mrt", "stats", "--help"], env={"COLUMNS": "100"})
    assert "<path>" in r.output and "<bool>" not in r.output  # (an argument keeps its type)

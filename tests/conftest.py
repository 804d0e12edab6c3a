"""Shared fixtures: where the real third-party data lives, and its independently measured counts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $APSV_SHARED_DATA. Missing data fails loudly."""
    path = Path(os.environ.get("APSV_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "MANIFEST.tsv").is_file():
        pytest.fail(
            f"real test data not found at {path} (no MANIFEST.tsv). Set APSV_SHARED_DATA to the shared/data "
            "folder; these tests must not be skipped."
        )
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


def manifest() -> dict[str, str]:
    rows = {}
    for line in (shared_data_dir() / "MANIFEST.tsv").read_text().splitlines()[1:]:
        path, _size, measured = line.split("\t")
        rows[path] = measured
    return rows


def manifest_counts(measured: str) -> dict[str, int]:
    """The key=value counts of an MRT row ('recs=... UPDATE=13 ann=54 wd=43')."""
    return {k: int(v) for k, v in re.findall(r"\b(recs|err|UPDATE|ann|wd|rib_prefixes|rib_entries)=(\d+)", measured)}


def manifest_bgp_messages(measured: str) -> dict[str, int]:
    """The per-type BGP message counts of a capture row ('BGPmsgs=OPEN:8,KEEPALIVE:16')."""
    if "BGPmsgs=" not in measured:
        return {}
    return {k: int(v) for k, v in re.findall(r"([A-Z-]+):(\d+)", measured.split("BGPmsgs=")[1])}


# ------------------------------------------------------------------------------------------------
# One local Ray cluster for the whole test session (ray.init costs seconds).


def telemetry_row(ts: Any, **fields: Any) -> dict[str, Any]:
    """One instance's telemetry row as the VPSM writes it (an idle BGP instance), with `fields`
    replacing any of its values."""
    return {
        "ts": ts,
        "instance_id": "bgp-1",
        "protocol": "bgp",
        "backend": "process",
        "sessions": 1,
        "cpu_seconds": 0.0,
        "cpu_percent": 0.0,
        "rss_bytes": 0,
        "frames_in": 0,
        "frames_out": 0,
        "msgs_per_s": 1.0,
        "queue_depth": 0,
        "latency_p50_ms": None,
        "latency_p99_ms": None,
        "latency_max_ms": None,
        "duplicates": 0,
        "errors": 0,
        "alloc_cpu": 0.5,
        "alloc_memory_bytes": 1 << 29,
        **fields,
    }


def cli_json(result: Any) -> Any:
    """The one JSON object a `--json` command run in process (CliRunner) printed. On the test
    session's Ray connection, which the command leaves alone, Ray's driver may print a message of
    its own to stdout after the command returns; run as its own process, a command's stdout is the
    object alone (tests/test_cli.py checks that)."""
    objects = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(objects) == 1, result.output
    return json.loads(objects[0])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    import tempfile

    import ray

    from apsv.runtime.cluster import start_local_ray

    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="apsv-t-", dir="/tmp")
    info = start_local_ray(num_cpus=8, temp_dir=tmp, metrics_export_port=port)
    info["metrics_port"] = port
    yield info
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # the session's Ray logs and sockets


_DEPLOYMENTS = iter(range(1, 1_000_000))


@pytest.fixture
def deployment(ray_cluster: Any, tmp_path: Path) -> Any:
    """A fresh multiplexer + VPSM pair (names unique to the test); destroyed afterwards."""
    from apsv.runtime.cluster import deploy

    made = []

    def make(plans: list[Any], **kw: Any) -> Any:
        dep = deploy(plans, suffix=f"-t{next(_DEPLOYMENTS)}", telemetry_root=tmp_path / "telemetry", **kw)
        made.append(dep)
        return dep

    yield make
    for dep in made:
        with contextlib.suppress(Exception):
            dep.stop()


def _apsv_temp_entries() -> set[str]:
    return {p.name for p in Path("/tmp").glob("apsv-*")}


def _apsv_containers() -> set[str]:
    """Stack containers (the Docker backend labels them) that exist now; none without Docker."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        return {c.name for c in client.containers.list(all=True, filters={"label": "apsv.instance"})}
    except Exception:  # no Docker engine here: nothing to leave behind
        return set()


def _ours(p: Any) -> bool:
    """A live process the tests started: not Python's own shared-memory resource tracker,
    which lives as long as this interpreter and goes with it."""
    try:
        return p.status() != "zombie" and "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    except Exception:  # gone meanwhile
        return False


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Any:
    """The suite leaves no temp directory under /tmp/apsv-*, no stack container and no process
    of its own behind: checked once every test and session fixture is done (this fixture is
    set up first, so it is torn down last), failing the run otherwise."""
    import time

    import psutil

    tmp0, containers0 = _apsv_temp_entries(), _apsv_containers()
    yield
    deadline = time.monotonic() + 30  # Ray's and the daemons' processes take a moment to exit
    while True:
        tmp = sorted(_apsv_temp_entries() - tmp0)
        containers = sorted(_apsv_containers() - containers0)
        procs = [p for p in psutil.Process().children(recursive=True) if _ours(p)]
        if not (tmp or containers or procs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    names = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
    left = [f"/tmp/{t}" for t in tmp] + [f"container {c}" for c in containers] + [f"process {n}" for n in names]
    if left:
        pytest.fail("the test session left behind: " + "; ".join(left), pytrace=False)

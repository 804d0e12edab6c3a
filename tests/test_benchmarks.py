"""The benchmark scripts run and write the JSON they promise (numbers are judged in benchmarks/, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bgp_decode_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "bgp.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bgp_decode.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    j = json.loads(out.read_text())
    upd, rib = j["files"]
    assert upd["mrtparse"]["updates"] == upd["apsv_decode"]["updates"] == 23394
    assert upd["mrtparse"]["prefixes"] == upd["apsv_decode"]["prefixes"]
    assert rib["mrtparse"]["rib_entries"] == rib["apsv_decode"]["prefixes"] == 270005
    assert rib["memory"]["bytes_per_path"] > 0
    assert {"meets_5x_mrtparse", "meets_300k_decode_insert"} <= set(j["targets"])

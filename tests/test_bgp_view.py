"""The operator's view in FRR's JSON shapes (`apsv bgp summary`, `apsv bgp route`), from real
sessions' stats and routes; and the commands' one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apsv import bgp_view
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.policy import Policy
from apsv.cli import app
from tests.test_policy import POLICY
from tests.test_session import A, B, pair

KEY = (7, 3, 1, 1)


def test_summary_and_routes_in_frr_shapes() -> None:
    b_cfg = B.model_copy(update={"policy": Policy.model_validate(POLICY), "import_policy": "IN"})
    _, b, _, _ = pair(A, BgpSessionConfig.model_validate(b_cfg.model_dump()), now=100.0)
    info = b.stats()
    out = bgp_view.summary({KEY: info}, now=190.5)
    v4 = out["7/3"]["ipv4Unicast"]
    assert v4["as"] == 65002 and v4["routerId"] == "192.0.2.2" and v4["totalPeers"] == 1
    p = v4["peers"]["127.0.0.1"]
    assert p["state"] == "Established" and p["remoteAs"] == 65001 and p["localAs"] == 65002
    assert p["peerUptimeMsec"] == 90_500 and p["peerUptime"] == "00:01:30"
    assert p["pfxRcd"] == 136 and p["policyRefused"] == 64 and p["msgRcvd"] > 0 and p["msgSent"] > 0
    assert out["7/3"]["ipv6Unicast"]["peers"]["127.0.0.1"]["pfxRcd"] == 2
    r = bgp_view.routes({KEY: b.route_rows((1, 1))}, {KEY: info})
    assert r["localAS"] == 65002 and len(r["routes"]) == 136
    (path,) = r["routes"]["10.100.0.0/16"]
    assert path["path"] == "65099 65001" and path["locPrf"] == 300 and path["metric"] == 0
    assert path["community"] == {"string": "65002:1"} and path["largeCommunity"] == {"string": "65002:3:4"}
    assert path["origin"] == "IGP" and path["nexthops"][0]["ip"] == "198.51.100.1"
    one = bgp_view.routes({KEY: b.route_rows((1, 1))}, {KEY: info}, "10.100.0.0/16")
    assert list(one["routes"]) == ["10.100.0.0/16"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["bgp", "route", "x/1"], 2, "TENANT/ID or ID"),
        (["bgp", "route", "1", "10.0.0.1/8"], 2, "has host bits set"),
        (["bgp", "route", "1", "--family", "l2vpn"], 2, "ipv4-unicast or ipv6-unicast"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args: list[str], code: int, message: str) -> None:
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == code and message in json.loads(r.stdout)["error"]


def test_without_a_deployment_the_view_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APSV_STATE_DIR", str(tmp_path))
    r = CliRunner().invoke(app, ["bgp", "summary", "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 1 and out["ok"] is False and "apsv up" in out["error"]

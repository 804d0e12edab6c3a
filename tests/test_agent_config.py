"""The agent's configuration: what it accepts, and how it says what is wrong and where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apsv.agent.config import ConfigError, load_config, parse_config
from apsv.cli import app

GOOD = """
tenant = 4
[[vrouters]]
id = 1
name = "edge-1"
  [[vrouters.bgp]]
  session = 1
  listen = "127.0.0.10:1790"
  peer = "127.0.0.3"
  local_as = 65010
  peer_as = 65003
  router_id = "10.0.0.10"
  hold_time = 9
  next_hop_self = "198.51.100.10"
  announce = [{ prefixes = ["203.0.113.0/24"] }]
  announce_range = [{ start = "10.200.0.0/24", count = 3 }]
  events = "state"
  bfd = 3
  password = "tcp-md5-key"
  ttl_security_hops = 1
  [[vrouters.bgp]]
  session = 2
  mode = "active"
  peer = "127.0.0.4:1791"
  local_address = "127.0.0.10"
  local_as = 65010
  peer_as = 65004
  router_id = "10.0.0.10"
  [[vrouters.bfd]]
  session = 3
  local_address = "10.99.0.2"
  peer_address = "10.99.0.1"
  netns = "vr1"
  desired_min_tx_ms = 100
  auth = { type = "meticulous-keyed-sha1", key_id = 2, secret = "s3cret" }
"""


def test_a_good_config_and_what_each_session_gets(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(GOOD)
    cfg = load_config(f)
    sessions = {key: (proto, stack_cfg) for key, proto, stack_cfg, _v, _p in cfg.sessions()}
    assert set(sessions) == {(4, 1, 1, 1), (4, 1, 1, 2), (4, 1, 2, 3)}
    bgp = sessions[(4, 1, 1, 1)][1]
    assert bgp["passive"] is True and bgp["peer_address"] == "127.0.0.3" and bgp["local_address"] == "127.0.0.10"
    assert [a["prefixes"] for a in bgp["announce"]] == [
        ["203.0.113.0/24"],
        ["10.200.0.0/24", "10.200.1.0/24", "10.200.2.0/24"],
    ]
    assert sessions[(4, 1, 1, 2)][1]["passive"] is False
    assert bgp["ebgp_requires_policy"] is True  # RFC 8212 by default for the operator's sessions
    bfd = sessions[(4, 1, 2, 3)][1]
    assert bfd["local_discriminator"] == (1 << 16 | 3) and bfd["auth"]["type"] == "meticulous-keyed-sha1"
    r = CliRunner().invoke(app, ["agent", "check", str(f)])
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and len(out["sessions"]) == 3
    # both eBGP sessions have no policy: RFC 8212 warnings, each direction named
    assert len(out["warnings"]) == 4 and "vrouter 1 bgp session 1: eBGP without an import_policy" in out["warnings"][0]
    assert "warning: " in r.stderr
    # the MD5 key reaches the socket, never the stack's configuration or any output
    peer = cfg.vrouters[0].bgp[0]
    assert peer.md5_key() == b"tcp-md5-key" and "tcp-md5-key" not in r.stdout + json.dumps(bgp) + repr(peer)
    # and the agent actor gets the key itself, not its masked JSON form
    from apsv.agent.actor import actor_config

    again = parse_config(actor_config(cfg), "actor")
    assert again.vrouters[0].bgp[0].md5_key() == b"tcp-md5-key"


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        (("peer_as = 65003", "peer_as = 70000000000"), "vrouters[0].bgp[0]", "peer_as"),
        (("hold_time = 9", "hold_tme = 9"), "vrouters[0].bgp[0]", "hold_tme: Extra inputs"),
        (('listen = "127.0.0.10:1790"', 'listen = "127.0.0.10"'), "vrouters[0].bgp[0]", "address:port"),
        (('peer = "127.0.0.3"', 'peer = "peer-one"'), "vrouters[0].bgp[0]", "not an IP address"),
        (("count = 3", "count = 0"), "vrouters[0].bgp[0].announce_range[0].count", "greater than or equal to 1"),
        (("session = 3", "session = 2"), "vrouters[0]", "appear more than once"),
        (('type = "meticulous-keyed-sha1"', 'type = "rot13"'), "vrouters[0].bfd[0].auth.type", "unknown"),
        (('netns = "vr1"', 'netns = "../etc"'), "vrouters[0].bfd[0].netns", "not a network namespace"),
        (("desired_min_tx_ms = 100", "desired_min_tx_ms = 0"), "vrouters[0].bfd[0].desired_min_tx_ms", ">= 1"),
        (("bfd = 3", "bfd = 9"), "vrouters[0]", "bgp[0].bfd: virtual router 1 has no BFD session 9"),
        (('password = "tcp-md5-key"', f'password = "{"k" * 81}"'), "vrouters[0].bgp[0].password", "1 to 80 octets"),
        (("ttl_security_hops = 1", "ttl_security_hops = 255"), "vrouters[0].bgp[0].ttl_security_hops", "254"),
    ],
)
def test_bad_configs_are_refused_with_their_place(
    change: tuple[str, str], where: str, what: str, tmp_path: Path
) -> None:
    f = tmp_path / "agent.toml"
    assert change[0] in GOOD
    f.write_text(GOOD.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    msg = str(ei.value).replace("greater than or equal to 1.0", ">= 1").replace("greater than or equal to 1", ">= 1")
    assert f"{f}: {where}" in msg and what.replace("greater than or equal to 1", ">= 1") in msg, msg
    r = CliRunner().invoke(app, ["agent", "check", str(f)])
    assert r.exit_code == 2


def test_unreadable_and_non_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("tenant = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=r"\(top level\)|vrouters"):
        parse_config({"tenant": 1})


def test_the_documented_example_parses() -> None:
    import tomllib

    import apsv.agent.config as module

    doc = module.__doc__ or ""
    cfg = parse_config(tomllib.loads(doc.split("```toml\n", 1)[1].split("```", 1)[0]))
    assert cfg.warnings() == [] and cfg.vrouters[0].bgp[0].bfd == 2

"""A hostile peer on the agent's listener (apsv/bench/hostile_peer.py, short form): every case gets
the RFC's answer - a NOTIFICATION with its code and subcode, a closed socket, or a session that
stays up - while a well-behaved session on the same agent keeps working. The latency figures
against the SLO, 10,000 held connections and the minute-long slow OPEN are the benchmark's
(benchmarks/hostile_peer.py)."""

from __future__ import annotations

from typing import Any

import pytest

from apsv.bench.hostile_peer import cases, deployed_agent, run
from apsv.bench.hostile_wire import Target, maximal_update

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TARGET = Target(("127.0.0.60", 1798), "127.0.0.61", "127.0.0.62", apsv_as=65010, peer_as=65020)


def test_every_case_has_an_answer_the_rfc_names() -> None:
    want = {c.name: c.expected for c in cases()}
    assert want["open_bad_peer_as"] == ["notification", [2, 2]]  # RFC 4271 §6.2
    assert want["update_before_open"] == ["notification", [5, 1]]  # RFC 6608
    assert want["slowloris_established"] == ["notification", [4, 0]]  # §8.2.2: bytes are not messages
    assert len(maximal_update(65020, 0)) == 4096


def test_hostile_peer_against_a_running_agent(ray_cluster: Any) -> None:
    with deployed_agent(TARGET, suffix="-hostile-test") as hooks:
        result = run(
            TARGET,
            held=2000,
            flood_s=3.0,
            slow=False,
            slowloris_s=0.5,
            agent_rss_mb=hooks["agent_rss_mb"],
            agent_counters=hooks["agent_counters"],
        )
        mux = hooks["mux_stats"]()
    bad = {k: v for k, v in result["cases"].items() if not v["ok"]}
    assert not bad, bad
    held = result["held_connections"]
    assert held["opened"] == held["attempted"] and held["closed_by_agent"] == held["opened"]
    assert result["connection_flood"]["attempts"] > 0
    by = result["bystander"]
    assert by["notifications"] == [], by
    assert all(v["unanswered"] == 0 and v["samples"] > 0 for v in by["latency"].values()), by
    counters = result["agent"]["counters"]
    assert counters["connections_refused"] >= held["opened"] + result["connection_flood"]["connected"]
    # nothing held per refused connection: the agent's memory stays where it was (generous)
    assert result["agent"]["rss_mb_after"] - result["agent"]["rss_mb_before"] < 64
    assert mux["recoveries"] == 0  # no instance died

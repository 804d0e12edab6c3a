"""The agent's events for the virtual router are bounded by count and by bytes."""

from __future__ import annotations

import asyncio
import json

import pytest

from apsv.agent.config import parse_config
from apsv.agent.core import Agent
from apsv.agent.events import EventBuffer


def test_buffer_drops_the_oldest_past_either_bound() -> None:
    b = EventBuffer(max_events=3, max_bytes=100)
    for i in range(5):
        b.push({"n": i}, 10)
    assert [e["n"] for e in b.drain()] == [2, 3, 4] and b.dropped == 2
    b.push({"n": "big"}, 60)
    b.push({"n": "big2"}, 60)  # 120 octets: the first goes
    assert len(b) == 1 and b.bytes == 60 and b.dropped == 3 and b.dropped_bytes == 20 + 60
    b.push({"n": "huge"}, 101)  # larger than the bound on its own: never kept
    assert len(b) == 1 and b.pop() == {"n": "big2"} and b.bytes == 0 and b.dropped == 4


def test_buffer_refuses_no_room() -> None:
    with pytest.raises(ValueError):
        EventBuffer(max_events=0)


SPEAKERS = {"local_as": 65001, "peer_as": 65002, "router_id": "10.0.0.1"}


def config(**extra: object) -> object:
    return parse_config(
        {
            "vrouters": [
                {"id": 1, "bgp": [{"session": 1, "listen": "127.0.0.1:1790", "peer": "127.0.0.2", **SPEAKERS}]}
            ],
            **extra,
        }
    )


def routes_event(n: int) -> dict[str, object]:
    """A `routes` event as a session withdrawing `n` prefixes after a reset sends it."""
    return {"event": "routes", "withdrawn": [f"10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(n)]}


def test_agent_holds_large_route_events_within_its_byte_bound() -> None:
    # A peer with 10,000 routes that resets: each reset is one event of about 160 KB. Nobody reads.
    agent = Agent(config(max_event_bytes=1 << 20), multiplexer=None, keep_events=True)  # type: ignore[arg-type]
    ev = routes_event(10_000)
    size = len(json.dumps(ev, separators=(",", ":")))
    for _ in range(60):
        agent._event((1, 1, 1, 1), dict(ev))
    held = agent.event_buffer.bytes
    assert (1 << 20) - 2 * size < held <= 1 << 20  # full, and no fuller than the bound
    assert agent.c.event_bytes_held == held
    kept = agent.take_events()
    assert 1 <= len(kept) < 10
    assert agent.c.events == 60 and agent.c.events_dropped == 60 - len(kept)
    assert kept[-1]["withdrawn"] == ev["withdrawn"]  # the newest are the ones kept


def test_agent_keeps_nothing_nobody_asked_for() -> None:
    agent = Agent(config(), multiplexer=None)  # type: ignore[arg-type]
    agent._event((1, 1, 1, 1), routes_event(10))
    assert agent.c.events == 1 and len(agent.event_buffer) == 0


def test_event_stream_yields_in_order() -> None:
    async def main() -> list[object]:
        agent = Agent(config(), multiplexer=None)  # type: ignore[arg-type]
        stream = agent.events()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        for i in range(3):
            agent._event((1, 1, 1, 1), {"event": "state", "n": i})
        got = [(await first)["n"]]
        got += [(await stream.__anext__())["n"] for _ in range(2)]
        return got

    assert asyncio.run(main()) == [0, 1, 2]

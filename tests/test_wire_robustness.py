"""Malformed traffic on the wire: a peer sends the fuzz corpora's messages to an offloaded session.

A raw BGP peer (plain sockets, on 127.0.0.20) connects to the APSV agent, completes the OPEN
exchange (or sends the malformed OPEN in place of its own), then sends each corpus input. What
APSV answers on the wire must be what the BGP stack decides for those bytes in process (the
RFC 4271 / RFC 7606 decisions that tests/test_bgp_robustness.py checks): the same NOTIFICATION,
or none. Meanwhile a second session (127.0.0.21) stays Established, and no instance dies.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from apsv.agent.actor import create_agent_actor
from apsv.agent.config import parse_config
from apsv.bgp import constants as C
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.message import Keepalive, encode_message
from apsv.bgp.session import BgpSession
from apsv.runtime.cluster import NAMESPACE
from apsv.runtime.tenancy import tenant_of
from apsv.runtime.vpsm import ProtocolPlan
from apsv.stacks.interface import Send
from tests.peers import wait_for
from tests.test_bgp_robustness import fuzz_inputs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

AGENT, PORT = "127.0.0.10", 1795
FUZZER, STEADY = "127.0.0.20", "127.0.0.21"
OUR_AS, THEIR_AS = 65010, 65020


def apsv_session(peer: str, session: int) -> dict[str, Any]:
    return {
        "session": session,
        "listen": f"{AGENT}:{PORT}",
        "peer": peer,
        "local_as": OUR_AS,
        "peer_as": THEIR_AS,
        "router_id": "10.0.0.10",
        "hold_time": 9,
        "idle_hold_time": 0.2,
        "max_idle_hold_time": 0.4,  # no damping of the deliberate resets
        "ebgp_requires_policy": False,  # the test exchanges everything (RFC 8212 off, as the peers have it)
    }


def our_open(hold: int = 9) -> bytes:
    caps = bytes.fromhex("0206010400010001" + f"02064104{THEIR_AS:08x}")  # MP ipv4-unicast, 4-octet AS
    body = struct.pack("!BHH4sB", 4, 23456, hold, socket.inet_aton("10.0.0.20"), len(caps)) + caps
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), 1) + body


def read_messages(s: socket.socket, until: float) -> list[tuple[int, bytes]]:
    """BGP messages from the socket until a NOTIFICATION, EOF or the deadline."""
    buf = b""
    out: list[tuple[int, bytes]] = []
    while time.monotonic() < until:
        s.settimeout(max(0.01, until - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 19 and len(buf) >= int.from_bytes(buf[16:18], "big"):
            n = int.from_bytes(buf[16:18], "big")
            out.append((buf[18], buf[19:n]))
            buf = buf[n:]
            if out[-1][0] == 3:
                return out
    return out


def expected(raw: bytes, as_open: bool) -> tuple[int, int] | None:
    """What the BGP stack, in process, answers to these bytes: the NOTIFICATION's (code, subcode)."""
    cfg = BgpSessionConfig(
        local_as=OUR_AS, router_id="10.0.0.10", peer_as=THEIR_AS, peer_address=FUZZER, hold_time=9, passive=True
    )
    s = BgpSession(cfg)
    s.start(0.0)
    s.connection_made(0.0)
    sent: list[bytes] = []
    if not as_open:
        sent += [e.data for e in s.data_received(our_open(), 0.1) if isinstance(e, Send)]
        sent += [e.data for e in s.data_received(encode_message(Keepalive()), 0.2) if isinstance(e, Send)]
        assert s.state.value == "Established"
        sent = []
    sent += [e.data for e in s.data_received(raw, 0.3) if isinstance(e, Send)]
    for msg in sent:
        if msg[18] == 3:
            return msg[19], msg[20]
    return None


class Steady(threading.Thread):
    """A well-behaved peer that keeps its session up (KEEPALIVE every second) throughout."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.notifications: list[bytes] = []
        self.established = threading.Event()

    def run(self) -> None:
        s = socket.create_connection((AGENT, PORT), source_address=(STEADY, 0), timeout=10)
        s.sendall(our_open())
        got = read_messages(s, time.monotonic() + 5)
        assert [t for t, _ in got][:2] == [1, 4], got
        s.sendall(encode_message(Keepalive()))
        self.established.set()
        while not self.stop.is_set():
            s.sendall(encode_message(Keepalive()))
            for t, body in read_messages(s, time.monotonic() + 1.0):
                if t == 3:
                    self.notifications.append(body)
        s.close()


@pytest.fixture(scope="module")
def setup(ray_cluster: Any) -> Iterator[tuple[Any, Any]]:
    from apsv.runtime.cluster import deploy

    dep = deploy(
        [ProtocolPlan("bgp", min_instances=2, max_instances=2, policy="fixed")], suffix="-wire", run_loop=False
    )
    cfg = parse_config(
        {"tenant": 5, "vrouters": [{"id": 1, "bgp": [apsv_session(FUZZER, 1), apsv_session(STEADY, 2)]}]}
    )
    agent = create_agent_actor(cfg, multiplexer_name=dep.multiplexer_name, namespace=NAMESPACE)
    ray.get(agent.start.remote())
    yield dep, agent
    with contextlib.suppress(Exception):
        ray.get(agent.stop.remote(), timeout=20)
    ray.kill(agent)
    dep.stop()


def state_of(dep: Any, key: tuple[int, int, int, int]) -> str:
    iid = ray.get(dep.multiplexer.route_of.remote(key))
    h = ray.get(dep.vpsm.instance_handles.remote())[iid]
    return str(ray.get(h.session_info.remote(key))["state"])


def test_fuzz_corpora_on_the_wire(setup: tuple[Any, Any]) -> None:
    dep, agent = setup
    fuzz_key, steady_key = (5, 1, 1, 1), (5, 1, 1, 2)
    steady = Steady()
    steady.start()
    assert steady.established.wait(10)
    inputs = fuzz_inputs()
    results = []
    try:
        for name, raw in inputs:
            as_open = len(raw) >= 19 and raw[18] == 1
            want = expected(raw, as_open)
            wait_for("fuzzed session ready", lambda: state_of(dep, fuzz_key) == "Active", timeout=15, every=0.05)
            s = socket.create_connection((AGENT, PORT), source_address=(FUZZER, 0), timeout=5)
            try:
                if not as_open:
                    s.sendall(our_open())
                    got = read_messages(s, time.monotonic() + 5)
                    assert [t for t, _ in got][:2] == [1, 4], (name, got)
                    s.sendall(encode_message(Keepalive()))
                    wait_for("Established", lambda: state_of(dep, fuzz_key) == "Established", timeout=5, every=0.05)
                s.sendall(raw)
                # Keepalives, and (for an OPEN sent first) APSV's own OPEN, are not answers.
                answer = [
                    (t, b)
                    for t, b in read_messages(s, time.monotonic() + (2.0 if want else 1.0))
                    if t not in (1, 4) or (not as_open and t == 1)
                ]
            finally:
                s.close()
            got_note = (answer[-1][1][0], answer[-1][1][1]) if answer and answer[-1][0] == 3 else None
            results.append((name, want, got_note))
            assert got_note == want, (name, want, answer)
            assert not [t for t, _ in answer if t not in (2, 3)], (name, answer)  # nothing but that
        # The other session never noticed.
        assert steady.notifications == [] and state_of(dep, steady_key) == "Established"
    finally:
        steady.stop.set()
        steady.join(10)
    # Every input got a NOTIFICATION on the wire or a silent RFC 7606 repair; the corpora are
    # mostly header errors (GoBGP's bad-length inputs) and OPEN errors.
    codes = [r[2] for r in results if r[2] is not None]
    assert len(codes) >= 11 and all(c[0] in (C.ERR_HEADER, C.ERR_OPEN, C.ERR_UPDATE) for c in codes)
    # No instance died; the agent is healthy.
    stats = ray.get(dep.multiplexer.stats.remote())
    assert stats["recoveries"] == 0
    loads = [ray.get(h.load.remote()) for h in ray.get(dep.vpsm.instance_handles.remote()).values()]
    assert sum(x["bad_frames"] + x["foreign"] for x in loads) == 0
    status = ray.get(agent.status.remote())
    assert status["counters"]["connections_accepted"] == len(inputs) + 1
    # its client is registered for its tenant, and opened only that tenant's sessions
    assert tenant_of(status["client_name"]) == 5 and stats["tenant_sessions"] == {"5": 2}
    assert stats["tenant_refusals"] == 0

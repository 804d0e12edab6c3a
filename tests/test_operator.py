"""What an operator relies on, against real daemons: FRR restarting with graceful restart keeps
its routes in APSV (stale, then swept), and without it they go at once; TCP MD5 and GTSM.

The APSV side is one sans-I/O BGP session on a real socket (`tests/session_driver.py`), so the
test sees the stack's own events in order, with their times.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apsv.agent.tcp import listening_socket
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.fsm import State
from apsv.bgp.graceful_restart import GracefulRestartEvent
from apsv.bgp.session import RoutesChanged
from apsv.stack import StateChanged
from tests import peers
from tests.session_driver import SessionDriver

pytestmark = [pytest.mark.operator, pytest.mark.peer]

N4 = 1000
V4 = (1, 1)
FRR = peers.SPECS["frr"]
GR_LINES = ("bgp graceful-restart", "bgp graceful-restart preserve-fw-state")


def apsv_config(
    port_offset: int, graceful_restart: bool, idle_hold_time: float = 0.2
) -> tuple[BgpSessionConfig, tuple[str, int]]:
    listen = (peers.APSV_ADDR, peers.APSV_PORT + port_offset)
    cfg = BgpSessionConfig(
        local_as=peers.APSV_AS,
        router_id="10.0.0.10",
        peer_as=FRR.asn,
        peer_address=FRR.addr,
        passive=True,
        hold_time=peers.HOLD,
        families=["ipv4-unicast"],
        graceful_restart_time=120 if graceful_restart else None,
        idle_hold_time=idle_hold_time,
        next_hop_self="198.51.100.10",
    )
    return cfg, listen


def withdrawals(d: SessionDriver, since: float) -> list[float]:
    return [t for t, e in d.seen(RoutesChanged, since) for c in e.changes if c.attributes is None]


@pytest.fixture
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("operator")


def established_with(d: SessionDriver, n: int) -> None:
    peers.wait_for(
        f"FRR's {n} prefixes in APSV",
        lambda: d.call(lambda s: s.state is State.ESTABLISHED and s.prefix_count() == n),
        timeout=60,
    )


def test_frr_restarting_gracefully_keeps_its_routes_stale_until_end_of_rib(run_dir: Path) -> None:
    # APSV accepts FRR back after 4 s: FRR 8.4 without zebra sends its End-of-RIB before its
    # `network` routes when a session comes up within ~3 s of its start (measured here), and a
    # receiving speaker then rightly sweeps them all - FRR's restart is not graceful before that
    cfg, listen = apsv_config(30, graceful_restart=True, idle_hold_time=4.0)
    with SessionDriver(cfg, listen) as d:
        frr = peers.start_frr(run_dir, N4, 0, target=listen, router_lines=GR_LINES)
        try:
            established_with(d, N4)
            n = d.call(lambda s: s.negotiated)
            assert n is not None and n.graceful_restart and V4 in n.peer_gr_forwarding, n
            # kill -9 bgpd and start it again, now announcing 100 fewer prefixes
            t_kill = time.monotonic()
            frr.extra["restart"](N4 - 100)
            peers.wait_for(
                "the stale routes swept",
                lambda: d.seen(GracefulRestartEvent, t_kill)[-1][1].phase == "swept",
                timeout=90,
            )
            established_with(d, N4 - 100)
            phases = [(e.phase, e.routes) for _, e in d.seen(GracefulRestartEvent, t_kill)]
            assert phases[0] == ("retained", N4) and phases[-1] == ("swept", 100), phases
            # nothing was withdrawn before End-of-RIB; then exactly what FRR no longer announces
            t_swept = d.seen(GracefulRestartEvent, t_kill)[-1][0]
            gone = withdrawals(d, t_kill)
            assert len(gone) == 100 and min(gone) >= t_swept
            ups = [t for t, e in d.seen(StateChanged, t_kill) if e.new == State.ESTABLISHED.value]
            assert ups and ups[0] < t_swept
            assert d.call(lambda s: not s.stale and "gr_stale" not in s.timers)
        finally:
            frr.stop()


def test_without_graceful_restart_frrs_routes_are_withdrawn_at_once(run_dir: Path) -> None:
    cfg, listen = apsv_config(31, graceful_restart=False)
    with SessionDriver(cfg, listen) as d:
        frr = peers.start_frr(run_dir, N4, 0, target=listen, router_lines=GR_LINES)
        try:
            established_with(d, N4)
            assert d.call(lambda s: s.negotiated is not None and not s.negotiated.graceful_restart)
            t_kill = time.monotonic()
            frr.extra["restart"](N4)
            established_with(d, N4)
            gone = withdrawals(d, t_kill)
            ups = [t for t, e in d.seen(StateChanged, t_kill) if e.new == State.ESTABLISHED.value]
            assert len(gone) == N4 and max(gone) < ups[0] and not d.seen(GracefulRestartEvent)
        finally:
            frr.stop()


def test_md5_and_gtsm_with_frr(run_dir: Path) -> None:
    """TCP MD5 (RFC 2385) and GTSM (RFC 5082) on the agent's listening socket
    (`apsv.agent.tcp`): with FRR's `neighbor X password` the right key establishes and a wrong
    one never does; with `ttl-security hops 1` on both sides it establishes, and APSV drops FRR's
    segments when FRR sends them with an ordinary TTL."""
    cases = [
        # (FRR's neighbor lines, APSV's MD5 key, APSV's GTSM hops, establishes)
        (("password s3cret-key",), b"s3cret-key", None, True),
        (("password s3cret-key",), b"another-key", None, False),
        (("ttl-security hops 1",), None, 1, True),
        ((), None, 1, False),
    ]
    for i, (lines, key, hops, ok) in enumerate(cases):
        cfg, listen = apsv_config(40 + i, graceful_restart=False)
        sock = listening_socket(None, *listen, {FRR.addr: key} if key else {}, hops)
        with SessionDriver(cfg, listen, sock) as d:
            frr = peers.start_frr(run_dir / f"case{i}", 10, 0, target=listen, neighbor_lines=lines)
            try:
                if ok:
                    established_with(d, 10)
                    assert frr.established()
                else:
                    time.sleep(8)  # FRR retries every second
                    assert d.call(lambda s: s.state is not State.ESTABLISHED and s.counters["opens_sent"] == 0)
                    assert not frr.established()
            finally:
                frr.stop()

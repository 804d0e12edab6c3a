"""What an operator relies on, against real daemons: FRR restarting with graceful restart keeps
its routes in APSV (stale, then swept), and without it they go at once; with long-lived graceful
restart they stay past its restart time, marked LLGR_STALE; TCP MD5 and GTSM.

The APSV side is one sans-I/O BGP session on a real socket (`tests/session_driver.py`), so the
test sees the stack's own events in order, with their times.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apsv.agent.tcp import listening_socket
from apsv.bgp import constants as C
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.events import RoutesChanged
from apsv.bgp.fsm import State
from apsv.bgp.graceful_restart import GracefulRestartEvent
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import StateChanged
from tests import peers
from tests.session_driver import SessionDriver

pytestmark = [pytest.mark.operator, pytest.mark.peer]

N4 = 1000
V4 = (1, 1)
FRR = peers.SPECS["frr"]
GR_LINES = ("bgp graceful-restart", "bgp graceful-restart preserve-fw-state")


def apsv_config(
    port_offset: int, graceful_restart: bool, idle_hold_time: float = 0.2, long_lived_stale_time: int | None = None
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
        long_lived_stale_time=long_lived_stale_time,
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
    # graceful restart on APSV's side, not on FRR's: FRR (a helper by default) lists no family
    # it would restart gracefully, so nothing is kept
    cfg, listen = apsv_config(31, graceful_restart=True)
    with SessionDriver(cfg, listen) as d:
        frr = peers.start_frr(run_dir, N4, 0, target=listen)
        try:
            established_with(d, N4)
            assert d.call(lambda s: s.negotiated is not None and not s.negotiated.peer_gr_families)
            t_kill = time.monotonic()
            frr.extra["restart"](N4)
            established_with(d, N4)
            gone = withdrawals(d, t_kill)
            ups = [t for t, e in d.seen(StateChanged, t_kill) if e.new == State.ESTABLISHED.value]
            assert len(gone) == N4 and max(gone) < ups[0] and not d.seen(GracefulRestartEvent)
        finally:
            frr.stop()


def test_frr_not_back_in_its_restart_time_keeps_its_routes_long_lived_marked_llgr_stale(run_dir: Path) -> None:
    """RFC 9494 with FRR as the restarting speaker (`bgp long-lived-graceful-restart stale-time`):
    bgpd killed and not started again; past FRR's 3 s restart time its routes stay, now carrying
    LLGR_STALE, and the 100 it marked NO_LLGR go; past the 12 s long-lived stale time, all go."""
    cfg, listen = apsv_config(32, graceful_restart=True, long_lived_stale_time=3600)
    prefixes = peers.v4_prefixes(FRR.v4_base, N4)
    nets = [f"network {p}" for p in prefixes[:-100]] + [f"network {p} route-map NOLLGR" for p in prefixes[-100:]]
    lines = (*GR_LINES, "bgp graceful-restart restart-time 3", "bgp long-lived-graceful-restart stale-time 12")
    with SessionDriver(cfg, listen) as d:
        frr = peers.start_frr(
            run_dir,
            N4,
            0,
            target=listen,
            router_lines=lines,
            network_lines=tuple(nets),
            extra_config="route-map NOLLGR permit 10\n set community no-llgr\n!",
        )
        try:
            established_with(d, N4)
            n = d.call(lambda s: s.negotiated)
            assert n is not None and n.long_lived and n.llgr_stale_time(V4) == 12, n
            assert n.peer_restart_time == 3 and V4 in n.peer_llgr_forwarding, n
            t_kill = time.monotonic()
            frr.proc.kill()
            frr.proc.wait(timeout=10)
            peers.wait_for(
                "the long-lived phase",
                lambda: any(e.phase == "long-lived" for _, e in d.seen(GracefulRestartEvent, t_kill)),
                timeout=30,
            )
            t_long = next(t for t, e in d.seen(GracefulRestartEvent, t_kill) if e.phase == "long-lived")
            assert t_long - t_kill >= 2.5  # not before FRR's restart time
            kept = d.call(lambda s: [pa for _, pa in s.adj_in[V4].routes.items()])
            assert len(kept) == N4 - 100
            assert all(C.COMMUNITY_LLGR_STALE in (pa.get(C.ATTR_COMMUNITIES) or ()) for pa in kept)
            gone = withdrawals(d, t_kill)
            assert len(gone) == 100 and min(gone) >= t_long - 0.01  # the NO_LLGR routes, no sooner
            peers.wait_for(
                "the long-lived stale time over",
                lambda: d.call(lambda s: s.prefix_count() == 0),
                timeout=40,
            )
            phases = [(e.phase, e.routes) for _, e in d.seen(GracefulRestartEvent, t_kill)]
            assert phases == [("retained", N4), ("long-lived", N4 - 100), ("expired", N4 - 100)], phases
            t_end = d.seen(GracefulRestartEvent, t_kill)[-1][0]
            assert t_end - t_long >= 11.5
        finally:
            frr.stop()


def test_md5_with_frr_and_bird_and_gtsm_with_frr(run_dir: Path) -> None:
    """TCP MD5 (RFC 2385) and GTSM (RFC 5082) on the agent's listening socket
    (`apsv.agent.tcp`): with FRR's `neighbor X password` and BIRD's `password` the right key
    establishes and a wrong one never does; with `ttl-security hops 1` on both sides it
    establishes, and APSV drops FRR's segments when FRR sends them with an ordinary TTL."""
    bird = peers.SPECS["bird"]
    cases = [
        # (the daemon, its configuration lines, APSV's MD5 key, APSV's GTSM hops, establishes)
        ("frr", ("password s3cret-key",), b"s3cret-key", None, True),
        ("frr", ("password s3cret-key",), b"another-key", None, False),
        ("bird", ('password "s3cret-key";',), b"s3cret-key", None, True),
        ("bird", ('password "s3cret-key";',), b"another-key", None, False),
        ("frr", ("ttl-security hops 1",), None, 1, True),
        ("frr", (), None, 1, False),
    ]
    for i, (name, lines, key, hops, ok) in enumerate(cases):
        spec = FRR if name == "frr" else bird
        cfg, listen = apsv_config(40 + i, graceful_restart=False)
        cfg = cfg.model_copy(update={"peer_as": spec.asn, "peer_address": spec.addr})
        sock = listening_socket(None, *listen, {spec.addr: key} if key else {}, hops)
        with SessionDriver(cfg, listen, sock) as d:
            if name == "frr":
                daemon = peers.start_frr(run_dir / f"case{i}", 10, 0, target=listen, neighbor_lines=lines)
            else:
                daemon = peers.start_bird(run_dir / f"case{i}", 10, 0, target=listen, protocol_lines=lines)
            try:
                if ok:
                    established_with(d, 10)
                    assert daemon.established()
                else:
                    time.sleep(8)  # the daemons retry every second
                    assert d.call(lambda s: s.state is not State.ESTABLISHED and s.counters["opens_sent"] == 0)
                    assert not daemon.established()
            finally:
                daemon.stop()


# The same inbound policy in FRR's words and in APSV's, on the same feed from BIRD.
FRR_POLICY = """
ip prefix-list BOGUS seq 5 permit 100.100.0.0/16 le 32
ip prefix-list ANY24 seq 5 permit 0.0.0.0/0 ge 24 le 24
bgp community-list standard C1 permit 65002:1
bgp large-community-list standard L7 permit 65002:7:7
bgp as-path access-list PREPENDED permit ^65002_65002_
route-map IN deny 10
 match ip address prefix-list BOGUS
route-map IN permit 20
 match community C1
 set local-preference 200
 set community 65010:100 additive
route-map IN permit 30
 match as-path PREPENDED
 set metric 10
route-map IN deny 40
 match large-community L7
route-map IN permit 50
 match ip address prefix-list ANY24
 set as-path prepend 65099
"""
APSV_POLICY = {
    "prefix_lists": {
        "BOGUS": {"entries": [{"seq": 5, "action": "permit", "prefix": "100.100.0.0/16", "le": 32}]},
        "ANY24": {"entries": [{"seq": 5, "action": "permit", "prefix": "0.0.0.0/0", "ge": 24, "le": 24}]},
    },
    "community_lists": {"C1": {"entries": [{"action": "permit", "communities": ["65002:1"]}]}},
    "large_community_lists": {"L7": {"entries": [{"action": "permit", "communities": ["65002:7:7"]}]}},
    "as_path_lists": {"PREPENDED": {"entries": [{"action": "permit", "regex": "^65002_65002_"}]}},
    "route_maps": {
        "IN": {
            "entries": [
                {"seq": 10, "action": "deny", "match": {"prefix_list": "BOGUS"}},
                {
                    "seq": 20,
                    "action": "permit",
                    "match": {"community": "C1"},
                    "set": {"local_preference": 200, "community": ["65010:100"], "community_additive": True},
                },
                {"seq": 30, "action": "permit", "match": {"as_path": "PREPENDED"}, "set": {"med": 10}},
                {"seq": 40, "action": "deny", "match": {"large_community": "L7"}},
                {"seq": 50, "action": "permit", "match": {"prefix_list": "ANY24"}, "set": {"as_path_prepend": [65099]}},
            ]
        }
    },
}
# BIRD gives each /16 of its 10,000 /24s (100.96.0.0 - 100.135.255.0) different attributes
BIRD_FEED_FILTER = """
filter feed {
  if net ~ [ 100.96.0.0/14+, 100.112.0.0/14+ ] then bgp_community.add((65002,1));
  if net ~ [ 100.97.0.0/16+, 100.100.0.0/14+, 100.120.0.0/13+ ] then
    { bgp_path.prepend(65002); bgp_path.prepend(65002); }
  if net ~ [ 100.98.0.0/15+, 100.104.0.0/13+, 100.124.0.0/14+ ] then bgp_med = 50;
  if net ~ [ 100.99.0.0/16+, 100.108.0.0/14+, 100.128.0.0/13+ ] then bgp_large_community.add((65002,7,7));
  accept;
}
"""


def start_bird_feed(run: Path, n4: int, apsv: tuple[str, int], frr_port: int) -> peers.Daemon:
    """BIRD announcing n4 /24s to APSV (it connects) and to FRR (it listens on frr_port)."""
    spec = peers.SPECS["bird"]
    routes = "\n".join(f"  route {p} blackhole;" for p in peers.v4_prefixes(spec.v4_base, n4))
    frr = peers.SPECS["frr"]
    common = f"""  hold time 9; keepalive time 3; connect retry time 1; error wait time 1, 2; multihop;
  ipv4 {{ import none; export filter feed; next hop address {peers.nh4(spec)}; }};"""
    conf = run / "bird.conf"
    conf.write_text(
        f"""router id 10.0.0.2;
log "{run}/bird.log" all;
protocol device {{ }}
protocol static s4 {{ ipv4;
{routes}
}}
{BIRD_FEED_FILTER}
protocol bgp apsv {{
  local {spec.addr} as {spec.asn};
  neighbor {apsv[0]} port {apsv[1]} as {peers.APSV_AS};
  strict bind yes;
{common}
}}
protocol bgp frr {{
  local {spec.addr} port {frr_port} as {spec.asn};
  neighbor {frr.addr} as {frr.asn};
  passive yes;
  strict bind yes;
{common}
}}
"""
    )
    sock = run / "bird.ctl"
    proc, log = peers._spawn(
        [peers.tool("bird"), "-f", "-c", str(conf), "-s", str(sock), "-P", str(run / "bird.pid")], run
    )

    def birdc(*args: str) -> str:
        return subprocess.run(
            [peers.tool("birdc"), "-s", str(sock), *args], capture_output=True, text=True, check=True
        ).stdout

    peers.wait_for(
        "bird control socket", peers._running(proc, log, lambda: "BIRD" in birdc("show", "status")), timeout=20
    )
    return peers.Daemon(spec, run, proc, log)


def frr_loc_rib(frr: peers.Daemon) -> dict[str, tuple[Any, ...]]:
    out = json.loads(frr.extra["vtysh"]("show bgp ipv4 unicast json detail"))
    rows = {}
    for prefix, entries in out.get("routes", {}).items():
        paths = [p for p in entries if "aspath" in p]
        best = next((p for p in paths if p.get("bestpath", {}).get("overall")), None)
        if best is None:
            continue
        rows[prefix] = (
            best.get("locPrf", 100),
            best.get("metric"),  # the MED
            best["aspath"].get("string", ""),
            tuple(sorted(best.get("community", {}).get("list", []))),
            tuple(sorted(best.get("largeCommunity", {}).get("list", []))),
        )
    return rows


def apsv_loc_rib(s: BgpSession) -> dict[str, tuple[Any, ...]]:
    from apsv.bgp.nlri import prefix_str
    from apsv.bgp.policy_lists import as_path_text, community_text, large_community_text

    rows = {}
    for key, attrs, _rib in s.loc_rib[(1, 1)].items():
        rows[prefix_str(key, 1)] = (
            attrs.local_pref if attrs.local_pref is not None else 100,
            attrs.med,
            as_path_text(attrs.as_path),
            tuple(sorted(community_text(c) for c in attrs.get(C.ATTR_COMMUNITIES, ()))),
            tuple(sorted(large_community_text(c) for c in attrs.get(C.ATTR_LARGE_COMMUNITIES, ()))),
        )
    return rows


def test_the_same_policy_in_frr_and_in_apsv_gives_the_same_loc_rib(run_dir: Path) -> None:
    n4 = 10_000
    cfg, listen = apsv_config(50, graceful_restart=False)
    bird_spec = peers.SPECS["bird"]
    cfg = BgpSessionConfig.model_validate(
        {
            **cfg.model_dump(),
            "peer_as": bird_spec.asn,
            "peer_address": bird_spec.addr,
            "policy": APSV_POLICY,
            "import_policy": "IN",
            "ebgp_requires_policy": True,
        }
    )
    frr_port = peers.APSV_PORT + 51
    with SessionDriver(cfg, listen) as d:
        (run_dir / "bird").mkdir()
        bird = start_bird_feed(run_dir / "bird", n4, listen, frr_port)
        frr = peers.start_frr(
            run_dir,
            0,
            0,
            target=(bird_spec.addr, frr_port),
            remote_as=bird_spec.asn,
            hold=9,
            neighbor_lines=("route-map IN in",),
            extra_config=FRR_POLICY,
        )
        try:
            peers.wait_for("APSV's session up", lambda: d.call(lambda s: s.state is State.ESTABLISHED), timeout=60)
            peers.wait_for("FRR's session up", frr.established, timeout=60)

            def settled() -> bool:
                a, f = d.call(apsv_loc_rib), frr_loc_rib(frr)
                return len(a) == len(f) > 0 and d.call(lambda s: s.counters["updates_in"] > 0) and a == f

            try:
                peers.wait_for("the two Loc-RIBs equal", settled, timeout=60, every=1.0)
            except TimeoutError:
                a, f = d.call(apsv_loc_rib), frr_loc_rib(frr)
                diff = sorted((set(a.items()) ^ set(f.items())), key=repr)[:6]
                raise AssertionError(f"APSV {len(a)} routes, FRR {len(f)}; differing: {diff}") from None
            a = d.call(apsv_loc_rib)
            # every branch of the route map was taken: refused, rewritten each way, untouched
            assert 0 < len(a) < n4 and {v[0] for v in a.values()} == {100, 200}
            assert {v[1] for v in a.values()} >= {None, 10, 50} and any("65099" in v[2] for v in a.values())
        finally:
            frr.stop()
            bird.stop()


# The same outbound policy in both: FRR and APSV (both AS 65003) originate the same 2,000
# prefixes in four groups with the same attributes and announce them through it.
GROUPS = [peers.v4_prefixes(f"10.{40 + g}.0.0", 500) for g in range(4)]  # 10.40.0.0/24 ... 10.43.x
FRR_OUT = """
ip prefix-list DROP seq 5 permit 10.40.0.0/17 le 24
ip prefix-list P3 seq 5 permit 10.43.0.0/16 le 24
bgp community-list standard C2 permit 65003:2
route-map OUT deny 10
 match ip address prefix-list DROP
route-map OUT permit 20
 match community C2
 set metric 42
 set community 65003:200 additive
 set ip next-hop 198.51.100.3
route-map OUT permit 30
 match ip address prefix-list P3
 set as-path prepend 65003 65003
 set ip next-hop 198.51.100.3
route-map OUT permit 40
 set large-community 65003:1:1
 set ip next-hop 198.51.100.3
""" + "".join(
    f"route-map G{g} permit 10\n set community 65003:{g}\n" + (" set metric 5\n" if g == 1 else "") for g in range(4)
)
APSV_OUT = {
    "prefix_lists": {
        "DROP": {"entries": [{"seq": 5, "action": "permit", "prefix": "10.40.0.0/17", "le": 24}]},
        "P3": {"entries": [{"seq": 5, "action": "permit", "prefix": "10.43.0.0/16", "le": 24}]},
    },
    "community_lists": {"C2": {"entries": [{"action": "permit", "communities": ["65003:2"]}]}},
    "route_maps": {
        "OUT": {
            "entries": [
                {"seq": 10, "action": "deny", "match": {"prefix_list": "DROP"}},
                {
                    "seq": 20,
                    "action": "permit",
                    "match": {"community": "C2"},
                    "set": {"med": 42, "community": ["65003:200"], "community_additive": True},
                },
                {
                    "seq": 30,
                    "action": "permit",
                    "match": {"prefix_list": "P3"},
                    "set": {"as_path_prepend": [65003, 65003]},
                },
                {"seq": 40, "action": "permit", "set": {"large_community": ["65003:1:1"]}},
            ]
        }
    },
}


def test_the_same_export_policy_in_frr_and_in_apsv_announces_the_same(run_dir: Path) -> None:
    from tests.test_session import pair

    receiver_cfg, listen = apsv_config(60, graceful_restart=False)  # AS 65010, accepts everything
    frr_networks = tuple(f"network {p} route-map G{g}" for g, ps in enumerate(GROUPS) for p in ps)
    with SessionDriver(receiver_cfg, listen) as d:
        frr = peers.start_frr(
            run_dir, 0, 0, target=listen, extra_config=FRR_OUT, network_lines=frr_networks, out_map="OUT"
        )
        # APSV as the same AS 65003, announcing the same groups through the same policy, to a
        # receiver configured like the one FRR talks to
        apsv_cfg = BgpSessionConfig.model_validate(
            {
                "local_as": FRR.asn,
                "router_id": "10.0.0.3",
                "peer_as": peers.APSV_AS,
                "peer_address": peers.APSV_ADDR,
                "next_hop_self": peers.nh4(FRR),
                "announce": [
                    # FRR's `network` routes carry MED 0 (their metric) unless a route map sets it
                    {"prefixes": ps, "communities": [f"65003:{g}"], "med": 5 if g == 1 else 0}
                    for g, ps in enumerate(GROUPS)
                ],
                "policy": APSV_OUT,
                "export_policy": "OUT",
            }
        )
        try:
            _, receiver, _, _ = pair(apsv_cfg, receiver_cfg.model_copy(update={"peer_address": FRR.addr}))
            expected = apsv_loc_rib(receiver)
            assert 0 < len(expected) < 2000
            peers.wait_for(
                "FRR's announcements", lambda: d.call(lambda s: len(s.loc_rib_table((1, 1)))) == len(expected), 60
            )
            got = d.call(apsv_loc_rib)
            diff = sorted(set(got.items()) ^ set(expected.items()), key=repr)[:6]
            assert got == expected, diff
            nh = {r[1] for r in d.call(lambda s: s.loc_rib_table((1, 1)))}
            assert nh == {r[1] for r in receiver.loc_rib_table((1, 1))} == {peers.nh4(FRR)}
            # every branch taken: MED 42 with the added community, prepends, the large community
            assert {v[1] for v in got.values()} == {0, 5, 42} and any(v[4] for v in got.values())
            assert any(v[2] == "65003 65003 65003" for v in got.values())
        finally:
            frr.stop()

"""Real routing daemons as BGP peers of an APSV speaker, for the interop tests and benchmarks.

Each launcher writes the daemon's configuration into its own run directory, starts it by
hand (no systemd), and gives back a `Daemon` that can query the daemon's own view (vtysh JSON,
birdc, the gobgp CLI, ExaBGP's API output) and stop it by PID. Every address is on 127.0.0.0/8;
next hops are in 198.51.100.0/24 (and 2001:db8:ffff::/48), because the daemons refuse 127.x.

    APSV agent listens on 127.0.0.10:1790 (and connects from there for active sessions)
    GoBGP  AS 65001  127.0.0.1      BIRD   AS 65002  127.0.0.2
    FRR    AS 65003  127.0.0.3      ExaBGP AS 65004  127.0.0.4
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apsv.bench.daemons import stop_process
from apsv.bench.daemons import vtysh as frr_vtysh

APSV_ADDR = "127.0.0.10"
APSV_PORT = 1790
APSV_AS = 65010
HOLD = 3  # seconds: the smallest RFC 4271 allows, so "three hold times" is quick to wait out


@dataclass(frozen=True)
class PeerSpec:
    name: str
    asn: int
    addr: str
    v4_base: str
    v6_base: str | None  # None: this daemon announces no IPv6 here


SPECS = {
    "gobgp": PeerSpec("gobgp", 65001, "127.0.0.1", "100.64.0.0", "2001:db8:1::"),
    "bird": PeerSpec("bird", 65002, "127.0.0.2", "100.96.0.0", "2001:db8:2::"),
    "frr": PeerSpec("frr", 65003, "127.0.0.3", "100.128.0.0", "2001:db8:3::"),
    "exabgp": PeerSpec("exabgp", 65004, "127.0.0.4", "100.192.0.0", None),
}


def v4_prefixes(base: str, n: int, length: int = 24) -> list[str]:
    b = int(ipaddress.IPv4Address(base))
    step = 1 << (32 - length)
    return [f"{ipaddress.IPv4Address(b + i * step)}/{length}" for i in range(n)]


def v6_prefixes(base: str, n: int) -> list[str]:
    b = int(ipaddress.IPv6Address(base))
    return [f"{ipaddress.IPv6Address(b + (i << 80))}/48" for i in range(n)]


def nh4(spec: PeerSpec) -> str:
    return f"198.51.100.{spec.addr.rsplit('.', 1)[1]}"


def nh6(spec: PeerSpec) -> str:
    return f"2001:db8:ffff::{spec.addr.rsplit('.', 1)[1]}"


def tool(name: str) -> str:
    for d in (os.path.dirname(sys.executable), "/usr/lib/frr", "/usr/sbin", "/usr/bin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (scripts/install-peers.sh installs the test peers)")
    return found


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # not up yet
            last = e
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout}s (last: {last!r})")


@dataclass
class Daemon:
    spec: PeerSpec
    run: Path
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    # Filled by each launcher: the daemon's own view of the APSV session.
    established: Callable[[], bool] = lambda: False
    received: Callable[[str], set[str]] = lambda fam: set()  # prefixes learned from APSV
    withdraw: Callable[[list[str]], None] = lambda prefixes: None  # stop announcing these
    last_error: Callable[[], str] = lambda: ""  # the last NOTIFICATION it received, in its words
    up_since: Callable[[], str] = lambda: ""  # changes whenever the session is re-established
    withdrawable: list[str] = field(default_factory=list)  # prefixes `withdraw` can take back

    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        for p in self.extra.get("pids", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """CPU time from the scheduler (ns resolution, every thread), not utime's 10 ms steps."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for line in (task / "sched").read_text().splitlines():
                if line.startswith("se.sum_exec_runtime"):
                    total += int(float(line.split(":")[1]) * 1e6)
        return total / 1e9

    def max_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


def _spawn(cmd: list[str], run: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = run / "daemon.log"
    out = open(log, "ab")  # noqa: SIM115 - the daemon's lifetime
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=run, env=env, start_new_session=True)
    return proc, log


def _running(proc: subprocess.Popen[bytes], log: Path, check: Callable[[], Any]) -> Callable[[], Any]:
    """`check`, failing at once (with the daemon's last words) if the daemon has exited."""

    def wrapped() -> Any:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"{Path(proc.args[0]).name} exited with {proc.returncode}:\n{tail}")  # type: ignore[index,arg-type]
        return check()

    return wrapped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fresh(root: Path, name: str) -> Path:
    run = root / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    return run


# ---------------------------------------------------------------------------------------------
# GoBGP: routes are injected from an MRT TABLE_DUMP_V2 file (its CLI costs ~8 ms a route)


def write_mrt_rib(path: Path, prefixes: list[str], asn: int, next_hop4: str, next_hop6: str) -> None:
    """A minimal RFC 6396 TABLE_DUMP_V2 file: one peer, one entry per prefix."""
    ts = int(time.time())

    def record(subtype: int, body: bytes) -> bytes:
        return struct.pack("!IHHI", ts, 13, subtype, len(body)) + body

    # PEER_INDEX_TABLE: collector id, empty view name, one peer (type 2: IPv4 address, 4-octet AS).
    peers = struct.pack("!H", 1) + bytes((0x02,)) + socket.inet_aton("10.0.0.1") + socket.inet_aton("10.0.0.1")
    out = [record(1, socket.inet_aton("10.0.0.1") + struct.pack("!H", 0) + peers + struct.pack("!I", asn))]
    aspath = bytes((0x40, 2, 6, 2, 1)) + struct.pack("!I", asn)
    origin = bytes((0x40, 1, 1, 0))
    for seq, p in enumerate(prefixes):
        net = ipaddress.ip_network(p)
        plen = net.prefixlen
        nbytes = (plen + 7) // 8
        pfx = bytes((plen,)) + net.network_address.packed[:nbytes]
        if net.version == 4:
            attrs = origin + aspath + bytes((0x40, 3, 4)) + socket.inet_aton(next_hop4)
            subtype = 2
        else:
            # The full MP_REACH_NLRI form (AFI, SAFI, next hop, reserved): what GoBGP's reader expects.
            mp = struct.pack("!HBB", 2, 1, 16) + ipaddress.IPv6Address(next_hop6).packed + b"\x00"
            attrs = origin + aspath + bytes((0x80, 14, len(mp))) + mp
            subtype = 4
        entry = struct.pack("!HIH", 0, ts, len(attrs)) + attrs
        out.append(record(subtype, struct.pack("!I", seq) + pfx + struct.pack("!H", 1) + entry))
    path.write_bytes(b"".join(out))


def start_gobgp(
    root: Path, n4: int, n6: int, target: tuple[str, int] = (APSV_ADDR, APSV_PORT), api_port: int | None = None
) -> Daemon:
    spec = SPECS["gobgp"]
    nbr, port = target
    run = _fresh(root, "gobgp")
    (run / "gobgpd.toml").write_text(
        f"""[global.config]
  as = {spec.asn}
  router-id = "10.0.0.1"
  port = -1
  local-address-list = ["{spec.addr}"]

[[neighbors]]
  [neighbors.config]
    neighbor-address = "{nbr}"
    peer-as = {APSV_AS}
  [neighbors.transport.config]
    local-address = "{spec.addr}"
    remote-port = {port}
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = {HOLD}
    keepalive-interval = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"""
    )
    api_port = api_port or free_port()
    api = f"127.0.0.1:{api_port}"
    proc, log = _spawn(
        [tool("gobgpd"), "-f", "gobgpd.toml", "--api-hosts", api, "--pprof-disable", "-p", "-l", "info"], run
    )
    d = Daemon(spec, run, proc, log)

    def cli(*args: str) -> str:
        return subprocess.run(
            [tool("gobgp"), "-u", "127.0.0.1", "-p", str(api_port), *args], capture_output=True, text=True, check=True
        ).stdout

    wait_for("gobgpd API", _running(proc, log, lambda: cli("global", "-j")), timeout=20)
    all4 = v4_prefixes(spec.v4_base, n4)
    # The last 100 IPv4 routes go in through the CLI, so that they can be withdrawn through it
    # (routes injected from MRT keep the dump's peer as their source and the CLI cannot remove them).
    by_cli = all4[-100:] if n4 >= 100 else []
    prefixes = all4[: len(all4) - len(by_cli)] + (v6_prefixes(spec.v6_base, n6) if spec.v6_base and n6 else [])
    for p in by_cli:
        cli("global", "rib", "-a", "ipv4", "add", p, "nexthop", nh4(spec), "origin", "igp")
    if prefixes:
        # Twice over: the CLI can exit before gobgpd has taken the end of the stream, and a
        # repeated route is a no-op - so what is cut off is only the repeat.
        write_mrt_rib(run / "routes.mrt", prefixes + prefixes, spec.asn, nh4(spec), nh6(spec))

        def injected() -> bool:
            cli("mrt", "inject", "global", str(run / "routes.mrt"))
            time.sleep(0.3)
            have = 0
            for afi in ("ipv4", "ipv6"):
                m = re.search(r"Destination: (\d+)", cli("global", "rib", "summary", "-a", afi))
                have += int(m.group(1)) if m else 0
            return have >= len(prefixes) + len(by_cli)

        wait_for("gobgp routes injected", injected, timeout=60, every=0.2)

    def neighbor() -> dict[str, Any]:
        out = json.loads(cli("neighbor", nbr, "-j"))
        return dict(out[0] if isinstance(out, list) else out)

    def received(fam: str) -> set[str]:
        afi = "ipv4" if fam == "ipv4-unicast" else "ipv6"
        rows = json.loads(cli("neighbor", nbr, "adj-in", "-a", afi, "-j") or "{}")
        return set(rows) if isinstance(rows, dict) else {r["prefix"] for r in rows}

    def withdraw(ps: list[str]) -> None:
        for p in ps:
            afi = "ipv6" if ":" in p else "ipv4"
            cli("global", "rib", "-a", afi, "del", p)

    d.withdrawable = by_cli
    d.established = lambda: neighbor()["state"].get("session_state") in (6, "established", "ESTABLISHED")
    d.received = received
    d.withdraw = withdraw
    d.up_since = lambda: str(neighbor().get("timers", {}).get("state", {}).get("uptime"))
    d.last_error = lambda: log.read_text(errors="replace")
    d.extra["cli"] = cli
    d.extra["neighbor"] = neighbor
    return d


# ---------------------------------------------------------------------------------------------
# BIRD 2


def start_bird(
    root: Path,
    n4: int,
    n6: int,
    target: tuple[str, int] = (APSV_ADDR, APSV_PORT),
    protocol_lines: tuple[str, ...] = (),
) -> Daemon:
    """BIRD announcing n4 / n6 prefixes; `protocol_lines` go into its BGP protocol (e.g.
    'password "K";')."""
    spec = SPECS["bird"]
    more = "".join(f"  {line}\n" for line in protocol_lines)
    nbr, port = target
    run = _fresh(root, "bird")
    r4 = "\n".join(f"  route {p} blackhole;" for p in v4_prefixes(spec.v4_base, n4))
    r6 = "\n".join(f"  route {p} blackhole;" for p in v6_prefixes(spec.v6_base or "", n6)) if n6 else ""
    conf = run / "bird.conf"

    def write(v4: str, v6: str) -> None:
        conf.write_text(
            f"""router id 10.0.0.2;
log "{run}/bird.log" all;
protocol device {{ }}
protocol static s4 {{ ipv4;
{v4}
}}
protocol static s6 {{ ipv6;
{v6}
}}
protocol bgp apsv {{
  local {spec.addr} as {spec.asn};
  neighbor {nbr} port {port} as {APSV_AS};
  strict bind yes;
  multihop;
  hold time {HOLD};
  keepalive time 1;
  connect retry time 1;
  error wait time 1, 2;
  debug {{ states }};
{more}  ipv4 {{ import all; export where source = RTS_STATIC; next hop address {nh4(spec)}; }};
  ipv6 {{ import all; export where source = RTS_STATIC; next hop address {nh6(spec)}; }};
}}
"""
        )

    write(r4, r6)
    sock = run / "bird.ctl"
    proc, log = _spawn([tool("bird"), "-f", "-c", str(conf), "-s", str(sock), "-P", str(run / "bird.pid")], run)
    d = Daemon(spec, run, proc, log, withdrawable=v4_prefixes(spec.v4_base, n4)[:100])

    def birdc(*args: str) -> str:
        return subprocess.run(
            [tool("birdc"), "-s", str(sock), *args], capture_output=True, text=True, check=True
        ).stdout

    wait_for("bird control socket", _running(proc, log, lambda: "BIRD" in birdc("show", "status")), timeout=20)

    def proto() -> str:
        return birdc("show", "protocols", "all", "apsv")

    def received(fam: str) -> set[str]:
        table = "master4" if fam == "ipv4-unicast" else "master6"
        out = birdc("show", "route", "protocol", "apsv", "table", table)
        return set(re.findall(r"^([0-9a-f.:]+/\d+)\s", out, re.M))

    def withdraw(ps: list[str]) -> None:
        gone = set(ps)
        write(
            "\n".join(f"  route {p} blackhole;" for p in v4_prefixes(spec.v4_base, n4) if p not in gone),
            "\n".join(f"  route {p} blackhole;" for p in v6_prefixes(spec.v6_base or "", n6) if p not in gone)
            if n6
            else "",
        )
        birdc("configure")

    d.established = lambda: "Established" in proto()
    d.received = received
    d.withdraw = withdraw
    d.last_error = lambda: "\n".join(x for x in proto().splitlines() if "error" in x.lower() or "Received" in x)

    def up_since() -> str:
        # BIRD shows the session's "since" time converted from its monotonic clock at each
        # query, so it flickers by a millisecond: count the protocol's traced moves to up instead
        traced = (run / "bird.log").read_text(errors="replace")
        return str(len(re.findall(r"\bapsv: State changed to up\b", traced, re.I)))

    d.up_since = up_since
    d.extra["birdc"] = birdc
    return d


# ---------------------------------------------------------------------------------------------
# FRR bgpd, standalone (no zebra)


def start_frr(
    root: Path,
    n4: int,
    n6: int,
    target: tuple[str, int] = (APSV_ADDR, APSV_PORT),
    hold: int = HOLD,
    router_lines: tuple[str, ...] = (),
    neighbor_lines: tuple[str, ...] = (),
    netns: str | None = None,
    addr: str | None = None,
    remote_as: int = APSV_AS,
    extra_config: str = "",
    network_lines: tuple[str, ...] | None = None,
    out_map: str = "NH4",
) -> Daemon:
    """FRR bgpd announcing n4 / n6 prefixes; `router_lines` go under `router bgp` (e.g.
    "bgp graceful-restart"), `neighbor_lines` after `neighbor APSV` (e.g. "password K").
    `netns` / `addr`: bgpd runs in that network namespace, from that address. `remote_as`: the
    peer at `target` is in that AS (APSV's by default); `extra_config` ends the configuration
    (route maps, prefix lists). `network_lines` replace the n4 IPv4 `network` statements (e.g.
    "network 10.0.0.0/24 route-map SET1"); `out_map` is the IPv4 outbound route map (NH4 sets
    the next hop and nothing else).
    `d.extra["restart"](n4)` kills bgpd with SIGKILL and starts it
    again, announcing n4 IPv4 prefixes (FRR restarting, as far as its peer can tell)."""
    spec = SPECS["frr"]
    local = addr or spec.addr
    nbr, port = target
    run = _fresh(root, "frr")
    vty = run / "vty"
    vty.mkdir()
    shutil.chown(run, "frr", "frr")
    shutil.chown(vty, "frr", "frr")
    extra = "".join(f" {line}\n" for line in router_lines)
    per_neighbor = "".join(f"\n neighbor {nbr} {line}" for line in neighbor_lines)

    def write_config(n4: int) -> None:
        nets4 = "\n".join(
            f"  {line}" for line in (network_lines or [f"network {p}" for p in v4_prefixes(spec.v4_base, n4)])
        )
        nets6 = "\n".join(f"  network {p}" for p in v6_prefixes(spec.v6_base or "", n6)) if n6 else ""
        (run / "bgpd.conf").write_text(
            f"""frr defaults traditional
hostname frr-peer
log file {run}/bgpd.log critical
!
router bgp {spec.asn}
 bgp router-id 10.0.0.3
 no bgp ebgp-requires-policy
 no bgp network import-check
{extra} neighbor {nbr} remote-as {remote_as}
 neighbor {nbr} port {port}
 neighbor {nbr} update-source {local}
 neighbor {nbr} timers {max(1, hold // 3)} {hold}
 neighbor {nbr} timers connect 1{per_neighbor}
 !
 address-family ipv4 unicast
{nets4}
  neighbor {nbr} route-map {out_map} out
 exit-address-family
 !
 address-family ipv6 unicast
{nets6}
  neighbor {nbr} activate
  neighbor {nbr} route-map NH6 out
 exit-address-family
!
route-map NH4 permit 10
 set ip next-hop {nh4(spec)}
!
route-map NH6 permit 10
 set ipv6 next-hop global {nh6(spec)}
!
{extra_config}
"""
        )
        shutil.chown(run / "bgpd.conf", "frr", "frr")

    write_config(n4)
    cmd = [
        tool("bgpd"),
        "-f",
        str(run / "bgpd.conf"),
        "-Z",
        "-n",
        "-S",
        "-p",
        "0",
        "-l",
        local,
        "--vty_socket",
        str(vty),
        "-i",
        str(run / "bgpd.pid"),
        "-A",
        "127.0.0.1",
        "-P",
        "0",
    ]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc, log = _spawn(cmd, run)
    d = Daemon(spec, run, proc, log, withdrawable=v4_prefixes(spec.v4_base, n4)[:100])

    def vtysh(cmd: str) -> str:
        return frr_vtysh(vty, cmd, tool("vtysh"))

    wait_for("bgpd vty", _running(proc, log, lambda: vtysh("show bgp summary json")), timeout=20)

    def restart(n4: int) -> None:
        d.proc.kill()
        d.proc.wait(timeout=10)
        write_config(n4)
        d.proc, _ = _spawn(cmd, run)
        wait_for("bgpd vty", _running(d.proc, log, lambda: vtysh("show bgp summary json")), timeout=20)

    d.extra["restart"] = restart

    def neighbor() -> dict[str, Any]:
        return dict(json.loads(vtysh(f"show bgp neighbors {nbr} json"))[nbr])

    def received(fam: str) -> set[str]:
        afi = "ipv4" if fam == "ipv4-unicast" else "ipv6"
        out = json.loads(vtysh(f"show bgp {afi} unicast neighbors {nbr} routes json"))
        return set(out.get("routes", {}))

    def withdraw(ps: list[str]) -> None:
        cmds = ["configure terminal", f"router bgp {spec.asn}"]
        for fam in ("ipv4", "ipv6"):
            mine = [p for p in ps if (":" in p) == (fam == "ipv6")]
            if mine:
                cmds.append(f"address-family {fam} unicast")
                cmds += [f"no network {p}" for p in mine]
                cmds.append("exit-address-family")
        args = [tool("vtysh"), "--vty_socket", str(vty)]
        for c in cmds:
            args += ["-c", c]
        subprocess.run(args, capture_output=True, text=True, check=True)

    d.established = lambda: neighbor().get("bgpState") == "Established"
    d.received = received
    d.withdraw = withdraw
    d.last_error = lambda: json.dumps(
        {k: v for k, v in neighbor().items() if k.startswith(("lastNotification", "lastReset", "lastErrorCode"))}
    )
    # FRR derives its "established epoch" from now - uptime, so it flickers by a second: count instead
    d.up_since = lambda: f"{neighbor().get('connectionsEstablished')}/{neighbor().get('connectionsDropped')}"
    d.extra["vtysh"] = vtysh
    d.extra["neighbor"] = neighbor
    return d


# ---------------------------------------------------------------------------------------------
# ExaBGP (from PyPI, in the project's virtual environment)

RECEIVER = r"""
import json, os, sys, time
out = open(sys.argv[1], "a", buffering=1)
cmds = sys.argv[2]
seen = 0
import select
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0.05)
    if r:
        line = sys.stdin.readline()
        if not line:
            break
        out.write(line)
    if os.path.exists(cmds):
        lines = open(cmds).read().splitlines()
        for c in lines[seen:]:
            sys.stdout.write(c + "\n")
            sys.stdout.flush()
        seen = len(lines)
"""


def start_exabgp(root: Path, n4: int, n6: int = 0, target: tuple[str, int] = (APSV_ADDR, APSV_PORT)) -> Daemon:
    spec = SPECS["exabgp"]
    nbr, port = target
    run = _fresh(root, "exabgp")
    (run / "receiver.py").write_text(RECEIVER)
    routes = "\n".join(f"    route {p} next-hop {nh4(spec)};" for p in v4_prefixes(spec.v4_base, n4))
    (run / "exabgp.conf").write_text(
        f"""process receiver {{
  run {sys.executable} {run}/receiver.py {run}/received.jsonl {run}/commands.txt;
  encoder json;
}}
neighbor {nbr} {{
  router-id 10.0.0.4;
  local-address {spec.addr};
  local-as {spec.asn};
  peer-as {APSV_AS};
  connect {port};
  hold-time {HOLD};
  family {{ ipv4 unicast; }}
  api {{
    processes [ receiver ];
    receive {{ parsed; update; notification; }}
    neighbor-changes;
  }}
  static {{
{routes}
  }}
}}
"""
    )
    env = dict(os.environ)
    env.update(
        exabgp_daemon_user="root",
        exabgp_daemon_drop="false",
        exabgp_api_cli="false",
        exabgp_log_destination="stdout",
        exabgp_tcp_bind="",
        exabgp_api_ack="false",
    )
    proc, log = _spawn([tool("exabgp"), "server", str(run / "exabgp.conf")], run, env)
    d = Daemon(spec, run, proc, log, withdrawable=v4_prefixes(spec.v4_base, n4)[:100])
    events = run / "received.jsonl"

    def messages() -> list[dict[str, Any]]:
        if not events.exists():
            return []
        out = []
        for line in events.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def state() -> str:
        last = ""
        for m in messages():
            if m.get("type") == "state":
                last = m.get("neighbor", {}).get("state", last)
        return last

    def received(fam: str) -> set[str]:
        have: set[str] = set()
        for m in messages():
            upd = m.get("neighbor", {}).get("message", {}).get("update", {})
            for p in _exa_prefixes(upd.get("announce", {}), fam):
                have.add(p)
            for p in _exa_prefixes(upd.get("withdraw", {}), fam):
                have.discard(p)
        return have

    def withdraw(ps: list[str]) -> None:
        with open(run / "commands.txt", "a") as f:
            for p in ps:
                f.write(f"neighbor {nbr} withdraw route {p} next-hop {nh4(spec)}\n")

    def last_error() -> str:
        notes = [m for m in messages() if m.get("type") == "notification"]
        return json.dumps(notes[-1]) if notes else ""

    d.established = lambda: state() == "up"
    d.received = received
    d.withdraw = withdraw
    d.last_error = last_error
    d.up_since = lambda: str(
        sum(1 for m in messages() if m.get("type") == "state" and m["neighbor"].get("state") == "up")
    )
    return d


def _exa_prefixes(section: dict[str, Any], fam: str) -> list[str]:
    key = "ipv4 unicast" if fam == "ipv4-unicast" else "ipv6 unicast"
    found = section.get(key, {})
    out: list[str] = []
    if isinstance(found, dict):
        for v in found.values():  # announce: next hop -> [ {nlri} ]
            out += [x["nlri"] if isinstance(x, dict) else x for x in v]
    elif isinstance(found, list):  # withdraw: [ {nlri} ]
        out += [x["nlri"] if isinstance(x, dict) else x for x in found]
    return out


LAUNCHERS: dict[str, Callable[..., Daemon]] = {
    "gobgp": start_gobgp,
    "bird": start_bird,
    "frr": start_frr,
    "exabgp": start_exabgp,
}


# ---------------------------------------------------------------------------------------------
# Two network namespaces joined by a veth pair, and FRR's bfdd in one of them


@contextlib.contextmanager
def veth_pair(a: tuple[str, str, str], b: tuple[str, str, str]) -> Iterator[None]:
    """Namespaces a and b, each (namespace, device, address/24), joined by a veth pair; both
    namespaces are deleted afterwards (with everything in them)."""

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    for ns, _dev, _ip in (a, b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", a[1], "netns", a[0], "type", "veth", "peer", "name", b[1], "netns", b[0])
    try:
        for ns, dev, ip in (a, b):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns, _dev, _ip in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@dataclass
class Bfdd:
    """FRR's bfdd in a namespace, with one peer; `peer()` is its view (show bfd peers json)."""

    run: Path
    proc: subprocess.Popen[bytes]
    peer_address: str

    def peer(self) -> dict[str, Any]:
        out = subprocess.run(
            ["vtysh", "--vty_socket", str(self.run), "-c", "show bfd peers json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return next(p for p in json.loads(out) if p.get("peer") == self.peer_address)

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        shutil.rmtree(self.run, ignore_errors=True)


def start_bfdd(netns: str, local: str, peer: str, interval_ms: int = 100, detect_mult: int = 3) -> Bfdd:
    # bfdd drops to user frr: its directory must be reachable by it (pytest's tmp_path is not)
    run = Path(tempfile.mkdtemp(prefix="apsv-bfdd-", dir="/tmp"))
    run.chmod(0o755)
    shutil.chown(run, "frr", "frr")
    (run / "bfdd.conf").write_text(
        f"""frr defaults traditional
hostname frr-bfd
log file {run}/bfdd.log informational
!
bfd
 peer {peer} local-address {local}
  receive-interval {interval_ms}
  transmit-interval {interval_ms}
  detect-multiplier {detect_mult}
 !
!
"""
    )
    shutil.chown(run / "bfdd.conf", "frr", "frr")
    cmd = ["ip", "netns", "exec", netns, "/usr/lib/frr/bfdd", "-f", str(run / "bfdd.conf"), "-u", "frr", "-g", "frr"]
    cmd += ["--vty_socket", str(run), "-i", str(run / "bfdd.pid"), "--bfdctl", str(run / "bfdd.sock")]
    cmd += ["-z", str(run / "zserv.api"), "-A", "127.0.0.1", "-P", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    d = Bfdd(run, proc, peer)
    wait_for("bfdd vty", d.peer, timeout=20)
    return d

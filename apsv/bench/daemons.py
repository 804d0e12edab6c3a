"""Routing daemons for the ingest benchmark: BIRD as the announcer, FRR bgpd and GoBGP as
receivers to compare APSV with. Each runs from its own directory on 127.0.0.0/8, is started by
hand and stopped by PID; CPU comes from the scheduler (/proc/PID/task/*/sched, every thread, ns)
and peak memory from VmHWM, as ../shared/peers/README.md advises.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANNOUNCER_AS, RECEIVER_AS = 65100, 65200
NEXT_HOP = "198.51.100.100"


def _loopback(block: int, i: int) -> str:
    """The i-th host address of 127.<block>.0.0/16 (no .0 or .255 in the last octet)."""
    if not 0 <= i < 254 * 256:
        raise ValueError(f"session index {i} out of range")
    return f"127.{block}.{i // 254}.{i % 254 + 1}"


def receiver_addr(i: int) -> str:
    """Where the i-th receiving session listens (each its own address: a BIRD process holds
    one session per neighbour address and port)."""
    return _loopback(2, i)


def announcer_addr(i: int) -> str:
    return _loopback(3, i)


def agent_vrouters(n: int, port: int) -> list[dict[str, Any]]:
    """An APSV agent's virtual routers receiving as the daemons do: the i-th with one session
    from announcer_addr(i) on receiver_addr(i):port."""
    return [
        {
            "id": i + 1,
            "bgp": [
                {
                    "session": 1,
                    "listen": f"{receiver_addr(i)}:{port}",
                    "peer": announcer_addr(i),
                    "local_as": RECEIVER_AS,
                    "peer_as": ANNOUNCER_AS,
                    "router_id": "10.0.2.1",
                    "events": "state",  # no FIB deltas to a virtual router: like FRR with -Z
                    "ebgp_requires_policy": False,  # as the FRR baseline (no bgp ebgp-requires-policy)
                }
            ],
        }
        for i in range(n)
    ]


def prefixes(n: int, base: str = "100.64.0.0") -> list[str]:
    b = int(ipaddress.IPv4Address(base))
    return [f"{ipaddress.IPv4Address(b + (i << 8))}/24" for i in range(n)]


def which(name: str) -> str:
    for d in ("/usr/lib/frr", "/usr/sbin", "/usr/bin"):
        if (Path(d) / name).exists():
            return str(Path(d) / name)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (scripts/install-peers.sh installs it)")
    return found


def proc_cpu_seconds(pid: int) -> float:
    total = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                for line in (task / "sched").read_text().splitlines():
                    if line.startswith("se.sum_exec_runtime"):
                        total += float(line.split(":")[1]) / 1e3  # ms -> s
    return total


def ray_daemon_pids() -> list[int]:
    """Ray's own processes of the cluster this driver started (raylet, GCS, and the agents and
    monitors beside them): their CPU counts towards what the offload path costs."""
    try:
        import ray._private.worker as w

        node: Any = w._global_node
        return [int(i.process.pid) for infos in node.all_processes.values() for i in infos if i.process is not None]
    except Exception:  # not the driver that started Ray, or Ray's private layout changed
        return []


def proc_max_rss_mb(pid: int) -> float:
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Proc:
    name: str
    run: Path
    popen: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """True while running; raises, with the daemon's last words, once it has exited."""
        if self.popen.poll() is not None:
            log = (self.run / "out.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{log}")
        return True

    def stop(self) -> None:
        stop_process(self.popen)
        shutil.rmtree(self.run, ignore_errors=True)


def stop_process(popen: subprocess.Popen[Any]) -> None:
    """SIGTERM, ten seconds to exit, then SIGKILL."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


def vtysh(vty_dir: Path, command: str, vtysh_path: str | None = None) -> str:
    """One vtysh command against the daemons whose sockets are in `vty_dir`."""
    cmd = [vtysh_path or which("vtysh"), "--vty_socket", str(vty_dir), "-c", command]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _start(name: str, cmd: list[str], run: Path) -> Proc:
    out = open(run / "out.log", "ab")  # noqa: SIM115 - the daemon's lifetime
    return Proc(name, run, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=run, start_new_session=True))


def _rundir(name: str) -> Path:
    run = Path(tempfile.mkdtemp(prefix=f"apsv-bench-{name}-", dir="/tmp"))
    run.chmod(0o755)
    return run


def wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except RuntimeError:
            raise
        except Exception as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{what} not within {timeout}s ({last!r})")


# ---------------------------------------------------------------------------------------------


def start_bird_announcer(n: int, peers: int, port: int, routes: list[str] | None = None) -> Proc:
    """BIRD announcing to `peers` receivers (receiver_addr(i):port) the same table: `n` /24s
    with identical attributes, or `routes` (BIRD `route` statements, attributes and all)."""
    run = _rundir("bird")
    routes_text = "\n".join(routes) if routes is not None else "\n".join(f"  route {p} blackhole;" for p in prefixes(n))
    sessions = "\n".join(
        f"""protocol bgp r{i} {{
  local {announcer_addr(i)} as {ANNOUNCER_AS};
  neighbor {receiver_addr(i)} port {port} as {RECEIVER_AS};
  strict bind yes;
  multihop;
  start delay time 0;  # (default 5 s) every receiver's CPU is counted from BIRD's start
  connect retry time 1;
  ipv4 {{ import none; export where source = RTS_STATIC; next hop address {NEXT_HOP}; }};
}}"""
        for i in range(peers)
    )
    (run / "bird.conf").write_text(
        f"""router id 10.0.3.1;
protocol device {{ }}
protocol static s4 {{ ipv4;
{routes_text}
}}
{sessions}
"""
    )
    sock = run / "bird.ctl"
    p = _start(
        "bird", [which("bird"), "-f", "-c", str(run / "bird.conf"), "-s", str(sock), "-P", str(run / "pid")], run
    )
    p.info["sock"] = sock
    wait("bird up", lambda: p.alive() and sock.exists(), 20)
    return p


def poke_bird(p: Proc) -> None:
    """BIRD 2.0.12 can hold back its last partial UPDATE until its loop wakes: a control-socket
    call wakes it (measured in ../shared/peers/README.md)."""
    subprocess.run([which("birdc"), "-s", str(p.info["sock"]), "show", "status"], capture_output=True, check=False)


class VtyClient:
    """One FRR daemon's vty over its Unix socket, as vtysh speaks it (a command ending in NUL;
    the answer ends in three NULs and a status octet): a poll costs the daemon a fraction of a
    millisecond and no process start."""

    def __init__(self, path: Path) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(str(path))

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\0")
        buf = bytearray()
        while len(buf) < 4 or buf[-4:-1] != b"\0\0\0":
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed its vty")
            buf += chunk
        if buf[-1] != 0:
            raise RuntimeError(f"vty {line!r}: status {buf[-1]}: {bytes(buf[:-4]).decode(errors='replace')[:200]}")
        return bytes(buf[:-4]).decode()

    def close(self) -> None:
        self.sock.close()


class FrrReceiver:
    def __init__(self, peers: int, port: int, first: int = 0) -> None:
        """bgpd taking `peers` sessions, the i-th from announcer_addr(i) on receiver_addr(i),
        for i from `first`."""
        run = _rundir("frr")
        shutil.chown(run, "frr", "frr")
        index = range(first, first + peers)
        nbrs = "\n".join(f" neighbor {announcer_addr(i)} remote-as {ANNOUNCER_AS}" for i in index)
        deny = "\n".join(f"  neighbor {announcer_addr(i)} route-map NONE out" for i in index)
        (run / "bgpd.conf").write_text(
            f"""frr defaults traditional
hostname bench
log file {run}/bgpd.log critical
!
router bgp {RECEIVER_AS}
 bgp router-id 10.0.2.1
 no bgp ebgp-requires-policy
{nbrs}
 !
 address-family ipv4 unicast
{deny}
 exit-address-family
!
route-map NONE deny 10
!
"""
        )
        shutil.chown(run / "bgpd.conf", "frr", "frr")
        listen = [a for i in index for a in ("-l", receiver_addr(i))]
        cmd = [which("bgpd"), "-f", str(run / "bgpd.conf"), "-Z", "-n", "-S", "-p", str(port), *listen]
        cmd += ["--vty_socket", str(run), "-i", str(run / "bgpd.pid"), "-A", "127.0.0.1", "-P", "0"]
        self.p = _start("frr", cmd, run)
        self.run = run
        wait("bgpd vty", lambda: self.p.alive() and self.summary() is not None, 20)

    def summary(self) -> dict[str, Any]:
        if getattr(self, "vty", None) is None:
            self.vty = VtyClient(self.run / "bgpd.vty")
        return dict(json.loads(self.vty.command("show bgp ipv4 unicast summary json")).get("peers", {}))

    def state(self) -> tuple[int, int]:
        """(sessions Established, prefixes received)."""
        peers = self.summary()
        return sum(1 for p in peers.values() if p.get("state") == "Established"), sum(
            int(p.get("pfxRcd", 0)) for p in peers.values()
        )

    def pids(self) -> list[int]:
        return [self.p.pid]

    def stop(self) -> None:
        if getattr(self, "vty", None) is not None:
            self.vty.close()
        self.p.stop()


class GobgpReceiver:
    def __init__(self, peers: int, port: int) -> None:
        run = _rundir("gobgp")
        addrs = ", ".join(f'"{receiver_addr(i)}"' for i in range(peers))
        nbrs = "\n".join(
            f"""[[neighbors]]
  [neighbors.config]
    neighbor-address = "{announcer_addr(i)}"
    peer-as = {ANNOUNCER_AS}
  [neighbors.transport.config]
    passive-mode = true
"""
            for i in range(peers)
        )
        (run / "gobgpd.toml").write_text(
            f"""[global.config]
  as = {RECEIVER_AS}
  router-id = "10.0.2.1"
  port = {port}
  local-address-list = [{addrs}]
[global.apply-policy.config]
  default-export-policy = "reject-route"
{nbrs}"""
        )
        with contextlib.closing(__import__("socket").socket()) as s:
            s.bind(("127.0.0.1", 0))
            self.api = s.getsockname()[1]
        cmd = [which("gobgpd"), "-f", str(run / "gobgpd.toml"), "--api-hosts", f"127.0.0.1:{self.api}"]
        self.p = _start("gobgp", [*cmd, "--pprof-disable", "-p", "-l", "warn"], run)
        wait("gobgpd API", lambda: self.p.alive() and self._cli("global"), 20)

    def _cli(self, *args: str) -> str:
        return subprocess.run(
            [which("gobgp"), "-p", str(self.api), *args], capture_output=True, text=True, check=True
        ).stdout

    def state(self) -> tuple[int, int]:
        nbrs = json.loads(self._cli("neighbor", "-j") or "[]")
        est = sum(1 for n in nbrs if n.get("state", {}).get("session_state") in (6, "ESTABLISHED", "established"))
        m = re.search(r"Path: (\d+)", self._cli("global", "rib", "summary", "-a", "ipv4"))
        return est, int(m.group(1)) if m else 0

    def pids(self) -> list[int]:
        return [self.p.pid]

    def stop(self) -> None:
        self.p.stop()


def env_ok() -> dict[str, str]:
    """Which daemons are installed (the benchmark reports the missing ones instead of failing)."""
    out = {}
    for name in ("bird", "birdc", "bgpd", "vtysh", "gobgpd", "gobgp"):
        try:
            out[name] = which(name)
        except FileNotFoundError:
            out[name] = ""
    return out

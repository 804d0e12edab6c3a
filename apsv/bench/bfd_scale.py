"""BFD at scale: how many sessions APSV holds Up at 100 ms x 3 against FRR bfdd, with no false downs.

    apsv bench bfd-scale [--steps 100,200,400,...] [--hold 10] [--json]

FRR bfdd runs in one network namespace, APSV's agent holds the other end of every session in
another (a veth pair and one address per session on each side, all made here and removed
after). For each count: all sessions must come Up, then stay Up for `--hold` seconds; a false
down is any session leaving Up on either side. The largest count that passes, and the CPU
APSV spends per 1,000 sessions while holding them (agent, multiplexer and instance processes),
are reported. Needs root (namespaces) and FRR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from apsv.bench.daemons import proc_cpu_seconds, vtysh, which
from apsv.bench.report import run_and_report

NS_FRR, NS_APSV = "apsv-bfdscale-frr", "apsv-bfdscale-agent"


def frr_addr(i: int) -> str:
    return f"10.99.{i // 250}.{i % 250 + 1}"


def apsv_addr(i: int) -> str:
    return f"10.99.{128 + i // 250}.{i % 250 + 1}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setup_namespaces(n: int) -> None:
    teardown_namespaces()
    for ns in (NS_FRR, NS_APSV):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    _ip("link", "add", "bfdsc0", "netns", NS_FRR, "type", "veth", "peer", "name", "bfdsc1", "netns", NS_APSV)
    for ns, dev, addr in ((NS_FRR, "bfdsc0", frr_addr), (NS_APSV, "bfdsc1", apsv_addr)):
        batch = "\n".join(f"addr add {addr(i)}/16 dev {dev}" for i in range(n)) + f"\nlink set {dev} up\n"
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True, capture_output=True)
    # Each session is an address pair, so a neighbour entry each: learned ones past the host's
    # ARP table thresholds (gc_thresh3 = 1024 by default, host-wide) are dropped, so each side
    # gets its peer's addresses as permanent entries (not garbage-collected, not counted).
    macs = {dev: _mac(ns, dev) for ns, dev in ((NS_FRR, "bfdsc0"), (NS_APSV, "bfdsc1"))}
    for ns, dev, peer_dev, addr in ((NS_FRR, "bfdsc0", "bfdsc1", apsv_addr), (NS_APSV, "bfdsc1", "bfdsc0", frr_addr)):
        batch = "\n".join(f"neigh replace {addr(i)} lladdr {macs[peer_dev]} dev {dev} nud permanent" for i in range(n))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch + "\n", text=True, check=True, capture_output=True)


def _mac(ns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev], capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)[0]["address"])


def teardown_namespaces() -> None:
    for ns in (NS_FRR, NS_APSV):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class Bfdd:
    def __init__(self, n: int, interval_ms: int = 100) -> None:
        self.run = Path(tempfile.mkdtemp(prefix="apsv-bfdscale-", dir="/tmp"))
        self.run.chmod(0o755)
        shutil.chown(self.run, "frr", "frr")
        peers = "\n".join(
            f" peer {apsv_addr(i)} local-address {frr_addr(i)}\n  receive-interval {interval_ms}\n"
            f"  transmit-interval {interval_ms}\n"
            "  detect-multiplier 3\n !"
            for i in range(n)
        )
        conf = self.run / "bfdd.conf"
        conf.write_text(
            f"frr defaults traditional\nhostname scale\nlog file {self.run}/bfdd.log critical\n!\nbfd\n{peers}\n!\n"
        )
        shutil.chown(conf, "frr", "frr")
        cmd = ["ip", "netns", "exec", NS_FRR, which("bfdd"), "-f", str(conf), "-u", "frr", "-g", "frr"]
        cmd += ["--vty_socket", str(self.run), "-i", str(self.run / "pid"), "--bfdctl", str(self.run / "ctl")]
        cmd += ["-z", str(self.run / "zserv.api"), "-A", "127.0.0.1", "-P", "0"]
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def peers(self) -> list[dict[str, Any]]:
        return list(json.loads(vtysh(self.run, "show bfd peers json")))

    def pid(self) -> int:
        return int((self.run / "pid").read_text().strip())

    def stop(self) -> None:
        self.p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(10)
        with contextlib.suppress(Exception):
            os.kill(self.pid(), 15)
        shutil.rmtree(self.run, ignore_errors=True)


def _one(n: int, hold: float) -> dict[str, Any]:
    from apsv.agent.actor import create_agent_actor
    from apsv.agent.config import parse_config
    from apsv.runtime.cluster import NAMESPACE, deploy
    from apsv.runtime.vpsm import ProtocolPlan

    setup_namespaces(n)
    bfdd = Bfdd(n)
    dep = deploy(
        [ProtocolPlan("bfd", min_instances=1, max_instances=1, policy="fixed")], suffix=f"-bfd{n}", run_loop=False
    )
    sessions = [
        {
            "session": i + 1,
            "local_address": apsv_addr(i),
            "peer_address": frr_addr(i),
            "netns": NS_APSV,
            "desired_min_tx_ms": 100,
            "required_min_rx_ms": 100,
            "detect_mult": 3,
        }
        for i in range(n)
    ]
    cfg = parse_config({"tenant": 1, "vrouters": [{"id": 1, "bfd": sessions}]})
    agent = create_agent_actor(cfg, multiplexer_name=dep.multiplexer_name, namespace=NAMESPACE)
    result: dict[str, Any] = {"sessions": n}
    try:
        t0 = time.monotonic()
        ray.get(agent.start.remote())
        ups: set[int] = set()
        downs = 0
        deadline = t0 + 30
        while time.monotonic() < deadline and len(ups) < n:
            for e in ray.get(agent.events.remote()):
                if e.get("event") == "state" and e.get("new") == "UP":
                    ups.add(int(e["session"]))
            time.sleep(0.1)
        result["all_up_s"] = round(time.monotonic() - t0, 2) if len(ups) == n else None
        result["up"] = len(ups)
        if len(ups) < n:
            result["ok"] = False
            return result
        ray.get(agent.events.remote())
        import os as _os

        actors = [agent, dep.multiplexer, *ray.get(dep.vpsm.instance_handles.remote()).values()]
        pids = ray.get([a.__ray_call__.remote(lambda self: _os.getpid()) for a in actors])
        cpu0 = sum(proc_cpu_seconds(p) for p in pids)
        frr0 = proc_cpu_seconds(bfdd.pid())
        t1 = time.monotonic()
        time.sleep(hold)
        dt = time.monotonic() - t1
        cpu = sum(proc_cpu_seconds(p) for p in pids) - cpu0
        frr_cpu = proc_cpu_seconds(bfdd.pid()) - frr0
        for e in ray.get(agent.events.remote()):
            if e.get("event") == "state" and e.get("old") == "UP":
                downs += 1
        frr_down = sum(1 for p in bfdd.peers() if p.get("status") != "up")
        status = ray.get(agent.status.remote())["bfd"]
        result.update(
            false_downs_apsv=downs,
            false_downs_frr=frr_down,
            apsv_cpu_percent=round(100 * cpu / dt, 1),
            apsv_cpu_s_per_1000_sessions_per_s=round(cpu / dt / (n / 1000), 3),
            frr_cpu_percent=round(100 * frr_cpu / dt, 1),
            packets_tx=status["tx"],
            packets_rx=status["rx"],
            forwarded_to_stack=status["forwarded"],
            ok=downs == 0 and frr_down == 0,
        )
        return result
    finally:
        with contextlib.suppress(Exception):
            ray.get(agent.stop.remote(), timeout=60)
        ray.kill(agent)
        dep.stop()
        bfdd.stop()
        teardown_namespaces()


def run(steps: list[int], hold: float = 10.0) -> dict[str, Any]:
    from apsv.runtime.cluster import start_local_ray

    start_local_ray(num_cpus=8)
    levels = []
    for n in steps:
        r = _one(n, hold)
        levels.append(r)
        if not r.get("ok"):
            break
    held = [r for r in levels if r.get("ok")]
    return {
        "benchmark": "bfd-scale",
        "interval_ms": 100,
        "detect_mult": 3,
        "hold_s": hold,
        "levels": levels,
        "note": "FRR bfdd's single thread bounds the count before APSV does (see each level's frr_cpu_percent)",
        "largest_held": max((r["sessions"] for r in held), default=0),
        "cpu_s_per_1000_sessions_per_s": held[-1]["apsv_cpu_s_per_1000_sessions_per_s"] if held else None,
    }


def render(r: dict[str, Any]) -> str:
    lines = [json.dumps(lv) for lv in r["levels"]]
    lines.append(f"largest count held Up with no false downs: {r['largest_held']}")
    return "\n".join(lines)


def main(steps: list[int], hold: float, as_json: bool, out: Path | None) -> dict[str, Any]:
    return run_and_report(lambda: run(steps, hold), render, as_json, out)

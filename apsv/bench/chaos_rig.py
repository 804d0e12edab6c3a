"""The chaos soak's rig: the deployment, its peers and its load - everything a fault acts on -
and the checks that say whether it is as before a fault."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from apsv.bench import bfd_scale as B
from apsv.bench import daemons as D
from apsv.bench.chaos_load import ReplayLoad
from apsv.bench.chaos_observe import Event, bird_protocols


@dataclass
class Rig:
    """Everything a fault acts on."""

    dep: Any
    im: Any
    vpsm: Any
    replay: ReplayLoad
    bird: Any
    birdc: list[str]
    bird_protocols: list[str]
    bfdd: Any
    n_bgp: int
    n_bfd: int
    forecaster: Any
    bfd_call_deadline_s: float
    bfd_keys: dict[tuple[int, int], str] = field(default_factory=dict)  # (vrouter, session) -> peer
    bgp_keys: dict[tuple[int, int], str] = field(default_factory=dict)  # (vrouter, session) -> BIRD's name
    apsv_bgp_downs: list[Event] = field(default_factory=list)  # APSV's side: its BGP sessions leaving Established

    @staticmethod
    def bfd_addresses(i: int) -> tuple[str, str]:
        """(the agent's address, bfdd's) of BFD session i: bfdd's `peer X local-address Y`."""
        return B.apsv_addr(i), B.frr_addr(i)

    def bfdd_configure(self, *lines: str) -> None:
        cmd = [D.which("vtysh"), "--vty_socket", str(self.bfdd.run), "-c", "configure terminal", "-c", "bfd"]
        for line in lines:
            cmd += ["-c", line]
        subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)


def bfd_name(agent_address: str) -> str:
    """BFD session i's name in the checker, from the agent's address of it (both views key by it)."""
    return f"bfd@{agent_address}"


def new_agent_downs(rig: Rig) -> list[Event]:
    """The agent's events since the last call (APSV's side): the BFD sessions that left Up,
    returned; the BGP sessions that left Established, added to `rig.apsv_bgp_downs`."""
    import ray

    out = []
    for e in ray.get(rig.dep.agent.events.remote(), timeout=60):
        if e.get("protocol") == "bfd" and e.get("event") == "state" and e.get("old") == "UP":
            peer = rig.bfd_keys.get((int(e["vrouter"]), int(e["session"])), f"bfd {e['vrouter']}/{e['session']}")
            out.append(Event(float(e["ts"]), peer, "down"))
        elif e.get("protocol") == "bgp" and e.get("event") == "state" and e.get("old") == "Established":
            who = rig.bgp_keys.get((int(e["vrouter"]), int(e["session"])), f"bgp {e['vrouter']}/{e['session']}")
            rig.apsv_bgp_downs.append(Event(float(e["ts"]), who, f"APSV: {e.get('new')}"))
    return out


def _health(rig: Rig, mins: dict[str, int]) -> tuple[bool, str]:
    """Whether everything is as before the fault; else what is not."""
    try:
        return _healthy(rig, mins)
    except Exception as e:  # an actor found dead on the way: not healthy yet
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _healthy(rig: Rig, mins: dict[str, int]) -> tuple[bool, str]:
    import ray

    try:
        ray.get(rig.im.stats.remote(), timeout=10)
        st = ray.get(rig.vpsm.status.remote(), timeout=10)
    except Exception as e:
        return False, f"control plane: {type(e).__name__}"
    for p, n in mins.items():
        if st["protocols"][p]["running"] < n:
            return False, f"{p}: {st['protocols'][p]['running']} instances running, minimum {n}"
    if not (st.get("forecaster") or {}).get("available"):
        return False, "forecaster not in use"
    routes = ray.get(rig.im.routes_table.remote(), timeout=10)
    handles = ray.get(rig.vpsm.instance_handles.remote(), timeout=10)
    agent = [tuple(k) for ks in routes.values() for k in ks if k[0] == 1]
    where = {tuple(k): i for i, ks in routes.items() for k in ks}
    states: dict[str, int] = {}
    for iid in {where[k] for k in agent}:
        if iid not in handles:
            return False, f"instance {iid} not ready"
        infos = ray.get(handles[iid].session_infos.remote([k for k in agent if where[k] == iid], False), timeout=10)
        for info in infos.values():
            if info is not None:
                states[str(info.get("state"))] = states.get(str(info.get("state")), 0) + 1
    if states.get("Established", 0) < rig.n_bgp:
        return False, f"BGP sessions Established: {states.get('Established', 0)} of {rig.n_bgp}"
    bird = bird_protocols(rig.birdc)  # the peers' own view
    down = sorted(n for n, (established, *_) in bird.items() if not established)
    if down:
        return False, f"BIRD sessions not Established: {', '.join(down)}"
    up = sum(1 for p in rig.bfdd.peers() if p.get("status") == "up")
    if up < rig.n_bfd:
        return False, f"BFD sessions up at bfdd: {up} of {rig.n_bfd}"
    if rig.replay.error:
        return False, f"replay: {rig.replay.error}"
    return True, "ok"


def wait_healthy(rig: Rig, mins: dict[str, int], within_s: float, every_s: float) -> tuple[bool, str]:
    """Checks health every `every_s` (waking BIRD first) until it passes or `within_s` is up;
    returns the last answer."""
    t = time.monotonic()
    ok, why = False, ""
    while time.monotonic() - t < within_s:
        D.poke_bird(rig.bird)
        ok, why = _health(rig, mins)
        if ok:
            break
        time.sleep(every_s)
    return ok, why


def sessions_complete(rig: Rig, prefixes: int) -> int:
    """BGP sessions that hold every route BIRD sent them, waited for up to 120 s."""
    t_end = time.monotonic()
    complete = 0
    while time.monotonic() - t_end < 120:
        D.poke_bird(rig.bird)
        infos = [i for i in rig.dep.session_infos() if "loc_rib" in i and i.get("state") == "Established"]
        complete = sum(1 for i in infos if int(i["loc_rib"].get("1/1", 0)) >= prefixes)
        if complete >= rig.n_bgp:
            break
        time.sleep(2.0)
    return complete

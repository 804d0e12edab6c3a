"""The faults the chaos soak injects into a running deployment (`apsv bench chaos`).

Each fault acts on a `Rig` (the deployment, its peers and its load) and returns what it did:
its detail, and which peer sessions or BFD peers it takes down on purpose, so that the checker
can tell the resets and downs a fault causes from those nothing should have caused. None of
them waits for the system to recover: the soak checks that, the same way after every fault.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apsv.bench.chaos_rig import Rig


@dataclass
class Injected:
    """What a fault did."""

    detail: dict[str, Any] = field(default_factory=dict)
    resets: set[str] = field(default_factory=set)  # BIRD protocols (peer sessions) it resets
    bfd_downs: set[str] = field(default_factory=set)  # bfdd peer addresses it takes down
    checks: dict[str, bool] = field(default_factory=dict)  # what the fault itself must see happen


def _instances(rig: Rig, protocol: str) -> list[tuple[str, Any]]:
    import ray

    status = ray.get(rig.vpsm.status.remote(), timeout=60)
    handles = ray.get(rig.vpsm.instance_handles.remote(), timeout=60)
    return sorted(
        (i, handles[i])
        for i, m in status["instances"].items()
        if m["protocol"] == protocol and not m["draining"] and i in handles
    )


def _sigkill(actor: Any) -> int:
    import ray

    pid = int(ray.get(actor.pid.remote(), timeout=60))
    os.kill(pid, signal.SIGKILL)
    return pid


def _container(instance_id: str) -> Any:
    from apsv.runtime.stack_image import docker_client

    (c,) = [c for c in docker_client().containers.list() if c.labels.get("apsv.instance") == instance_id]
    return c


def kill_instance_process(rig: Rig, rng: random.Random) -> Injected:
    """kill -9 a stack instance of the process backend (BGP)."""
    iid, handle = rng.choice(_instances(rig, "bgp"))
    return Injected({"instance": iid, "pid": _sigkill(handle)})


def kill_instance_docker(rig: Rig, rng: random.Random) -> Injected:
    """kill -9 a stack container of the Docker backend (BFD)."""
    iid, _ = rng.choice(_instances(rig, "bfd"))
    _container(iid).kill(signal="SIGKILL")
    return Injected({"instance": iid})


def pause_instance_docker(rig: Rig, rng: random.Random) -> Injected:
    """docker pause a stack container past its call deadline: the instance must give it up."""
    iid, _ = rng.choice(_instances(rig, "bfd"))
    c = _container(iid)
    c.pause()
    deadline = rig.bfd_call_deadline_s
    # Unpaused (if still there) after twice the deadline: by then it must have been removed.
    time.sleep(2 * deadline + 2)
    from apsv.runtime.stack_image import docker_client

    still = [x for x in docker_client().containers.list(all=True) if x.labels.get("apsv.instance") == iid]
    for x in still:
        x.unpause()
    return Injected({"instance": iid, "deadline_s": deadline}, checks={"container_removed": not still})


def kill_multiplexer(rig: Rig, rng: random.Random) -> Injected:
    return Injected({"pid": _sigkill(rig.im)})


def kill_vpsm(rig: Rig, rng: random.Random) -> Injected:
    return Injected({"pid": _sigkill(rig.vpsm)})


def exhaust_buffer_pool(rig: Rig, rng: random.Random) -> Injected:
    """The replay client stops taking its answers for 10 s with its buffers in flight; then
    sends on into a full pool (it waits for answers: backpressure, never loss)."""
    in_use = rig.replay.stall(10.0)
    return Injected({"buffers_in_flight": in_use, "slots": rig.replay.slots})


def remove_forecaster(rig: Rig, rng: random.Random) -> Injected:
    """Delete the Serve forecaster: the VPSM must fall back to reactive and say so (status, the
    gauge), then take it up again once it is deployed back."""
    import ray
    from ray import serve

    serve.delete(rig.forecaster.app_name)
    t0 = time.monotonic()
    fell_back = False
    while time.monotonic() - t0 < 60:
        f = ray.get(rig.vpsm.status.remote(), timeout=60).get("forecaster") or {}
        if f.get("fallback") == "reactive":
            fell_back = True
            break
        time.sleep(0.5)
    fallback_s = round(time.monotonic() - t0, 1)
    from apsv.ops import deploy_forecaster

    deploy_forecaster(rig.forecaster)
    return Injected({"fallback_after_s": fallback_s}, checks={"fell_back_to_reactive": fell_back})


def peer_reset_storm(rig: Rig, rng: random.Random) -> Injected:
    """BIRD restarts half its sessions, three times, a second apart (each a reset its peer sees)."""
    from apsv.bench.chaos_observe import bird_protocols

    names = rng.sample(rig.bird_protocols, max(1, len(rig.bird_protocols) // 2))
    before = bird_protocols(rig.birdc)
    for _ in range(3):
        for name in names:  # (birdc's restart takes one protocol)
            subprocess.run([*rig.birdc, "restart", name], capture_output=True, check=True, timeout=30)
        time.sleep(1.0)
    after = bird_protocols(rig.birdc)
    restarted = all(after[n][1] != before[n][1] for n in names)  # each left its state since then
    return Injected({"sessions": sorted(names)}, resets=set(names), checks={"restarted": restarted})


def bfd_peer_flap(rig: Rig, rng: random.Random) -> Injected:
    """bfdd shuts one peer down for 3 s (AdminDown to APSV's session), then brings it back."""
    from apsv.bench.chaos_rig import bfd_name

    i = rng.randrange(rig.n_bfd)
    agent, local = rig.bfd_addresses(i)
    rig.bfdd_configure(f"peer {agent} local-address {local}", "shutdown")
    time.sleep(3.0)
    rig.bfdd_configure(f"peer {agent} local-address {local}", "no shutdown")
    return Injected({"peer": agent}, bfd_downs={bfd_name(agent)})


FAULTS: dict[str, Callable[[Rig, random.Random], Injected]] = {
    "kill_instance_process": kill_instance_process,
    "kill_instance_docker": kill_instance_docker,
    "pause_instance_docker": pause_instance_docker,
    "kill_multiplexer": kill_multiplexer,
    "kill_vpsm": kill_vpsm,
    "exhaust_buffer_pool": exhaust_buffer_pool,
    "remove_forecaster": remove_forecaster,
    "peer_reset_storm": peer_reset_storm,
    "bfd_peer_flap": bfd_peer_flap,
}


class Schedule:
    """Faults in a random order that covers every one before any repeats (a shuffled deck)."""

    def __init__(self, rng: random.Random, names: list[str] | None = None) -> None:
        self.rng = rng
        self.names = list(names or FAULTS)
        self._deck: list[str] = []

    def next(self) -> str:
        if not self._deck:
            self._deck = list(self.names)
            self.rng.shuffle(self._deck)
        return self._deck.pop()

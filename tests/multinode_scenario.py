"""A multi-node APSV deployment on one machine (`ray.cluster_utils.Cluster`: every node its own
raylet and object store), run as a process of its own because a driver joins one cluster at a
time and the test session has its own. Prints one JSON object for tests/test_multinode.py.

Nodes: a head with `control_plane`, two with `stack_host`, one with `vrouter_host`. APSV is
deployed with the default roles; a replay runs from a task on the vrouter host, so its frames
cross nodes to the instances (the object-store transport), and is verified against an
in-process replay. Then a second replay, in recorded time, loses a stack host (`remove_node`,
not graceful) halfway.

    python tests/multinode_scenario.py MRT_FILE
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Every node on loopback (Ray's single-host switch keeps node addresses at 127.0.0.1; cluster_utils
# starts the extra raylets itself, which the switch does not refuse).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray
from ray.cluster_utils import Cluster

from apsv.runtime.cluster import deploy
from apsv.runtime.instance import Allocation
from apsv.runtime.vpsm import ProtocolPlan

NAMESPACE = "apsv-multinode"
SPEED = 30.0  # the 5-minute update file in about 10 s
REMOVE_AFTER_S = 3.0
STORE = 96 << 20  # each node's own object store


def node_args(resources: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "num_cpus": 1,
        "resources": resources,
        "object_store_memory": STORE,
        "node_ip_address": "127.0.0.1",
        **extra,
    }


@ray.remote(num_cpus=0, resources={"vrouter_host": 0.001})
def replay_from_vrouter_host(
    path: str, sessions: int, vrouters: int, tenant: int = 1, speed: float | None = None
) -> dict[str, Any]:
    from apsv.ops.replay import plan_replay, replay_plan
    from apsv.runtime.cluster import MULTIPLEXER_NAME
    from apsv.runtime.vpsm import VPSM_NAME

    im = ray.get_actor(MULTIPLEXER_NAME, namespace=NAMESPACE)
    vpsm = ray.get_actor(VPSM_NAME, namespace=NAMESPACE)
    _streams, plan = plan_replay([Path(path)], sessions, vrouters, tenant)
    out = replay_plan(im, vpsm, plan, speed=speed, verify=True, keep=False, label="multinode-replay")
    out["node"] = ray.get_runtime_context().get_node_id()
    return out


def main(path: str) -> int:
    tmp = tempfile.mkdtemp(prefix="apsv-mn-", dir="/tmp")  # Ray's socket paths are length-limited
    # Cluster writes the head's address to Ray's default temp dir (/tmp/ray), which exists only
    # once some Ray has run on the machine: made here if missing, and removed again after.
    from ray._common.utils import get_default_ray_temp_dir

    default_dir = Path(get_default_ray_temp_dir())  # type: ignore[no-untyped-call]
    made_default_dir = not default_dir.exists()
    default_dir.mkdir(parents=True, exist_ok=True)
    cluster: Any = Cluster(  # (no type annotations)
        initialize_head=True,
        head_node_args=node_args({"control_plane": 1}, temp_dir=tmp, include_dashboard=False),
    )
    try:
        roles: dict[str, list[str]] = {"control_plane": [cluster.head_node.node_id]}
        for role in ("stack_host", "stack_host", "vrouter_host"):
            node = cluster.add_node(**node_args({role: 1}))
            roles.setdefault(role, []).append(node.node_id)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        plan = ProtocolPlan(
            "bgp",
            min_instances=2,
            max_instances=2,
            policy="fixed",
            allocation=Allocation(cpu=0.5, memory_bytes=128 << 20, buffer_quota_bytes=4 << 20),
        )
        dep = deploy([plan], namespace=NAMESPACE, run_loop=False)
        handles = ray.get(dep.vpsm.instance_handles.remote())
        instance_nodes = {
            iid: info["node_id"]
            for iid, info in zip(handles, ray.get([h.ready.remote() for h in handles.values()]), strict=True)
        }
        actors = ray._private.state.actors()  # (the state API needs the dashboard, which is off)
        control = {
            a["Name"]: a["Address"]["NodeID"]
            for a in actors.values()
            if a["State"] == "ALIVE" and a["Name"] in (dep.multiplexer_name, "apsv-vpsm")
        }
        replay = ray.get(replay_from_vrouter_host.remote(path, 8, 4), timeout=300)

        # Node loss: a stack host goes (its raylet and everything on it) in the middle of a replay
        # in recorded time; its instance's sessions are restored on the other stack host from
        # their clients' custody (the client runs on the vrouter host).
        ray.get(dep.vpsm.start.remote(True))  # the control loop: it reaps the lost instance
        lost = next(n for n in cluster.worker_nodes if n.node_id == instance_nodes["bgp-1"])
        during = replay_from_vrouter_host.remote(path, 8, 4, 2, SPEED)
        time.sleep(REMOVE_AFTER_S)
        cluster.remove_node(lost, allow_graceful=False)
        after_loss = ray.get(during, timeout=300)
        # the protocol back at its minimum, on the surviving stack host
        deadline = time.monotonic() + 90
        while ray.get(dep.vpsm.status.remote())["protocols"]["bgp"]["running"] < 2 and time.monotonic() < deadline:
            time.sleep(1)
        handles = ray.get(dep.vpsm.instance_handles.remote())
        nodes_after = [info["node_id"] for info in ray.get([h.ready.remote() for h in handles.values()])]
        status = ray.get(dep.vpsm.status.remote())
        stats = ray.get(dep.multiplexer.stats.remote())
        dep.stop()
        node_loss = {
            "lost_node": lost.node_id,
            "replay": after_loss,
            "instance_nodes_after": nodes_after,
            "events": [e["event"] for e in status["events"]],
            "recoveries": stats["recoveries"],
            "sessions_recovered": stats["sessions_recovered"],
        }
        out = {"roles": roles, "instances": instance_nodes, "control": control, "replay": replay}
        # flushed now: tearing the cluster down may end this process without flushing stdout
        print(json.dumps(out | {"node_loss": node_loss}), flush=True)
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if made_default_dir:
            shutil.rmtree(default_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

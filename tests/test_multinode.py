"""Placement by role on a multi-node cluster on this machine (tests/multinode_scenario.py: a head
with `control_plane`, two `stack_host` nodes, one `vrouter_host`, each its own raylet and object
store), the loss of a stack host in the middle of a replay, and the roles' arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apsv.runtime.roles import NO_ROLES, ROLE_SHARE, RoleError, Roles

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
SAMPLE = "mrt/libbgpstream-test/ris.rrc06.updates.1427846400.gz"  # 2 recorded peers


def test_roles_request_offer_and_refuse() -> None:
    roles = Roles()
    assert roles.request("stack_host") == {"stack_host": ROLE_SHARE}
    assert roles.offered() == {"control_plane": 1.0, "stack_host": 1.0, "vrouter_host": 1.0}
    assert NO_ROLES.request("control_plane") == {} and NO_ROLES.offered() == {}
    custom = Roles(stack_host="bgp_boxes", vrouter_host=None)
    assert custom.request("stack_host") == {"bgp_boxes": ROLE_SHARE} and custom.request("vrouter_host") == {}
    roles.check({"CPU": 4.0, "control_plane": 1.0, "stack_host": 2.0}, ("control_plane", "stack_host"))
    with pytest.raises(
        RoleError, match=r"no node of the cluster offers the resource 'stack_host'.*placement.stack_host"
    ):
        roles.check({"CPU": 4.0, "control_plane": 1.0}, ("control_plane", "stack_host"))
    with pytest.raises(ValueError, match="unknown role"):
        roles.request("gpu_host")


@pytest.mark.slow
@pytest.mark.multinode
def test_placement_by_role_and_the_loss_of_a_stack_host(data_dir: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCENARIO), str(data_dir / SAMPLE)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # (Ray's driver also prints the lost raylet's last log lines on stdout)
    [line] = [x for x in run.stdout.splitlines() if x.startswith('{"roles"')]
    out = json.loads(line)
    roles = out["roles"]
    # both instances on stack hosts, spread one to each
    assert sorted(out["instances"].values()) == sorted(roles["stack_host"])
    # the multiplexer and the VPSM on the control-plane node
    assert set(out["control"]) == {"apsv-multiplexer", "apsv-vpsm"}
    assert set(out["control"].values()) == set(roles["control_plane"])
    # the client ran on the vrouter host: its frames crossed nodes through the object store,
    # each applied once, in order, the same Loc-RIBs as an in-process replay
    replay = out["replay"]
    assert replay["node"] in roles["vrouter_host"]
    assert replay["transport"] == "object_store"
    assert replay["sessions"] == 8 and replay["frames"] > 0
    assert replay["verified"] and replay["problems"] == []

    # A stack host removed (its raylet and all on it) in the middle of a replay in recorded time:
    # its sessions come back on the other stack host from their clients' custody; every frame
    # applied once, in order, the same Loc-RIBs as the in-process replay.
    loss = out["node_loss"]
    (survivor,) = set(roles["stack_host"]) - {loss["lost_node"]}
    assert loss["replay"]["verified"] and loss["replay"]["problems"] == [], loss["replay"]["problems"]
    assert loss["replay"]["frames"] == replay["frames"]
    assert "reaped" in loss["events"] and loss["recoveries"] >= 1 and loss["sessions_recovered"] >= 1
    # and the protocol is back at its minimum (2), both instances on the surviving stack host
    assert len(loss["instance_nodes_after"]) == 2 and set(loss["instance_nodes_after"]) == {survivor}

"""Dump a virtual router's Loc-RIBs from the running deployment as an MRT TABLE_DUMP_V2 file.

    ray job submit --working-dir . -- python jobs/rib_dump.py --vrouter 1/3 --out /tmp/vr-1-3.mrt.gz

Finds the deployed multiplexer and VPSM (named actors in `--namespace`), takes a snapshot of each
of the virtual router's BGP sessions (or only `--session N`) from the instance holding it - the
instance serves the call between two batches, so the snapshot is a consistent RIB - restores
it here and writes every session's Loc-RIB: one peer per session in the PEER_INDEX_TABLE, one RIB
record per prefix with an entry for each session that has a route to it (apsv.mrt.writer). The
file (path on the node the job's driver runs on; compressed by a .gz or .bz2 suffix) is read by
bgpdump and mrtparse. Prints one JSON object; exit status 2 for bad input, 1 when the virtual
router has no BGP session.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# The job's working_dir (the repository root) holds apsv/; make it importable however we start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apsv.bgp import constants as C
from apsv.frame import ProtocolId
from apsv.runtime.cluster import MULTIPLEXER_NAME, NAMESPACE
from apsv.runtime.host import Key
from apsv.runtime.vpsm import VPSM_NAME

SNAPSHOT_TRIES = 5  # a session can move between finding its instance and asking it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vrouter", required=True, help="TENANT/VROUTER, e.g. 1/3")
    p.add_argument("--session", type=int, default=None, help="only this session number of the virtual router")
    p.add_argument("--out", required=True, help="the MRT file to write (.gz / .bz2: compressed)")
    p.add_argument("--namespace", default=NAMESPACE, help=f"the deployment's Ray namespace (default {NAMESPACE})")
    p.add_argument("--multiplexer", default=MULTIPLEXER_NAME, help="the multiplexer actor's name")
    p.add_argument("--vpsm", default=VPSM_NAME, help="the VPSM actor's name")
    return p.parse_args(argv)


def parse_vrouter(text: str) -> tuple[int, int]:
    parts = text.split("/")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise ValueError(f"--vrouter {text!r}: expected TENANT/VROUTER, two numbers")
    tenant, vrouter = int(parts[0]), int(parts[1])
    if not (0 <= tenant < 1 << 32 and 0 <= vrouter < 1 << 32):
        raise ValueError(f"--vrouter {text!r}: tenant and virtual router are 32-bit numbers")
    return tenant, vrouter


def family_name(fam: tuple[int, int]) -> str:
    return f"{C.AFI_NAMES.get(fam[0], fam[0])}-{C.SAFI_NAMES.get(fam[1], fam[1])}"


def snapshot_sessions(im: Any, vpsm: Any, keys: list[Key]) -> dict[Key, bytes]:
    """Each session's snapshot, asked of the instance the multiplexer routes it to. A session
    that moves (or is restored elsewhere) between the two calls is not found there: it is looked
    up again."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    handles: dict[str, Any] = ray.get(vpsm.instance_handles.remote())
    out: dict[Key, bytes] = {}
    for key in keys:
        for attempt in range(SNAPSHOT_TRIES):
            iid = ray.get(im.route_of.remote(key))
            if iid is None:
                break  # closed meanwhile: nothing to dump
            if iid not in handles:  # started after we looked
                handles = ray.get(vpsm.instance_handles.remote())
            try:
                if iid not in handles:  # gone, or unplaced ("": no instance of its protocol)
                    raise LookupError(f"session {key} is on no running instance ({iid or 'unplaced'})")
                blob, _seq = ray.get(handles[iid].snapshot.remote(key))
            except (RayTaskError, RayActorError, LookupError):
                if attempt == SNAPSHOT_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))  # moved or being recovered: look it up again
                handles = ray.get(vpsm.instance_handles.remote())
                continue
            out[key] = bytes(blob)
            break
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tenant, vrouter = parse_vrouter(args.vrouter)
    except ValueError as e:
        print(f"rib_dump: {e}", file=sys.stderr)
        return 2
    import ray

    from apsv.bgp.session import BgpSession
    from apsv.mrt.writer import write_loc_ribs
    from apsv.runtime.cluster import find_deployment

    im: Any  # Ray types a handle's methods as unreachable
    vpsm: Any
    try:
        im, vpsm = find_deployment(args.namespace, args.multiplexer, args.vpsm)
    except LookupError as e:
        print(f"rib_dump: {e}", file=sys.stderr)
        return 1
    routes: dict[str, list[Any]] = ray.get(im.routes_table.remote())
    all_keys = sorted(tuple(k) for held in routes.values() for k in held)
    keys: list[Key] = [
        (k[0], k[1], k[2], k[3])
        for k in all_keys
        if k[0] == tenant
        and k[1] == vrouter
        and k[2] == int(ProtocolId.BGP)
        and (args.session is None or k[3] == args.session)
    ]
    if not keys:
        known = sorted({f"{k[0]}/{k[1]}" for k in all_keys if k[2] == int(ProtocolId.BGP)})
        print(
            f"rib_dump: virtual router {tenant}/{vrouter} has no BGP session"
            + (f" {args.session}" if args.session is not None else "")
            + f" (virtual routers with BGP sessions: {', '.join(known[:20]) or 'none'})",
            file=sys.stderr,
        )
        return 1
    blobs = snapshot_sessions(im, vpsm, keys)
    sessions = {k: BgpSession.restore(b) for k, b in blobs.items()}
    ribs = [loc for s in sessions.values() for _fam, loc in sorted(s.loc_rib.items())]
    router_id = next(iter(sessions.values())).config.router_id if sessions else "0.0.0.0"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = write_loc_ribs(out, ribs, collector_id=router_id, view_name=f"{tenant}/{vrouter}")
    result = {
        "vrouter": f"{tenant}/{vrouter}",
        "file": str(out.resolve()),
        "sessions": [
            {
                "session": k[3],
                "peer": s.source.name,
                "state": s.state.value,
                "prefixes": {family_name(fam): len(loc) for fam, loc in sorted(s.loc_rib.items())},
            }
            for k, s in sorted(sessions.items())
        ],
        "peers": stats.peers,
        "prefixes": stats.prefixes,
        "entries": stats.entries,
        "records": stats.records,
        "octets": stats.octets,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

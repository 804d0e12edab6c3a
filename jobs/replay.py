"""Replay MRT update dumps against the running deployment, as BGP sessions of many virtual routers.

    ray job submit --working-dir . -- python jobs/replay.py updates.20100722.2015.gz \
        --sessions 40 --vrouters 10 --speed 60 --verify

Every peer recorded in the dumps becomes a session stream (its exact UPDATE bytes and times,
apsv.runtime.recorded_sessions); `--sessions` sessions are spread over `--vrouters` virtual routers of
`--tenant` (streams reused round-robin) and opened through the deployed multiplexer (found by
name in `--namespace`), which places them. Their messages go from an OffloadClient straight to
the stack instances, in recorded-time order: as fast as possible, or `--speed` times real time.
With `--verify` each session is checked against an in-process replay of its stream: every frame
applied exactly once, in order, the same Loc-RIB.

The sessions stay open when the job ends - their Loc-RIBs are what jobs/rib_dump.py dumps -
unless `--close`. Prints one JSON object (also written to `--output`); exit status 2 for bad
input, 1 if sessions were refused or the verification found a problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The job's working_dir (the repository root) holds apsv/; make it importable however we start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apsv.runtime.cluster import MULTIPLEXER_NAME, NAMESPACE
from apsv.runtime.vpsm import VPSM_NAME


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="MRT update dumps (BGP4MP), plain, .gz or .bz2")
    p.add_argument("--sessions", type=int, default=None, help="sessions to open (default: one per recorded peer)")
    p.add_argument("--vrouters", type=int, default=1, help="virtual routers to spread them over (default 1)")
    p.add_argument("--tenant", type=int, default=1, help="the tenant the virtual routers belong to (default 1)")
    p.add_argument("--speed", type=float, default=None, help="times real time (default: as fast as possible)")
    p.add_argument("--min-messages", type=int, default=1, help="skip recorded peers with fewer UPDATEs")
    p.add_argument("--verify", action="store_true", help="check every session against an in-process replay")
    p.add_argument("--close", action="store_true", help="close the sessions at the end (default: keep them)")
    p.add_argument("--namespace", default=NAMESPACE, help=f"the deployment's Ray namespace (default {NAMESPACE})")
    p.add_argument("--multiplexer", default=MULTIPLEXER_NAME, help="the multiplexer actor's name")
    p.add_argument("--vpsm", default=VPSM_NAME, help="the VPSM actor's name")
    p.add_argument("--output", help="also write the result JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from apsv.ops.base import OpsError
    from apsv.ops.replay import plan_replay, replay_plan

    if args.speed is not None and args.speed <= 0:
        print("replay: --speed must be positive", file=sys.stderr)
        return 2
    try:
        streams, plan = plan_replay(
            [Path(f) for f in args.files], args.sessions, args.vrouters, args.tenant, args.min_messages
        )
    except OpsError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2

    from apsv.runtime.cluster import find_deployment

    im: Any  # Ray types a handle's methods as unreachable
    vpsm: Any
    try:
        im, vpsm = find_deployment(args.namespace, args.multiplexer, args.vpsm)
        res = replay_plan(im, vpsm, plan, speed=args.speed, verify=args.verify, keep=not args.close, label="replay-job")
    except (LookupError, OpsError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "files": [str(f) for f in args.files],
        "recorded_peers": len(streams),
        "vrouters": sorted({f"{s.key[0]}/{s.key[1]}" for s in plan}),
        **res,
        # per session: its key and the UPDATEs it was sent, for whoever checks the RIBs later
        "session_keys": [[*s.key, len(s.stream.messages)] for s in plan],
    }
    text = json.dumps(result)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if res.get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())

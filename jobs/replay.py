"""Replay MRT update dumps against the running deployment, as BGP sessions of many virtual routers.

    ray job submit --working-dir . -- python jobs/replay.py updates.20100722.2015.gz \
        --sessions 40 --vrouters 10 --speed 60 --verify

Every peer recorded in the dumps becomes a session stream (its exact UPDATE bytes and times,
apsv.runtime.driver); `--sessions` sessions are spread over `--vrouters` virtual routers of
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
from types import SimpleNamespace
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
    from apsv.runtime import driver

    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"replay: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.speed is not None and args.speed <= 0:
        print("replay: --speed must be positive", file=sys.stderr)
        return 2
    streams = driver.load_streams(args.files, min_messages=args.min_messages)
    try:
        plan = driver.plan_sessions(streams, args.sessions or len(streams), args.vrouters, args.tenant)
    except ValueError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2

    from apsv.runtime.client import OffloadClient
    from apsv.runtime.cluster import find_deployment

    im: Any  # Ray types a handle's methods as unreachable
    vpsm: Any
    try:
        im, vpsm = find_deployment(args.namespace, args.multiplexer, args.vpsm)
    except LookupError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 1
    client = OffloadClient(im, metrics_label="replay-job")
    opened: list[Any] = []
    try:
        placed = client.open_sessions([(s.key, "bgp", s.config(), 0) for s in plan])
        opened = [k for k, where in placed.items() if not where.startswith("error")]
        refused = {k: where for k, where in placed.items() if where.startswith("error")}
        if refused:
            k, why = next(iter(refused.items()))
            hint = " (sessions of an earlier replay? give another --tenant)" if "already open" in why else ""
            print(f"replay: {len(refused)} of {len(plan)} sessions refused, e.g. {k}: {why}{hint}", file=sys.stderr)
            return 1
        res = driver.replay(client, plan, speed=args.speed)
        result: dict[str, Any] = {
            "files": [str(f) for f in args.files],
            "recorded_peers": len(streams),
            "sessions": len(plan),
            "vrouters": sorted({f"{s.key[0]}/{s.key[1]}" for s in plan}),
            "frames": res.frames,
            "seconds": round(res.seconds, 3),
            "frames_per_s": round(res.frames_per_s, 1),
            "transport": client.transport,
            "speed": args.speed,
            # per session: its key and the UPDATEs it was sent, for whoever checks the RIBs later
            "session_keys": [[*s.key, len(s.stream.messages)] for s in plan],
            "kept_open": not args.close,
        }
        problems: list[str] = []
        if args.verify:
            reference = driver.local_digests(plan)
            infos = driver.session_infos(SimpleNamespace(vpsm=vpsm, multiplexer=im))
            problems = driver.verify(plan, infos, reference)
            result["verified"] = not problems
            result["problems"] = problems[:20]
    finally:
        if opened and args.close:
            client.close_sessions(opened)
        client.close()
    text = json.dumps(result)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

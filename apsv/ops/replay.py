"""`apsv replay`: an MRT dump replayed into a running deployment, optionally checked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from apsv.ops.base import CALL_TIMEOUT_S, OpsError
from apsv.ops.status import connected


def plan_replay(
    paths: list[Path], sessions: int | None, vrouters: int, tenant: int, min_messages: int = 1
) -> tuple[list[Any], list[Any]]:
    """The recorded peers' streams of `paths` and the sessions they become: every peer a BGP
    session, reused round-robin up to `sessions` (default one per peer), spread over `vrouters`
    virtual routers of `tenant`. OpsError naming what is wrong."""
    from apsv.runtime.recorded_sessions import load_streams, plan_sessions

    for p in paths:
        if not p.is_file():
            raise OpsError(f"{p}: no such file")
    streams = load_streams(paths, min_messages=min_messages)
    if not streams:
        raise OpsError(f"{', '.join(map(str, paths))}: no BGP UPDATE messages from any peer to replay")
    try:
        return streams, plan_sessions(streams, sessions or len(streams), vrouters, tenant)
    except ValueError as e:
        raise OpsError(str(e)) from None


def replay_file(
    path: str | Path,
    *,
    sessions: int | None = None,
    vrouters: int = 1,
    speed: float | None = None,
    tenant: int = 1,
    verify: bool = False,
    keep: bool = False,
    address: str | None = None,
    namespace: str | None = None,
    token_path: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay an MRT update dump against the running deployment (`plan_replay`, `replay_plan`).
    The sessions are closed at the end unless `keep`."""
    p = Path(path)
    streams, plan = plan_replay([p], sessions, vrouters, tenant)
    with connected(address, namespace, token_path, job_name=f"apsv replay {p.name}") as (_t, vpsm, im):
        res = replay_plan(im, vpsm, plan, speed=speed, verify=verify, keep=keep, label="apsv-replay", progress=progress)
    return {
        "file": str(p),
        "recorded_peers": len(streams),
        "vrouters": len({s.key[1] for s in plan}),
        **res,
    }


def replay_plan(
    im: Any,
    vpsm: Any,
    plan: list[Any],
    *,
    speed: float | None,
    verify: bool,
    keep: bool,
    label: str,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Open the planned sessions through the multiplexer `im`, send each its UPDATEs in recorded
    order through an OffloadClient (as fast as possible, or `speed` times real time) and, with
    `verify`, check each against an in-process replay (every frame applied once, in order, the
    same Loc-RIB). OpsError if any session is refused; the sessions are closed at the end unless
    `keep`."""
    from apsv.runtime import recorded_sessions as driver
    from apsv.runtime.client import OffloadClient

    client = OffloadClient(im, metrics_label=label)
    opened: list[Any] = []
    try:
        placed = client.open_sessions([(s.key, "bgp", s.config(), 0) for s in plan])
        opened = [k for k, v in placed.items() if not v.startswith("error")]
        refused = {k: v for k, v in placed.items() if v.startswith("error")}
        if refused:
            k, why = next(iter(refused.items()))
            hint = " (another replay's sessions? use another --tenant)" if "already open" in why else ""
            raise OpsError(f"{len(refused)} of {len(plan)} sessions refused, e.g. {k}: {why}{hint}")
        total = sum(len(s.stream.messages) for s in plan)
        res = driver.replay(
            client, plan, speed=speed, on_progress=progress, progress_every=max(1, min(1000, total // 100))
        )
        if progress is not None:
            progress(res.frames, total)
        out: dict[str, Any] = {
            "sessions": len(plan),
            "frames": res.frames,
            "seconds": round(res.seconds, 3),
            "frames_per_s": round(res.frames_per_s, 1),
            "transport": client.transport,
            "speed": speed,
        }
        if verify:
            reference = driver.local_digests(plan)
            infos = driver.session_infos(SimpleNamespace(vpsm=vpsm, multiplexer=im))
            problems = driver.verify(plan, infos, reference)
            out["verified"] = not problems
            out["problems"] = problems[:20]
        out["kept_open"] = keep
        return out
    finally:
        if opened and not keep:
            with contextlib.suppress(Exception):
                client.close_sessions(opened, timeout=CALL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            client.close()

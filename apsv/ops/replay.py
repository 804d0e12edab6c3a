"""`apsv replay`: an MRT dump replayed into a running deployment, optionally checked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from apsv.ops.base import CALL_TIMEOUT_S, OpsError
from apsv.ops.status import connected


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
    """Replay an MRT update dump against the running deployment: every recorded peer becomes a
    BGP session (reused round-robin up to `sessions`, spread over `vrouters` virtual routers of
    `tenant`), its UPDATEs sent in recorded order through an OffloadClient (as fast as possible,
    or `speed` times real time). With `verify`, each session is checked against an in-process
    replay (every frame applied once, in order, the same Loc-RIB). The sessions are closed at the
    end unless `keep`."""
    from apsv.runtime.driver import load_streams, plan_sessions

    p = Path(path)
    if not p.is_file():
        raise OpsError(f"{p}: no such file")
    streams = load_streams([p])
    if not streams:
        raise OpsError(f"{p}: no BGP UPDATE messages from any peer to replay")
    n = sessions or len(streams)
    try:
        plan = plan_sessions(streams, n, vrouters, tenant)
    except ValueError as e:
        raise OpsError(str(e)) from None
    with connected(address, namespace, token_path, job_name=f"apsv replay {p.name}") as (_t, vpsm, im):
        return _replay(im, vpsm, plan, streams, p, speed=speed, verify=verify, keep=keep, progress=progress)


def _replay(
    im: Any,
    vpsm: Any,
    plan: list[Any],
    streams: list[Any],
    path: Path,
    *,
    speed: float | None,
    verify: bool,
    keep: bool,
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    from apsv.runtime import driver
    from apsv.runtime.client import OffloadClient

    client = OffloadClient(im, metrics_label="apsv-replay")
    keys = [s.key for s in plan]
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
            "file": str(path),
            "recorded_peers": len(streams),
            "sessions": len(plan),
            "vrouters": len({k[1] for k in keys}),
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
            out["problems"] = problems[:10]
        out["kept_open"] = keep
        return out
    finally:
        if opened and not keep:
            with contextlib.suppress(Exception):
                client.close_sessions(opened, timeout=CALL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            client.close()

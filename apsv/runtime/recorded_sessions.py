"""Replaying MRT update dumps as many BGP sessions of many virtual routers (the agent's seed).

Each peer recorded in a dump becomes one session stream: the exact UPDATE bytes that peer sent,
with their recorded times. A replay plan spreads those streams over virtual routers (a stream
can serve several virtual routers - each gets its own session and its own Loc-RIB), then sends
every session's messages through an `OffloadClient` in recorded-time order: as fast as possible,
in real time, or time-compressed by a factor.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apsv.bgp import constants as C
from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.session import BgpSession
from apsv.frame import ProtocolId
from apsv.mrt.reader import MrtReader
from apsv.mrt.records import BgpMessageRecord
from apsv.runtime.client import OffloadClient
from apsv.runtime.host import Key


@dataclass
class Stream:
    """What one recorded peer sent: UPDATE messages (header included) and their times."""

    source: str
    peer_ip: str
    peer_as: int
    local_as: int
    asn4: bool
    messages: list[bytes]
    times: list[float]


@dataclass
class ReplaySession:
    key: Key
    stream: Stream

    def config(self) -> dict[str, Any]:
        s = self.stream
        return {
            "local_as": s.local_as or 65535,
            "router_id": "192.0.2.254",
            "peer_as": s.peer_as,
            "peer_address": s.peer_ip,
            "families": ["ipv4-unicast", "ipv6-unicast"],
            "hold_time": 0,
            "enforce_first_as": False,
            "replay": {"asn4": s.asn4},
        }


def load_streams(paths: Iterable[str | Path], min_messages: int = 1) -> list[Stream]:
    """One stream per (file, peer), in the order peers first appear; peers with fewer messages dropped."""
    streams: list[Stream] = []
    for path in paths:
        per: dict[tuple[str, int], Stream] = {}
        with MrtReader(path) as r:
            for item in r:
                if (
                    isinstance(item, BgpMessageRecord)
                    and item.msg_type == C.MSG_UPDATE
                    and item.raw_header
                    and not item.local
                ):
                    k = (item.peer_ip, item.peer_as)
                    s = per.get(k)
                    if s is None:
                        s = per[k] = Stream(
                            Path(path).name, item.peer_ip, item.peer_as, item.local_as, item.asn4, [], []
                        )
                    s.messages.append(item.raw_header + item.body)
                    s.times.append(item.timestamp)
        streams.extend(s for s in per.values() if len(s.messages) >= min_messages)
    return streams


def plan_sessions(streams: list[Stream], sessions: int, vrouters: int, tenant: int = 1) -> list[ReplaySession]:
    """`sessions` sessions spread evenly over `vrouters` virtual routers, streams reused round-robin."""
    if not streams:
        raise ValueError("no recorded peer streams to replay")
    if vrouters < 1 or sessions < vrouters:
        raise ValueError(f"need at least one session per virtual router ({sessions} sessions, {vrouters} vrouters)")
    out = []
    for i in range(sessions):
        vr = i % vrouters + 1
        sid = i // vrouters + 1
        out.append(ReplaySession((tenant, vr, int(ProtocolId.BGP), sid), streams[i % len(streams)]))
    return out


@dataclass
class ReplayResult:
    frames: int
    seconds: float
    frames_per_s: float


def replay(
    client: OffloadClient,
    sessions: list[ReplaySession],
    *,
    speed: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress_every: int = 1000,
) -> ReplayResult:
    """Send every session's messages in recorded-time order (speed None: as fast as possible;
    1.0: real time; 60: a minute per second). `on_progress(sent, total)` is called as it goes."""
    total = sum(len(s.stream.messages) for s in sessions)
    heap: list[tuple[float, int, int]] = []
    for i, s in enumerate(sessions):
        if s.stream.messages:
            heap.append((s.stream.times[0], i, 0))
    heapq.heapify(heap)
    t_start = time.perf_counter()
    rec_start = heap[0][0] if heap else 0.0
    sent = 0
    while heap:
        ts, i, j = heapq.heappop(heap)
        if speed:
            due = (ts - rec_start) / speed
            ahead = due - (time.perf_counter() - t_start)
            if ahead > 0.0005:
                # nothing due before then: what was sent goes out, answers are taken in meanwhile
                client.service()
                client.flush()
                while (ahead := due - (time.perf_counter() - t_start)) > 0:
                    client.wait(ahead)
        s = sessions[i]
        client.send(s.key, s.stream.messages[j])
        sent += 1
        if j + 1 < len(s.stream.messages):
            heapq.heappush(heap, (s.stream.times[j + 1], i, j + 1))
        if on_progress is not None and sent % progress_every == 0:
            on_progress(sent, total)
    client.drain()
    dt = time.perf_counter() - t_start
    return ReplayResult(sent, dt, sent / dt if dt else 0.0)


def local_digests(sessions: list[ReplaySession]) -> dict[Key, str]:
    """The RIB digest each session ends with in a plain in-process replay (the reference)."""
    cache: dict[int, str] = {}
    out: dict[Key, str] = {}
    for s in sessions:
        sid = id(s.stream)
        if sid not in cache:
            cfg = dict(s.config())
            replay_opts = cfg.pop("replay")
            session = BgpSession.established(BgpSessionConfig.model_validate(cfg), asn4=bool(replay_opts["asn4"]))
            for msg, ts in zip(s.stream.messages, s.stream.times, strict=True):
                session.data_received(msg, ts)
            cache[sid] = session.rib_digest()
        out[s.key] = cache[sid]
    return out


def session_infos(deployment: Any, keys: list[Key] | None = None) -> dict[Key, dict[str, Any]]:
    """Open sessions' counters and state, asked (by the multiplexer) of the instances holding
    them now: a session the control loop moves meanwhile is asked again where it went."""
    import ray

    infos: dict[Key, dict[str, Any]] = ray.get(deployment.multiplexer.session_infos.remote(keys))
    return {tuple(k): v for k, v in infos.items()}  # type: ignore[misc]


def verify(sessions: list[ReplaySession], infos: dict[Key, dict[str, Any]], reference: dict[Key, str]) -> list[str]:
    """What is wrong with a finished replay (empty: every session got each of its frames once, in
    order, and ended with the same RIB as the in-process reference)."""
    problems = []
    for s in sessions:
        info = infos.get(s.key)
        n = len(s.stream.messages)
        if info is None:
            problems.append(f"{s.key}: not open anywhere")
        elif info["last_seq"] != n or info["frames"] != n:
            problems.append(f"{s.key}: applied {info['frames']} frames up to seq {info['last_seq']}, sent {n}")
        elif info["gaps"]:
            problems.append(f"{s.key}: {info['gaps']} gaps")
        elif info.get("rib_digest") != reference[s.key]:
            problems.append(f"{s.key}: RIB differs from the in-process replay")
    return problems

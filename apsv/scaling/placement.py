"""Where a new session goes: power-of-two-choices on live load (pure functions).

The multiplexer keeps a view of each instance - its sessions, and how busy the VPSM last saw it -
and places a new session on the less loaded of two instances sampled at random (Mitzenmacher's
"power of two choices": nearly the balance of always picking the least loaded, without every
placement herding onto the same one).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class InstanceLoad:
    instance_id: str
    sessions: int
    max_sessions: int
    inflight_bytes: int  # queued against its quota: the simulator's queue; 0 live (frames bypass the IM)
    quota_bytes: int
    busy: float  # smoothed fraction of wall time spent applying batches (0..1+)
    accepting: bool = True  # False while draining or dead


def load_score(v: InstanceLoad) -> float:
    """Higher is busier. Sessions and in-flight bytes are normalised by the instance's capacity."""
    return v.sessions / max(v.max_sessions, 1) + 0.5 * v.inflight_bytes / max(v.quota_bytes, 1) + v.busy


def choose_instance(candidates: list[InstanceLoad], rng: random.Random) -> str | None:
    """The instance a new session should go to, or None if no instance can take it."""
    pool = [c for c in candidates if c.accepting and c.sessions < c.max_sessions]
    if not pool:
        return None
    pick = pool if len(pool) <= 2 else rng.sample(pool, 2)
    return min(pick, key=lambda c: (load_score(c), c.sessions, c.instance_id)).instance_id


def least_used(candidates: list[InstanceLoad]) -> str | None:
    """The instance to drain first on scale-down: the one with the fewest sessions (its drain
    moves the least state), the oldest of equals (list order: the caller lists oldest first)."""
    pool = [(c.sessions, i, c.instance_id) for i, c in enumerate(candidates) if c.accepting]
    return min(pool)[2] if pool else None


def rebalance_moves(
    candidates: list[InstanceLoad],
    sessions_of: dict[str, list[Any]],
    weight_of: Mapping[Any, float] | None = None,
    max_moves: int | None = None,
) -> list[tuple[Any, str]]:
    """Moves (session, target instance) that even out the load after new instances join.

    Without weights: session counts; each instance ends with floor or ceil of the mean, sessions
    leaving the fullest instances first. With `weight_of` (each session's message rate): the
    heaviest movable session of the busiest instance goes to the idlest, as long as that lowers
    the busier of the two, at most `max_moves` times (each move pauses a session). Each
    session appears at most once.
    """
    live = [c for c in candidates if c.accepting]
    if len(live) < 2:
        return []
    if weight_of is not None:
        return _weighted_moves(live, sessions_of, weight_of, max_moves)
    total = sum(len(sessions_of.get(c.instance_id, [])) for c in live)
    base, extra = divmod(total, len(live))
    # The fullest instances may keep one more than the mean.
    order = sorted(live, key=lambda c: -len(sessions_of.get(c.instance_id, [])))
    target = {c.instance_id: base + (1 if i < extra else 0) for i, c in enumerate(order)}
    surplus: list[Any] = []
    for c in order:
        have = list(sessions_of.get(c.instance_id, []))
        if len(have) > target[c.instance_id]:
            surplus.extend(have[target[c.instance_id] :])
    moves: list[tuple[Any, str]] = []
    for c in reversed(order):
        need = target[c.instance_id] - len(sessions_of.get(c.instance_id, []))
        while need > 0 and surplus:
            moves.append((surplus.pop(), c.instance_id))
            need -= 1
    return moves


def _weighted_moves(
    live: list[InstanceLoad], sessions_of: dict[str, list[Any]], weight_of: Mapping[Any, float], max_moves: int | None
) -> list[tuple[Any, str]]:
    members = {
        c.instance_id: sorted(sessions_of.get(c.instance_id, []), key=lambda s: -weight_of.get(s, 0.0)) for c in live
    }
    load = {i: sum(weight_of.get(s, 0.0) for s in ss) for i, ss in members.items()}
    limit = max_moves if max_moves is not None else sum(len(v) for v in members.values())
    # heaps of (load, id) with lazy invalidation: O(log n) per move with thousands of instances
    busiest = [(-v, i) for i, v in load.items()]
    idlest = [(v, i) for i, v in load.items()]
    heapq.heapify(busiest)
    heapq.heapify(idlest)
    home = {s: i for i, ss in members.items() for s in ss}
    moves: list[tuple[Any, str]] = []
    while len(moves) < limit and busiest and idlest:
        neg, hi = busiest[0]
        if -neg != load[hi]:
            heapq.heappop(busiest)
            continue
        v_lo, lo = idlest[0]
        if v_lo != load[lo]:
            heapq.heappop(idlest)
            continue
        gap = load[hi] - load[lo]
        # the heaviest session whose move lowers the busier of the two: weight < gap
        pick = next((s for s in members[hi] if 0.0 < weight_of.get(s, 0.0) < gap), None)
        if pick is None or hi == lo:
            break
        w = weight_of.get(pick, 0.0)
        members[hi].remove(pick)
        members[lo].append(pick)
        load[hi] -= w
        load[lo] += w
        heapq.heappush(busiest, (-load[hi], hi))
        heapq.heappush(idlest, (load[lo], lo))
        heapq.heappush(busiest, (-load[lo], lo))
        heapq.heappush(idlest, (load[hi], hi))
        moves.append((pick, lo))
    # A session may have been picked twice (moved on from an instance it was moved to): one
    # move, to where it ended, and none if it ended where it was.
    final = dict(moves)
    return [(s, dst) for s, dst in final.items() if dst != home[s]]

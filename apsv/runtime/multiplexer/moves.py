"""Live moves: a source instance hands sessions straight to a target, between two batches;
drains and rebalancing are made of them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime.host import Key
from apsv.runtime.multiplexer.base import Parts
from apsv.runtime.multiplexer.records import LIVE, MOVING, PENDING, Inst, Rec
from apsv.scaling.placement import choose_instance, least_used, rebalance_moves

log = logging.getLogger("apsv.multiplexer")

MAX_CONCURRENT_MOVES = 64


class Moves(Parts):
    """Part of the `Multiplexer` actor (actor.py): its moves."""

    async def move_session(self, key: Key, dst: str, reason: str = "manual") -> None:
        """Move a live session to instance `dst`, losing and repeating no frame. `reason`
        (rebalance, drain, manual) only labels the move in the metrics."""
        await self.move_sessions([key], dst, reason)

    async def move_sessions(self, keys: list[Key], dst: str, reason: str = "manual") -> int:
        """Move live sessions to instance `dst`: each source hands its sessions over directly,
        between two batches (their frames queued there are refused and re-sent by their clients
        to `dst`). Returns how many moved."""
        await self._up()
        target = self.instances.get(dst)
        if target is None or not target.alive:
            raise RuntimeError(f"no live instance {dst} to move sessions to")
        by_src: dict[str, list[Rec]] = {}
        for k in keys:
            rec = self.sessions.get(k)
            if rec is not None and rec.state == LIVE and rec.instance_id != dst:
                by_src.setdefault(rec.instance_id, []).append(rec)
        results = await asyncio.gather(*(self._hand_over(s, rs, target, reason) for s, rs in by_src.items()))
        return sum(results)

    async def _hand_over(self, src_id: str, recs: list[Rec], target: Inst, reason: str) -> int:
        src = self.instances.get(src_id)
        if src is None or not src.alive:
            return 0
        t0 = time.perf_counter()
        for r in recs:
            r.state = MOVING
        try:
            results = await src.handle.hand_over.remote(
                [(r.key, r.epoch + 1) for r in recs], target.handle, target.instance_id
            )
        except (RayActorError, RayTaskError) as e:
            for r in recs:
                r.state = LIVE
            if isinstance(e, RayActorError) or "RayActorError" in repr(e):
                self._recover_soon(src_id)
                return 0
            raise
        moved = []
        for r, (err, epoch) in zip(recs, results, strict=True):
            r.state = LIVE
            if err is None:
                src.sessions.discard(r.key)
                target.sessions.add(r.key)
                r.instance_id, r.epoch = target.instance_id, epoch
                r.moves += 1
                moved.append(r)
            elif err == "not here":
                self.c.move_not_found += 1
            else:
                r.epoch = epoch  # (still on the source; past the epoch its client may have seen)
                self.c.move_failed += 1
                log.warning("moving %s to %s failed: %s", r.key, target.instance_id, err)
        self.c.moves += len(moved)
        self.c.move_seconds += (time.perf_counter() - t0) * len(moved)
        if moved:
            self.metrics.moved(src.protocol, reason, len(moved))
        self._changed(recs)
        await self._notify_settled()
        return len(moved)

    async def _move_all(self, moves: list[tuple[Key, str]], reason: str) -> int:
        """Make the moves, those from one instance to another together (one hand-over), the groups
        concurrently (at most MAX_CONCURRENT_MOVES at once). Raises the first failure after every
        move has ended."""
        gate = asyncio.Semaphore(MAX_CONCURRENT_MOVES)
        groups: dict[str, list[Key]] = {}
        for key, dst in moves:
            groups.setdefault(dst, []).append(key)

        async def one(keys: list[Key], dst: str) -> int:
            async with gate:
                return await self.move_sessions(keys, dst, reason)

        results = await asyncio.gather(*(one(ks, d) for d, ks in groups.items()), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return sum(r for r in results if isinstance(r, int))

    async def drain_instance(self, instance_id: str) -> int:
        """Move every session off an instance (to the others of its protocol). Returns how many."""
        await self._up()
        inst = self.instances[instance_id]
        inst.accepting = False
        others = [s for s in self.instances.values() if s.protocol == inst.protocol and s.instance_id != instance_id]
        planned: dict[str, int] = {}
        moves: list[tuple[Key, str]] = []
        waiting: list[Rec] = []
        for key in sorted(inst.sessions):
            rec = self.sessions.get(key)
            if rec is None:
                continue
            if rec.state == PENDING:
                waiting.append(rec)
                continue
            cands = [replace(s.load(), sessions=len(s.sessions) + planned.get(s.instance_id, 0)) for s in others]
            dst = choose_instance(cands, self.rng)
            if dst is None:
                inst.accepting = True
                raise RuntimeError(f"no other {inst.protocol} instance can take sessions from {instance_id}")
            planned[dst] = planned.get(dst, 0) + 1
            moves.append((key, dst))
        moved = await self._move_all(moves, "drain")
        if waiting:  # sessions still waiting for their restore: they wait elsewhere instead
            for rec in waiting:
                inst.sessions.discard(rec.key)
            await inst.handle.close_sessions.remote([r.key for r in waiting])
            await self._place(waiting)
        return moved + len(waiting)

    async def rebalance(self, protocol: str, by_load: bool = True) -> int:
        """Even out a protocol's instances by moving live sessions: by load - each session's
        frames so far, since sessions' rates are skewed (a busy router's weigh more) - or by
        session counts (`by_load` False, or while no session has sent anything)."""
        await self._up()
        insts = [s for s in self.instances.values() if s.protocol == protocol and s.alive]
        live = {
            s.instance_id: sorted(
                k for k in s.sessions if self.sessions.get(k, None) and self.sessions[k].state == LIVE
            )
            for s in insts
        }
        weights: dict[Key, float] = {}
        if by_load:
            answers = await asyncio.gather(*(s.handle.session_weights.remote() for s in insts), return_exceptions=True)
            for a in answers:
                if isinstance(a, dict):
                    weights.update({k: float(v) for k, v in a.items()})
        busy = by_load and any(weights.values())
        n = sum(len(v) for v in live.values())
        moves = rebalance_moves(
            [s.load() for s in insts],
            live,
            weight_of={k: weights.get(k, 0.0) + 1.0 for ks in live.values() for k in ks} if busy else None,
            max_moves=max(8, n // 4) if busy else None,
        )
        return await self._move_all(moves, "rebalance")

    async def least_used(self, protocol: str) -> str | None:
        await self._up()
        return least_used([s.load() for s in self.instances.values() if s.protocol == protocol])

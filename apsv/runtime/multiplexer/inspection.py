"""What the multiplexer shows: stats, instance loads, routes and session infos (for `apsv
status`, the benchmarks and the tests)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from apsv.runtime import persist
from apsv.runtime.host import Key
from apsv.runtime.multiplexer.base import Parts
from apsv.runtime.multiplexer.records import LIVE


class Inspection(Parts):
    """Part of the `Multiplexer` actor (actor.py): its inspection calls (status, stats, routes, session infos)."""

    async def node(self) -> str:
        return str(self.node_id)

    async def pid(self) -> int:
        return os.getpid()

    async def status_parts(self) -> dict[str, Any]:
        """What `apsv status` shows of the multiplexer, in one call: `stats`, `instance_loads`,
        `arrivals`."""
        return {
            "stats": await self.stats(),
            "instance_loads": await self.instance_loads(),
            "arrivals": await self.arrivals(),
        }

    async def instance_loads(self) -> dict[str, dict[str, Any]]:
        await self._up()
        return {
            iid: {
                "protocol": s.protocol,
                "sessions": len(s.sessions),
                "quota_bytes": s.quota_bytes,
                "busy": round(s.busy, 4),
                "accepting": s.accepting,
                "alive": s.alive,
                "endpoint": s.endpoint,
            }
            for iid, s in self.instances.items()
        }

    async def route_of(self, key: Key) -> str | None:
        await self._up()
        r = self.sessions.get(key)
        return None if r is None else r.instance_id

    async def routes_table(self) -> dict[str, list[Key]]:
        await self._up()
        out: dict[str, list[Key]] = {}
        for k, r in self.sessions.items():
            out.setdefault(r.instance_id, []).append(k)
        return out

    async def session_infos(self, keys: list[Key] | None = None) -> dict[Key, dict[str, Any]]:
        """Sessions' counters and state, asked of the instances holding them now (a session that
        moves meanwhile is asked again where it went)."""
        await self._up()
        want = [k for k in keys] if keys is not None else list(self.sessions)
        out: dict[Key, dict[str, Any]] = {}
        for _ in range(5):
            by_inst: dict[str, list[Key]] = {}
            for k in want:
                r = self.sessions.get(k)
                if r is not None and r.state == LIVE and self._alive(r.instance_id):
                    by_inst.setdefault(r.instance_id, []).append(k)
            answers = await asyncio.gather(
                *(self.instances[i].handle.session_infos.remote(ks) for i, ks in by_inst.items()),
                return_exceptions=True,
            )
            for ans in answers:
                if isinstance(ans, dict):
                    out.update({k: v for k, v in ans.items() if v is not None})
            want = [k for k in want if k not in out and k in self.sessions]
            if not want:
                break
            await asyncio.sleep(0.05)
        return out

    async def moved_sessions(self) -> int:
        """How many sessions have been moved live at least once."""
        return sum(1 for r in self.sessions.values() if r.moves)

    async def stats(self) -> dict[str, Any]:
        await self._up()
        c = self.c
        states: dict[str, int] = {}
        for r in self.sessions.values():
            states[r.state] = states.get(r.state, 0) + 1
        return {
            "instances": len(self.instances),
            "sessions": len(self.sessions),
            "clients": len(self.clients),
            "session_states": states,
            "route_version": self.version,
            "incarnation": self.incarnation,
            "moves": c.moves,
            "move_seconds": round(c.move_seconds, 4),
            "move_failed": c.move_failed,
            "move_not_found": c.move_not_found,
            "recoveries": c.recoveries,
            "sessions_recovered": c.sessions_recovered,
            "sessions_unplaced": c.sessions_unplaced,
            "sessions_reclaimed": c.sessions_reclaimed,
            "restarts": c.restarts,
            "rebuilt_sessions": c.rebuilt_sessions,
            "clients_reaped": c.clients_reaped,
            "sessions_reaped": c.sessions_reaped,
            "tenant_refusals": c.tenant_refusals,
            "quota_refusals": c.quota_refusals,
            "tenant_sessions": {str(t): n for t, n in sorted(self.tenant_sessions.items()) if n},
        }

    async def forget(self) -> None:
        """The deployment is being stopped on purpose: its plan goes (no restart should rebuild it)."""
        persist.forget(self.owner)

"""Recovery: an instance found dead has its sessions placed on the others as waiting; their
clients restore them there from their custody."""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime.multiplexer.base import Parts
from apsv.runtime.multiplexer.records import UNPLACED, Inst

log = logging.getLogger("apsv.multiplexer")

PROBE_TIMEOUT_S = 5.0  # how long an instance reported dead gets to answer


class Recovery(Parts):
    """Part of the `Multiplexer` actor (actor.py): its recovery."""

    async def report_failure(self, client: str, cred: bytes, instance_id: str) -> None:
        """A client lost its connection to an instance: if the instance is dead, recover it."""
        self._check(client, cred)
        await self._up()
        self._recover_soon(instance_id, probe=True)

    async def report_dead(self, instance_id: str) -> None:
        """Someone else (the VPSM) found an instance dead: recover its sessions now."""
        await self._up()
        inst = self.instances.get(instance_id)
        if inst is not None and inst.alive:
            self._recover_soon(instance_id)
            await asyncio.shield(self._recovering[instance_id])

    def _recover_soon(self, instance_id: str, probe: bool = False) -> None:
        task = self._recovering.get(instance_id)
        if task is not None and not task.done():
            return
        inst = self.instances.get(instance_id)
        if inst is None or not inst.alive:
            return
        self._recovering[instance_id] = asyncio.get_running_loop().create_task(self._recover(inst, probe))

    async def _recover(self, inst: Inst, probe: bool) -> None:
        if probe:
            try:
                await asyncio.wait_for(inst.handle.ready.remote(), PROBE_TIMEOUT_S)
                return  # it answers: the client's connection broke, not the instance
            except (RayActorError, RayTaskError, TimeoutError):
                pass
        inst.alive = False
        inst.accepting = False
        recs = [self.sessions[k] for k in inst.sessions if k in self.sessions]
        inst.sessions.clear()
        self.c.recoveries += 1
        log.warning(
            "instance %s died: %d sessions to restore elsewhere from their clients' custody",
            inst.instance_id,
            len(recs),
        )
        for r in recs:
            r.state = UNPLACED
        self._changed(recs)
        await self._place(recs)
        self.metrics.moved(inst.protocol, "recovery", len(recs))
        self._save_plan()

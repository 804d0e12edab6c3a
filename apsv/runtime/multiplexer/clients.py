"""Clients: registration, the route feed's long poll (`watch`), and the lease that reaps the
sessions of clients that died."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from apsv.runtime.credentials import credential
from apsv.runtime.multiplexer.base import Parts
from apsv.runtime.multiplexer.records import Client
from apsv.runtime.tenancy import client_name, tenant_of

log = logging.getLogger("apsv.multiplexer")

CLIENT_LEASE_S = 60.0  # a client with no watch out for this long is gone: its sessions are closed
CLOSED_OFFERS_KEEP_S = 600.0  # a closed client's offered counts stay visible to the VPSM this long


class Clients(Parts):
    """Part of the `Multiplexer` actor (actor.py): its clients."""

    async def register_client(
        self, node_id: str = "", tenant: int | None = None, buffer_bytes: int = 0
    ) -> dict[str, Any]:
        """A new client, for `tenant` (None: any tenant; see tenancy.py): its name, the
        credential it proves it with, and its tenant's quota. `buffer_bytes`: its buffer pool,
        which the tenant's `max_buffer_bytes` bounds (PermissionError past it)."""
        await self._up()
        quota = self.quotas.of(tenant)
        if tenant is not None and quota.max_buffer_bytes is not None:
            held = sum(c.buffer_bytes for c in self.clients.values() if tenant_of(c.client_id) == tenant)
            if held + buffer_bytes > quota.max_buffer_bytes:
                self.c.quota_refusals += 1
                raise PermissionError(
                    f"tenant {tenant}'s clients would hold {held + buffer_bytes} octets of buffers, "
                    f"over its quota of {quota.max_buffer_bytes}"
                )
        cid = client_name(tenant)
        cl = self._client(cid)
        cl.node_id, cl.buffer_bytes = node_id, int(buffer_bytes)
        return {
            "client": cid,
            "credential": credential(self._key, cid),
            "deployment": self.name,
            "tenant": tenant,
            "max_messages_per_s": quota.max_messages_per_s,
        }

    async def close_client(self, client: str, cred: bytes) -> None:
        await self._up()
        self._check(client, cred)
        cl = self._drop_client(client)
        if cl is not None and any((r := self.sessions.get(k)) is not None and r.owner == client for k in cl.keys):
            self.kept.add(client)  # its sessions stay open, with no lease (see `kept`)
            self._save_plan()

    def _drop_client(self, client: str) -> Client | None:
        """Forget a client (its offered counts stay visible a while); its long poll answers."""
        cl = self.clients.pop(client, None)
        if client in self.offered:
            self._closed_offers[client] = (time.monotonic(), self.offered.pop(client))
        if cl is not None:
            cl.changed.set()
        return cl

    async def watch(self, client: str, cred: bytes, since: tuple[str, int], timeout: float = 10.0) -> dict[str, Any]:
        """The long poll: the client's routes changed since `since` (all of them, `full`, when
        `since` is of another incarnation of this multiplexer), as soon as there are any, or
        nothing after `timeout`. A client always has one out (routefeed.py): that is how its
        lease is kept."""
        await self._up()
        cl = self._check(client, cred)
        cl.watching += 1
        cl.last_seen = time.monotonic()
        try:
            return await self._watch(cl, client, since, timeout)
        finally:
            cl.watching -= 1
            cl.last_seen = time.monotonic()

    async def _reap_clients(self) -> None:
        """Close the sessions of clients that have had no watch out for the lease: their process
        is gone (an agent's actor killed, a driver ended) and nothing else would ever close them -
        they would hold their instances' places and their tenant's quota for good."""
        await self._up()
        while True:
            await asyncio.sleep(max(0.5, self.client_lease_s / 4))
            try:
                await self._reap_once(time.monotonic())
            except Exception:  # (the next round tries again; the reaper must not die)
                log.exception("reaping clients failed")

    async def _reap_once(self, now: float) -> None:
        lease = self.client_lease_s
        for cid in [c for c, cl in self.clients.items() if cl.watching == 0 and now - cl.last_seen > lease]:
            cl = self._drop_client(cid)
            if cl is None:
                continue
            keys = [k for k in cl.keys if (r := self.sessions.get(k)) is not None and r.owner == cid]
            if not keys:  # (nothing held: e.g. a closed client's watch that Ray retried here after a restart)
                continue
            self.c.clients_reaped += 1
            self.c.sessions_reaped += len(keys)
            log.warning("client %s has not watched for %.0f s: %d sessions closed", cid, now - cl.last_seen, len(keys))
            await self._close_keys(cl, keys)

    async def _watch(self, cl: Client, client: str, since: tuple[str, int], timeout: float) -> dict[str, Any]:
        incarnation, version = since
        full = incarnation != self.incarnation
        deadline = time.monotonic() + timeout
        while True:
            if full:
                recs = {k: self.sessions[k] for k in cl.keys if k in self.sessions}
            else:
                recs = {k: r for k in cl.keys if (r := self.sessions.get(k)) is not None and r.version > version}
            if recs or full:
                return {"incarnation": self.incarnation, "version": self.version, "full": full, **self._answer(recs)}
            left = deadline - time.monotonic()
            if left <= 0 or client not in self.clients:
                return {"incarnation": self.incarnation, "version": self.version, "full": False, "routes": {}}
            cl.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cl.changed.wait(), left)

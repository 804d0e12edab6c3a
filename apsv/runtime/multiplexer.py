"""The Intelligent Multiplexer (IM): the control plane of the offload path - no frame passes through it.

Like Ray Serve's controller, or a router's route processor programming its line cards: it
decides, the clients and instances forward.

* **Session table.** Every session has a record: the client that owns it, the instance that
  holds it and the route's epoch, raised on every move. New sessions go to the less loaded of two
  sampled instances (`placement.py`: power of two choices on live load).
* **Routes out.** A client learns its sessions' routes when it opens them and, whenever one
  changes, from its long poll (`watch`); an instance refuses frames sent by an outdated route
  (fencing, `host.py`) and says where the session went, so a client never needs the
  multiplexer on the way of a frame.
* **Moves** (rebalancing, drains): the source instance hands the sessions straight to the target
  (`StackInstance.hand_over`), between two batches; the multiplexer only picks who moves where and
  publishes the new routes.
* **Recovery.** Session state never sits here: each client holds its sessions' last snapshots
  and the frames since (`custody.py`). When an instance dies, its sessions are placed on the
  others as waiting (`expect_sessions`) and their clients restore them there; with no instance
  of the protocol left, they wait, unplaced, for the VPSM's replacement.
* **Tenants** (`tenancy.py`): a client registered for a tenant opens and reclaims only that
  tenant's sessions; per-tenant quotas bound the sessions open and the clients' buffers, and
  give each client the message rate it keeps to.
* **Surviving its own death.** Ray restarts it; it reads its plan (the instances) from Ray's KV
  store and rebuilds the session table from the instances themselves. Meanwhile every session
  flows on the routes its client holds; opening one waits (bounded) until it is back. A client
  whose sessions it no longer knows (their instance died while it was down) reclaims them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime import persist
from apsv.runtime.credentials import credential, deployment_key, verify
from apsv.runtime.host import Key
from apsv.runtime.instance import instance_actor_name
from apsv.runtime.metrics import MultiplexerMetrics
from apsv.runtime.tenancy import TenantQuotas, client_name, tenant_of
from apsv.scaling.placement import InstanceLoad, choose_instance, least_used, rebalance_moves

log = logging.getLogger("apsv.multiplexer")

MAX_CONCURRENT_MOVES = 64
LOCATE_WAIT_S = 5.0  # how long `locate` waits for a session in motion to settle
PROBE_TIMEOUT_S = 5.0  # how long an instance reported dead gets to answer
CLIENT_LEASE_S = 60.0  # a client with no watch out for this long is gone: its sessions are closed
CLOSED_OFFERS_KEEP_S = 600.0  # a closed client's offered counts stay visible to the VPSM this long

LIVE, PENDING, MOVING, UNPLACED = "live", "pending", "moving", "unplaced"


@dataclass
class Inst:
    instance_id: str
    handle: Any
    protocol: str
    quota_bytes: int
    max_sessions: int
    node_id: str = ""
    endpoint: str = ""
    sessions: set[Key] = field(default_factory=set)
    busy: float = 0.0  # smoothed fraction of wall time applying batches (the VPSM observes it)
    accepting: bool = True
    alive: bool = True

    def load(self) -> InstanceLoad:
        return InstanceLoad(
            self.instance_id,
            len(self.sessions),
            self.max_sessions,
            0,
            self.quota_bytes,
            self.busy,
            self.accepting and self.alive,
        )

    def plan(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "quota_bytes": self.quota_bytes,
            "max_sessions": self.max_sessions,
            "node_id": self.node_id,
            "endpoint": self.endpoint,
            "accepting": self.accepting,
        }


@dataclass
class Rec:
    """A session's record: where it is, for whom."""

    key: Key
    protocol: str
    owner: str
    instance_id: str  # "" while unplaced
    epoch: int
    state: str = LIVE
    version: int = 0  # the route version when it last changed
    moves: int = 0

    def route(self) -> tuple[str, int, str]:
        return (self.instance_id, self.epoch, self.state)


@dataclass
class Client:
    client_id: str
    node_id: str = ""
    buffer_bytes: int = 0  # its buffer pool, as it declared at registration
    watching: int = 0  # its route watches outstanding here (a live client always has one)
    last_seen: float = field(default_factory=time.monotonic)  # when one last came or went
    keys: set[Key] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Counters:
    moves: int = 0
    move_seconds: float = 0.0  # summed over moved sessions: from the decision to their new route
    move_failed: int = 0  # sessions a target refused (they stayed where they were)
    move_not_found: int = 0  # sessions a move did not find on their source
    recoveries: int = 0  # instances found dead whose sessions were placed elsewhere
    sessions_recovered: int = 0  # placed again, to be restored from their clients' custody
    sessions_unplaced: int = 0  # recovered with no instance of their protocol left: waited for one
    sessions_reclaimed: int = 0  # re-registered by their clients after this multiplexer restarted
    restarts: int = 0  # times this multiplexer rebuilt its state after starting again
    rebuilt_sessions: int = 0
    clients_reaped: int = 0  # clients holding sessions that stopped watching for the lease: gone
    sessions_reaped: int = 0  # their sessions, closed
    tenant_refusals: int = 0  # sessions a client asked for outside the tenant it is registered for
    quota_refusals: int = 0  # sessions, or registrations, refused by a tenant quota


class Multiplexer:
    """Ray actor class (async). Create with `create_multiplexer`."""

    def __init__(
        self,
        name: str,
        namespace: str,
        seed: int = 0,
        tenants: Mapping[str, Any] | None = None,
        client_lease_s: float = CLIENT_LEASE_S,
    ) -> None:
        self.name = name
        self.client_lease_s = client_lease_s
        self.quotas = TenantQuotas.from_dict(tenants)
        self.tenant_sessions: dict[int, int] = {}  # sessions open per tenant (the quota counts these)
        self.namespace = namespace
        self.owner = f"{namespace}/{name}"  # its keys in Ray's KV store
        self.incarnation = uuid.uuid4().hex
        self.version = 0
        self.instances: dict[str, Inst] = {}
        self.sessions: dict[Key, Rec] = {}
        self.clients: dict[str, Client] = {}
        # Clients that closed leaving sessions open on purpose (`apsv replay --keep`): no lease
        # runs for them, and the plan keeps their names so a restart does not start one.
        self.kept: set[str] = set()
        self.c = Counters()
        self.rng = random.Random(seed)
        self.metrics = MultiplexerMetrics()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._key = deployment_key(self.owner)
        # Frames each client reports offered, per protocol (cumulative counts: the VPSM takes
        # the rate from each client's own, so a restart here - which forgets them until each
        # client reports again - never makes the load seem to go back); a closed client's final
        # counts are kept for CLOSED_OFFERS_KEEP_S, long enough for the VPSM to see them.
        self.offered: dict[str, dict[str, int]] = {}
        self._closed_offers: dict[str, tuple[float, dict[str, int]]] = {}
        self._recovering: dict[str, asyncio.Task[None]] = {}
        self._settled = asyncio.Condition()  # notified whenever a session's route changes
        # Rebuilt from the plan and the instances (after a restart) before any call is answered.
        self._ready = asyncio.get_event_loop().create_task(self._rebuild())
        self._reaper = asyncio.get_event_loop().create_task(self._reap_clients())

    async def _up(self) -> None:
        await asyncio.shield(self._ready)

    async def _rebuild(self) -> None:
        plan = persist.load(self.owner, "plan")
        if not plan:
            return
        self.c.restarts += 1
        self.kept = set(plan.get("kept", ()))
        for iid, p in plan.get("instances", {}).items():
            try:
                handle: Any = ray.get_actor(instance_actor_name(iid), namespace=self.namespace)
                report: list[tuple[Key, str, int, bool]] = await asyncio.wait_for(
                    handle.sessions_report.remote(), PROBE_TIMEOUT_S
                )
            except Exception as e:  # gone while we were down: its clients reclaim its sessions
                log.warning("instance %s in the plan did not answer (%r): dropped", iid, e)
                continue
            inst = Inst(iid, handle, p["protocol"], p["quota_bytes"], p["max_sessions"], p["node_id"], p["endpoint"])
            inst.accepting = p.get("accepting", True)
            self.instances[iid] = inst
            self.metrics.protocol_known(inst.protocol)
            for key, owner, epoch, pending in report:
                old = self.sessions.get(key)
                if old is not None and old.epoch >= epoch:
                    continue  # (an older copy left behind by a move cut short: the newer wins)
                self.sessions[key] = Rec(key, inst.protocol, owner, iid, epoch, PENDING if pending else LIVE)
                inst.sessions.add(key)
                if old is not None:
                    self.instances[old.instance_id].sessions.discard(key)
        for rec in self.sessions.values():
            if rec.owner not in self.kept:  # (a live client re-watches within its lease)
                self._client(rec.owner).keys.add(rec.key)
            self._count_tenant(rec.key, 1)
        self.c.rebuilt_sessions = len(self.sessions)
        self._save_plan()
        log.warning(
            "multiplexer %s rebuilt: %d instances, %d sessions", self.name, len(self.instances), len(self.sessions)
        )

    def _save_plan(self) -> None:
        owners = {r.owner for r in self.sessions.values()}
        self.kept &= owners  # (a kept client's last session gone: nothing left to keep)
        plan = {"instances": {i: s.plan() for i, s in self.instances.items()}, "kept": sorted(self.kept)}
        persist.save(self.owner, "plan", plan)

    def _client(self, client_id: str) -> Client:
        cl = self.clients.get(client_id)
        if cl is None:
            cl = self.clients[client_id] = Client(client_id)
        return cl

    def _check(self, client: str, cred: bytes) -> Client:
        if not verify(self._key, client, cred):
            raise PermissionError(f"credential refused for client {client!r}")
        return self._client(client)

    def _count_tenant(self, key: Key, n: int) -> None:
        self.tenant_sessions[key[0]] = self.tenant_sessions.get(key[0], 0) + n

    def _refusal(self, client: str, key: Key) -> str | None:
        """Why `client` may not open `key` (None: it may): another tenant's, or over its quota."""
        bound = tenant_of(client)
        if bound is not None and key[0] != bound:
            self.c.tenant_refusals += 1
            return f"error: session {key} is of tenant {key[0]}, not {bound} (this client's)"
        limit = self.quotas.of(key[0]).max_sessions
        if bound is not None and limit is not None and self.tenant_sessions.get(key[0], 0) >= limit:
            self.c.quota_refusals += 1
            return f"error: tenant {key[0]} is at its quota of {limit} sessions"
        return None

    def _changed(self, recs: list[Rec]) -> None:
        """Routes changed: a new version, the owners' long polls woken."""
        if not recs:
            return
        self.version += 1
        for rec in recs:
            rec.version = self.version
            cl = self.clients.get(rec.owner)
            if cl is not None:
                cl.changed.set()

    async def _notify_settled(self) -> None:
        async with self._settled:
            self._settled.notify_all()

    def _endpoints(self, iids: set[str]) -> dict[str, dict[str, Any]]:
        return {
            i: {"node_id": s.node_id, "endpoint": s.endpoint, "handle": s.handle, "window": s.quota_bytes}
            for i in iids
            if (s := self.instances.get(i)) is not None
        }

    def _answer(self, recs: Mapping[Key, Rec | None]) -> dict[str, Any]:
        routes = {k: (None if r is None else r.route()) for k, r in recs.items()}
        return {"routes": routes, "instances": self._endpoints({r.instance_id for r in recs.values() if r})}

    # -- clients -------------------------------------------------------------------------------

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

    # -- sessions ------------------------------------------------------------------------------

    async def open_sessions(
        self, client: str, cred: bytes, specs: list[tuple[Key, str, dict[str, Any], int]]
    ) -> dict[str, Any]:
        """Place and open sessions (key, protocol, config, emit events) for `client`. Answers
        {"placed": key -> instance or "error: ...", "routes", "instances"}. Opening a session
        this client already has answers its route (a call retried across a restart)."""
        await self._up()
        cl = self._check(client, cred)
        placed: dict[Key, str] = {}
        calls: dict[str, list[tuple[Key, dict[str, Any], int, str, int]]] = {}
        for key, protocol, config, emit in specs:
            rec = self.sessions.get(key)
            if rec is not None:
                placed[key] = rec.instance_id if rec.owner == client else f"error: session {key} already open"
                continue
            refused = self._refusal(client, key)
            if refused is not None:
                placed[key] = refused
                continue
            iid = choose_instance([s.load() for s in self.instances.values() if s.protocol == protocol], self.rng)
            if iid is None:
                placed[key] = f"error: no {protocol} instance can take a session"
                continue
            self.instances[iid].sessions.add(key)  # count it now so the next choice sees it
            self.sessions[key] = Rec(key, protocol, client, iid, 1)
            self._count_tenant(key, 1)
            placed[key] = iid
            calls.setdefault(iid, []).append((key, dict(config), int(emit), client, 1))
        answers = await asyncio.gather(
            *(self.instances[i].handle.open_sessions.remote(items) for i, items in calls.items()),
            return_exceptions=True,
        )
        for (iid, items), answer in zip(calls.items(), answers, strict=True):
            errors = (
                [f"instance {iid} failed: {type(answer).__name__}"] * len(items)
                if isinstance(answer, BaseException)
                else answer
            )
            for (key, *_), err in zip(items, errors, strict=True):
                if err is not None:
                    if self.sessions.pop(key, None) is not None:
                        self._count_tenant(key, -1)
                    self.instances[iid].sessions.discard(key)
                    placed[key] = f"error: {err}"
                else:
                    cl.keys.add(key)
        ok = {k: self.sessions[k] for k, v in placed.items() if not v.startswith("error")}
        return {"placed": placed, **self._answer(dict(ok))}

    async def close_sessions(self, client: str, cred: bytes, keys: list[Key]) -> None:
        await self._up()
        cl = self._check(client, cred)
        await self._close_keys(cl, keys)

    async def _close_keys(self, cl: Client, keys: list[Key]) -> None:
        by_inst: dict[str, list[Key]] = {}
        for k in keys:
            rec = self.sessions.get(k)
            if rec is None or rec.owner != cl.client_id:
                continue
            del self.sessions[k]
            self._count_tenant(k, -1)
            cl.keys.discard(k)
            inst = self.instances.get(rec.instance_id)
            if inst is not None:
                inst.sessions.discard(k)
                by_inst.setdefault(rec.instance_id, []).append(k)
        await asyncio.gather(
            *(self.instances[i].handle.close_sessions.remote(ks) for i, ks in by_inst.items()), return_exceptions=True
        )

    async def locate(self, client: str, cred: bytes, keys: list[Key]) -> dict[str, Any]:
        """Where the client's sessions are, once settled (a move or a recovery in progress is
        waited for, up to LOCATE_WAIT_S); None for a session this multiplexer does not know."""
        await self._up()
        self._check(client, cred)
        deadline = time.monotonic() + LOCATE_WAIT_S
        # (an instance found dead is being recovered: its sessions settle when that is done; one
        # not known dead is reported by the client that lost it - `report_failure`)
        async with self._settled:
            while time.monotonic() < deadline:
                unsettled = [
                    k
                    for k in keys
                    if (r := self.sessions.get(k)) is not None
                    and (r.state in (MOVING, UNPLACED) or (r.instance_id and not self._alive(r.instance_id)))
                ]
                if not unsettled:
                    break
                try:
                    await asyncio.wait_for(self._settled.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
        return self._answer(
            {k: self.sessions.get(k) if (r := self.sessions.get(k)) and r.owner == client else None for k in keys}
        )

    async def reclaim(self, client: str, cred: bytes, items: list[tuple[Key, str, int]]) -> dict[str, Any]:
        """Sessions a client holds in custody that this multiplexer does not know (their instance
        died while it was down): placed again, waiting for the client's restore."""
        await self._up()
        cl = self._check(client, cred)
        recs: list[Rec] = []
        for key, protocol, epoch in items:
            if key in self.sessions or self._refusal(client, key) is not None:
                continue
            rec = Rec(key, protocol, client, "", int(epoch), UNPLACED)
            self.sessions[key] = rec
            self._count_tenant(key, 1)
            cl.keys.add(key)
            recs.append(rec)
            self.c.sessions_reclaimed += 1
        await self._place(recs)
        return self._answer({k: self.sessions.get(k) for k, _, _ in items})

    async def _place(self, recs: list[Rec]) -> None:
        """Put sessions with no instance (their state in custody) on live ones, waiting for their
        clients' restore; those of a protocol with no instance stay unplaced."""
        by_dst: dict[str, list[Rec]] = {}
        planned: dict[str, int] = {}
        for rec in recs:
            cands = [
                replace(s.load(), sessions=len(s.sessions) + planned.get(s.instance_id, 0))
                for s in self.instances.values()
                if s.protocol == rec.protocol
            ]
            dst = choose_instance(cands, self.rng)
            if dst is None:
                self._unplace(rec)
                continue
            planned[dst] = planned.get(dst, 0) + 1
            by_dst.setdefault(dst, []).append(rec)
        for dst, group in by_dst.items():
            inst = self.instances[dst]
            epochs = {r.key: r.epoch + 1 for r in group}
            try:
                errors = await inst.handle.expect_sessions.remote([(r.key, r.owner, epochs[r.key]) for r in group])
            except (RayActorError, RayTaskError):
                errors = ["instance died"] * len(group)
                self._recover_soon(dst)
            for rec, err in zip(group, errors, strict=True):
                if err is None:
                    rec.instance_id, rec.epoch, rec.state = dst, epochs[rec.key], PENDING
                    inst.sessions.add(rec.key)
                    self.c.sessions_recovered += 1
                else:
                    self._unplace(rec)
        self._changed(recs)
        await self._notify_settled()

    def _unplace(self, rec: Rec) -> None:
        """No instance takes it now: it waits for one to register (the VPSM replaces the dead)."""
        if rec.state != UNPLACED or rec.instance_id:
            self.c.sessions_unplaced += 1
        rec.state, rec.instance_id = UNPLACED, ""

    async def restored(self, instance_id: str, keys: list[Key]) -> None:
        """An instance's waiting sessions were restored by their clients: live now."""
        await self._up()  # (a session rebuilt as pending is in the table by then)
        for k in keys:
            rec = self.sessions.get(k)
            if rec is not None and rec.instance_id == instance_id and rec.state == PENDING:
                rec.state = LIVE

    async def report_offered(self, client: str, cred: bytes, counts: dict[str, int]) -> None:
        """A client's cumulative frames offered per protocol (see OffloadClient.offer)."""
        await self._up()
        self._check(client, cred)
        if client in self.clients:
            self.offered[client] = {str(k): int(v) for k, v in counts.items()}

    async def offered_by_client(self) -> dict[str, dict[str, int]]:
        """Each client's cumulative frames offered per protocol, as last reported (including
        what backpressure still holds on its side: a saturated instance's throughput would
        understate the demand exactly when it matters), and closed clients' final counts."""
        now = time.monotonic()
        for cid in [c for c, (t, _) in self._closed_offers.items() if now - t > CLOSED_OFFERS_KEEP_S]:
            del self._closed_offers[cid]
        return {**{c: counts for c, (_, counts) in self._closed_offers.items()}, **self.offered}

    async def arrivals(self) -> dict[str, int]:
        """Frames offered per protocol, summed over the clients reported (`offered_by_client`)."""
        total: dict[str, int] = {}
        for counts in (await self.offered_by_client()).values():
            for proto, n in counts.items():
                total[proto] = total.get(proto, 0) + n
        return total

    # -- instances -----------------------------------------------------------------------------

    async def register_instance(
        self,
        instance_id: str,
        handle: Any,
        protocol: str,
        quota_bytes: int,
        max_sessions: int,
        node_id: str = "",
        endpoint: str = "",
    ) -> None:
        await self._up()
        self.instances[instance_id] = Inst(
            instance_id, handle, protocol, quota_bytes, max_sessions, node_id=node_id, endpoint=endpoint
        )
        self.metrics.protocol_known(protocol)
        self._save_plan()
        waiting = [r for r in self.sessions.values() if r.protocol == protocol and r.state == UNPLACED]
        if waiting:
            await self._place(waiting)

    async def remove_instance(self, instance_id: str) -> None:
        await self._up()
        inst = self.instances.get(instance_id)
        if inst is None:
            return
        if inst.sessions and inst.alive:
            raise RuntimeError(f"instance {instance_id} still holds {len(inst.sessions)} sessions; drain it first")
        del self.instances[instance_id]
        self._save_plan()
        self.metrics.instance_gone(instance_id, inst.protocol)

    async def set_accepting(self, instance_id: str, accepting: bool) -> None:
        """Open or close an instance to new and moved sessions (closed while it waits to be drained)."""
        await self._up()
        inst = self.instances.get(instance_id)
        if inst is not None:
            inst.accepting = accepting
            self._save_plan()

    async def observe(self, busy: dict[str, float]) -> None:
        """The VPSM's view of how busy each instance is (placement weighs it)."""
        await self._up()
        for iid, b in busy.items():
            inst = self.instances.get(iid)
            if inst is not None:
                inst.busy = float(b)

    def _alive(self, iid: str) -> bool:
        inst = self.instances.get(iid)
        return inst is not None and inst.alive

    # -- moves ---------------------------------------------------------------------------------

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

    # -- failure -------------------------------------------------------------------------------

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

    # -- inspection ----------------------------------------------------------------------------

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


# Calls the multiplexer runs at once: every client keeps a long poll open here, and locates wait
# for moves to settle. Waiting coroutines cost little.
MAX_CONCURRENCY = 4096


def create_multiplexer(
    name: str = "apsv-multiplexer",
    *,
    namespace: str = "apsv",
    seed: int = 0,
    detached: bool = False,
    resources: Mapping[str, float] | None = None,
    tenants: TenantQuotas | None = None,
    client_lease_s: float = CLIENT_LEASE_S,
) -> Any:
    """The multiplexer actor. Ray restarts it when its process dies (it rebuilds its state), and
    retries the calls that were in flight then. `resources`: its role's (`roles.Roles`);
    `tenants`: the tenants' quotas; `client_lease_s`: how long a client may have no route
    watch out before it is taken for gone and its sessions are closed."""
    cls = ray.remote(Multiplexer)
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "max_concurrency": MAX_CONCURRENCY,
        "num_cpus": 0,
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": -1,
    }
    if detached:  # outlives the driver that made it (`apsv up` exits once deployed)
        opts["lifetime"] = "detached"
    if resources:
        opts["resources"] = dict(resources)
    return cls.options(**opts).remote(name, namespace, seed, (tenants or TenantQuotas()).to_dict(), client_lease_s)

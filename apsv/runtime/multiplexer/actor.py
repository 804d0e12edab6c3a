"""The multiplexer actor: its state, the session table's changes, and opening and placing
sessions. Its clients, moves, recovery and inspection calls are in the modules beside it, as
parts of this one class (the package's docstring has the whole picture)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime import persist
from apsv.runtime.credentials import deployment_key, verify
from apsv.runtime.host import Key
from apsv.runtime.instance import instance_actor_name
from apsv.runtime.metrics import MultiplexerMetrics
from apsv.runtime.multiplexer.clients import CLIENT_LEASE_S, CLOSED_OFFERS_KEEP_S, Clients
from apsv.runtime.multiplexer.inspection import Inspection
from apsv.runtime.multiplexer.moves import Moves
from apsv.runtime.multiplexer.records import LIVE, MOVING, PENDING, UNPLACED, Client, Counters, Inst, Rec
from apsv.runtime.multiplexer.recovery import PROBE_TIMEOUT_S, Recovery
from apsv.runtime.tenancy import TenantQuotas, tenant_of
from apsv.scaling.placement import choose_instance

log = logging.getLogger("apsv.multiplexer")

LOCATE_WAIT_S = 5.0  # how long `locate` waits for a session in motion to settle


class Multiplexer(Clients, Moves, Recovery, Inspection):
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

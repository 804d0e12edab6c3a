"""The agent as a Ray actor, pinned to a virtual router's host, or as a standalone process.

As an actor (`create_agent_actor`), it runs in the actor's event loop; `resources` (for
example ``{"vrouter-host:edge-1": 0.001}``, a custom resource the host's `ray start` declares)
pins it to the machine whose sockets it must own. As a process (`run_standalone`, behind
`apsv agent run`), it connects to a running cluster and runs until interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from typing import Any

import ray

from apsv.agent.config import AgentConfig, parse_config
from apsv.agent.core import Agent
from apsv.gc_tuning import tune_gc
from apsv.runtime.cluster import MULTIPLEXER_NAME, NAMESPACE
from apsv.runtime.roles import Roles


class AgentActor:
    """Ray actor class (async). Create with `create_agent_actor`."""

    def __init__(self, config: Mapping[str, Any], multiplexer_name: str, namespace: str) -> None:
        tune_gc()  # its client's custody holds many long-lived objects: no walks over them per batch
        self.config = parse_config(dict(config), "agent actor")
        self.im = ray.get_actor(multiplexer_name, namespace=namespace)
        self.agent: Agent | None = None

    async def start(self) -> dict[str, str]:
        self.agent = Agent(self.config, self.im, keep_events=True)
        placed = await self.agent.start()
        return {str(k): v for k, v in placed.items()}

    async def command(self, vrouter: int, session: int, protocol: str, command: dict[str, Any]) -> None:
        assert self.agent is not None
        await self.agent.command(vrouter, session, protocol, command)

    async def events(self) -> list[dict[str, Any]]:
        """The events since the last call: the newest, within the agent's `max_events` and
        `max_event_bytes` (those dropped are counted in `status()`'s `events_dropped`)."""
        return self.agent.take_events() if self.agent else []

    async def status(self) -> dict[str, Any]:
        return self.agent.status() if self.agent else {}

    async def pid(self) -> int:
        return os.getpid()

    async def stop(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
            self.agent = None


def actor_config(config: AgentConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What the actor is started with: Python values, not JSON - a JSON dump masks secrets
    (the TCP MD5 keys would arrive as asterisks)."""
    return config.model_dump() if isinstance(config, AgentConfig) else dict(config)


def create_agent_actor(
    config: AgentConfig | Mapping[str, Any],
    *,
    multiplexer_name: str = MULTIPLEXER_NAME,
    namespace: str = NAMESPACE,
    resources: Mapping[str, float] | None = None,
    name: str | None = None,
    roles: Roles = Roles(),
) -> Any:
    """The agent as an actor on a node of the `vrouter_host` role (`roles`), plus any other
    `resources` (a particular host's, say)."""
    data = actor_config(config)
    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 64}
    wanted = {**roles.request("vrouter_host"), **(resources or {})}
    if wanted:
        opts["resources"] = wanted
    if name:
        opts["name"] = name
        opts["namespace"] = namespace
    return ray.remote(AgentActor).options(**opts).remote(data, multiplexer_name, namespace)


async def run_standalone(
    config: AgentConfig, *, multiplexer_name: str = MULTIPLEXER_NAME, namespace: str = NAMESPACE
) -> None:
    """Run the agent in this process (Ray already initialised) until SIGINT or SIGTERM."""
    im = ray.get_actor(multiplexer_name, namespace=namespace)
    agent = Agent(config, im)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()

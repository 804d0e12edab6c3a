"""The interface every protocol stack implements, and the registry that finds them.

A stack is sans-I/O, in the style of h11/h2/aioquic: it never touches a socket, a clock or a
file. The runtime feeds it what happened - bytes from the peer, the transport going up or
down, the current time - and it answers with events: bytes to send, the transport to open
or close, state changes and route changes for the virtual router. It says when it next
needs to be woken (`next_deadline`) and its whole state can be captured (`snapshot`) and
rebuilt elsewhere (`Stack.restore_session`), which is how APSV moves a live session.

Stacks register under the entry-point group ``apsv.stacks`` by protocol name, so a package
can add one without touching APSV:

    [project.entry-points."apsv.stacks"]
    bgp = "apsv.bgp.stack:BgpStack"
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "apsv.stacks"


# ---------------------------------------------------------------------------------------------
# Events a stack emits


class StackEvent:
    """Base of everything a stack returns."""

    __slots__ = ()
    route_event: ClassVar[bool] = False  # a routing-table change (bulky; a virtual router may not want them)

    def to_json(self) -> dict[str, Any]:
        return {"event": type(self).__name__}


@dataclass(slots=True, unsafe_hash=True)  # not frozen: one is made per message sent, and a frozen
class Send(StackEvent):  # dataclass's __init__ goes through object.__setattr__ (a third slower)
    """Bytes for the agent to write to the peer's transport (not to be changed once made)."""

    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {"event": "send", "octets": len(self.data)}


@dataclass(frozen=True, slots=True)
class OpenTransport(StackEvent):
    """The agent should open the transport towards the peer (BGP: an active TCP connection)."""

    def to_json(self) -> dict[str, Any]:
        return {"event": "open-transport"}


@dataclass(frozen=True, slots=True)
class CloseTransport(StackEvent):
    """The agent must close the transport (after sending anything emitted before this event)."""

    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"event": "close-transport", "reason": self.reason}


@dataclass(frozen=True, slots=True)
class TxProgram(StackEvent):
    """Periodic work the agent runs for the session until told otherwise (BFD: the packet to
    send, how often, and the detection timer to arm on each valid packet received) - the way a
    line card runs BFD for a route processor. The payload's format is the stack's own."""

    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {"event": "tx-program", "octets": len(self.data)}


@dataclass(frozen=True, slots=True)
class StateChanged(StackEvent):
    old: str
    new: str
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"event": "state", "old": self.old, "new": self.new, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class ProtocolProblem(StackEvent):
    """Something wrong in what the peer sent, handled without losing the session (e.g. RFC 7606)."""

    action: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "problem", "action": self.action, "detail": self.detail}


# ---------------------------------------------------------------------------------------------
# The interface


@runtime_checkable
class StackSession(Protocol):
    """One protocol session (a BGP peering, a BFD session) as a pure state machine."""

    protocol: ClassVar[str]

    def start(self, now: float) -> list[StackEvent]:
        """Administratively start the session (it may ask for a transport)."""
        ...

    def stop(self, now: float, reason: str = "") -> list[StackEvent]:
        """Administratively stop it."""
        ...

    def connection_made(self, now: float) -> list[StackEvent]:
        """The transport to the peer is up."""
        ...

    def connection_lost(self, now: float, reason: str = "") -> list[StackEvent]:
        """The transport went down (or failed to come up)."""
        ...

    def data_received(self, data: bytes | memoryview, now: float) -> list[StackEvent]:
        """Bytes arrived from the peer."""
        ...

    def next_deadline(self) -> float | None:
        """When on_timer must next be called (absolute time), or None."""
        ...

    def on_timer(self, now: float) -> list[StackEvent]:
        """Run every timer due at `now`."""
        ...

    def snapshot(self) -> bytes:
        """The session's complete state; Stack.restore_session(snapshot) continues it exactly."""
        ...

    # Optional, looked up by the host when the frame arrives (a stack without them counts an error):
    #   control(command: Mapping[str, Any], now) -> events    a CONTROL frame (JSON command)
    #   timer_expired(name: str, now) -> events               an EXPIRED frame (agent-run timer)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for telemetry (messages, routes, memory estimate, state)."""
        ...


class Stack(Protocol):
    """A protocol implementation: makes sessions from configuration or from snapshots."""

    name: ClassVar[str]
    protocol_id: ClassVar[int]

    def create_session(self, config: Mapping[str, Any]) -> StackSession: ...

    def restore_session(self, snapshot: bytes) -> StackSession: ...


# ---------------------------------------------------------------------------------------------
# The registry


class UnknownStackError(LookupError):
    pass


@functools.cache
def _installed_stacks() -> tuple[Any, ...]:
    # Reading the installed distributions' metadata takes ~14 ms, and every configuration check
    # asks: once per process (a stack installed later needs a new process, as its code does).
    return tuple(entry_points(group=ENTRY_POINT_GROUP))


@dataclass
class StackRegistry:
    """Stacks found through the ``apsv.stacks`` entry points (plus any registered in code)."""

    extra: dict[str, type[Any]] = field(default_factory=dict)

    def names(self) -> list[str]:
        found = {ep.name for ep in _installed_stacks()}
        return sorted(found | set(self.extra))

    def load(self, name: str) -> Stack:
        if name in self.extra:
            return self.extra[name]()  # type: ignore[no-any-return]
        for ep in _installed_stacks():
            if ep.name == name:
                cls = ep.load()
                return cls()  # type: ignore[no-any-return]
        raise UnknownStackError(
            f"no stack registered for protocol {name!r} (known: {', '.join(self.names()) or 'none'}); "
            f"stacks register under the entry-point group {ENTRY_POINT_GROUP!r}"
        )

    def register(self, name: str, cls: type[Any]) -> None:
        self.extra[name] = cls


REGISTRY = StackRegistry()


def load_stack(name: str) -> Stack:
    return REGISTRY.load(name)

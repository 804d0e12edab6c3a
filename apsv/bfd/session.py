"""A BFD session (RFC 5880 asynchronous mode, RFC 5881 single hop), sans-I/O.

The state machine is one table, `TRANSITIONS`: (our state, the state the peer reports) ->
(new state, diagnostic); a pair not in it leaves the state as it is. Timers follow §6.8.2-3:
while not Up we send no faster than once a second; going Up lowers the rate to the
configured one and starts a Poll Sequence, which ends when the peer answers with Final. The
agent runs the periodic transmission and the detection timer (`program.py`); this session
decides what they are, reacts to packets that say something new, and to the detection time
expiring. Its state survives snapshot/restore, so a session moved between instances stays Up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from apsv.bfd.packet import AuthKey, Diag, Packet, State, decode, encode, make_key, verify
from apsv.bfd.program import TxProgram as Program
from apsv.snapshot import SnapshotReader, SnapshotWriter, decodes_snapshot
from apsv.stacks.interface import StackEvent, StateChanged, TxProgram

SLOW_TX_US = 1_000_000  # §6.8.3: no faster than one packet a second while not Up

# (local state, remote state) -> (new local state, diagnostic to set, or None to keep it)
TRANSITIONS: dict[tuple[State, State], tuple[State, Diag | None]] = {
    (State.DOWN, State.DOWN): (State.INIT, None),
    (State.DOWN, State.INIT): (State.UP, Diag.NONE),
    (State.INIT, State.INIT): (State.UP, Diag.NONE),
    (State.INIT, State.UP): (State.UP, Diag.NONE),
    (State.INIT, State.ADMIN_DOWN): (State.DOWN, Diag.NEIGHBOR_SIGNALED_SESSION_DOWN),
    (State.UP, State.DOWN): (State.DOWN, Diag.NEIGHBOR_SIGNALED_SESSION_DOWN),
    (State.UP, State.ADMIN_DOWN): (State.DOWN, Diag.NEIGHBOR_SIGNALED_SESSION_DOWN),
}


class BfdAuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str  # simple, keyed-md5, meticulous-keyed-md5, keyed-sha1, meticulous-keyed-sha1
    key_id: int = Field(ge=0, le=255)
    secret: str = Field(min_length=1, max_length=20)

    def key(self) -> AuthKey:
        return make_key(self.type, self.key_id, self.secret.encode())

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        make_key(v, 0, b"x")  # raises with the list of known types
        return v


class BfdSessionConfig(BaseModel):
    """One BFD session of a virtual router (times in milliseconds, as operators write them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_address: str
    local_address: str
    local_discriminator: int = Field(ge=1, le=0xFFFFFFFF)
    desired_min_tx_ms: float = Field(default=300.0, ge=1.0, le=60_000.0)
    required_min_rx_ms: float = Field(default=300.0, ge=0.0, le=60_000.0)
    detect_mult: int = Field(default=3, ge=1, le=255)
    auth: BfdAuthConfig | None = None
    netns: str | None = None  # the agent opens the session's socket in this network namespace

    @field_validator("peer_address", "local_address")
    @classmethod
    def _addr(cls, v: str) -> str:
        import ipaddress

        try:
            return str(ipaddress.ip_address(v))
        except ValueError as e:
            raise ValueError(f"{v!r} is not an IP address ({e})") from None


class BfdSession:
    protocol: ClassVar[str] = "bfd"

    def __init__(self, config: BfdSessionConfig) -> None:
        self.config = config
        self.key: AuthKey | None = config.auth.key() if config.auth else None
        self.state = State.DOWN
        self.diag = Diag.NONE
        self.local_disc = config.local_discriminator
        self.remote_disc = 0
        self.remote_state = State.DOWN
        self.remote_min_rx_us = 1  # §6.8.1 initial value
        self.remote_desired_tx_us = 0
        self.remote_detect_mult = 0
        self.desired_tx_us = max(int(config.desired_min_tx_ms * 1000), SLOW_TX_US)
        self.required_rx_us = int(config.required_min_rx_ms * 1000)
        self.polling = False  # sending P, waiting for F
        self.admin_down = False
        self.counters: dict[str, int] = {"packets_in": 0, "discarded": 0, "up": 0, "down": 0, "detect_expired": 0}
        self._last_program: bytes = b""

    # -- the stack interface -------------------------------------------------------------------

    def start(self, now: float) -> list[StackEvent]:
        return self._program(once=True)

    def stop(self, now: float, reason: str = "") -> list[StackEvent]:
        self.admin_down = True
        return self._set_state(State.ADMIN_DOWN, Diag.ADMINISTRATIVELY_DOWN, reason or "administratively down")

    def connection_made(self, now: float) -> list[StackEvent]:
        return []  # BFD runs over UDP: nothing to connect

    def connection_lost(self, now: float, reason: str = "") -> list[StackEvent]:
        return []

    def data_received(self, data: bytes | memoryview, now: float) -> list[StackEvent]:
        """A packet the agent received, authenticated and found to say something new."""
        self.counters["packets_in"] += 1
        try:
            p = decode(data)
        except ValueError:
            self.counters["discarded"] += 1
            return []
        # The agent checked the sequence window (it sees every packet); the secret is checked again.
        if verify(data, p, self.key) or (p.your_disc and p.your_disc != self.local_disc):
            self.counters["discarded"] += 1
            return []
        self.remote_disc = p.my_disc
        self.remote_state = p.state
        self.remote_min_rx_us = p.required_min_rx_us
        self.remote_desired_tx_us = p.desired_min_tx_us
        self.remote_detect_mult = p.detect_mult
        if p.final and self.polling:
            self.polling = False  # the Poll Sequence is over: the new timers hold on both sides
        events: list[StackEvent] = []
        if self.state is not State.ADMIN_DOWN:
            nxt = TRANSITIONS.get((self.state, p.state))
            if nxt is not None:
                state, diag = nxt
                events += self._set_state(state, self.diag if diag is None else diag, f"peer is {p.state.name}", False)
        return events + self._program(final=p.poll, once=bool(events))

    def timer_expired(self, name: str, now: float) -> list[StackEvent]:
        """The agent's detection timer ran out: no valid packet for the detection time."""
        if name != "detect":
            raise ValueError(f"bfd: no timer named {name!r}")
        if self.state not in (State.INIT, State.UP):
            return []
        self.counters["detect_expired"] += 1
        self.remote_disc = 0  # §6.8.1: forgotten when the detection time expires
        self.remote_state = State.DOWN
        return self._set_state(State.DOWN, Diag.CONTROL_DETECTION_TIME_EXPIRED, "detection time expired")

    def control(self, command: Mapping[str, Any], now: float) -> list[StackEvent]:
        op = command.get("op")
        if op == "admin-down":
            return self.stop(now, str(command.get("reason", "")))
        if op == "admin-up":
            if not self.admin_down:
                return []
            self.admin_down = False
            return self._set_state(State.DOWN, Diag.NONE, "administratively up")
        raise ValueError(f"bfd: unknown command op {op!r} (admin-down, admin-up)")

    def next_deadline(self) -> float | None:
        return None  # every timer runs in the agent

    def on_timer(self, now: float) -> list[StackEvent]:
        return []

    # -- state and timers ----------------------------------------------------------------------

    def _set_state(self, state: State, diag: Diag, reason: str, program: bool = True) -> list[StackEvent]:
        old = self.state
        self.diag = diag
        events: list[StackEvent] = []
        if state != old:
            self.state = state
            if state is State.UP:
                self.counters["up"] += 1
            elif old is State.UP:
                self.counters["down"] += 1
            configured = int(self.config.desired_min_tx_ms * 1000)
            if state is State.UP:
                if configured < self.desired_tx_us:
                    # Faster once Up: allowed at once, announced by a Poll Sequence (§6.8.3).
                    self.desired_tx_us = configured
                    self.polling = True
            elif old is State.UP or self.desired_tx_us < SLOW_TX_US:
                self.desired_tx_us = max(configured, SLOW_TX_US)
                self.polling = False
            events.append(StateChanged(old.name, state.name, f"{reason} (diag {diag.name})"))
        if program:
            events += self._program(once=state != old)
        return events

    def _packet(self, poll: bool, final: bool) -> Packet:
        state = State.ADMIN_DOWN if self.admin_down else self.state
        return Packet(
            state=state,
            my_disc=self.local_disc,
            your_disc=self.remote_disc,
            desired_min_tx_us=self.desired_tx_us,
            required_min_rx_us=self.required_rx_us,
            detect_mult=self.config.detect_mult,
            diag=self.diag,
            poll=poll,
            final=final,
        )

    def tx_interval_us(self) -> int:
        if self.remote_min_rx_us == 0:
            return 0  # §6.8.7: the peer wants no packets
        return max(self.desired_tx_us, self.remote_min_rx_us)

    def detect_time_us(self) -> int:
        if self.state not in (State.INIT, State.UP) or not self.remote_detect_mult:
            return 0
        return self.remote_detect_mult * max(self.required_rx_us, self.remote_desired_tx_us)

    def _program(self, final: bool = False, once: bool = False) -> list[StackEvent]:
        """The program for the agent, if it changed (or a one-off packet is due)."""
        periodic = encode(self._packet(self.polling, False))
        one = encode(self._packet(False, True)) if final else encode(self._packet(self.polling, False)) if once else b""
        prog = Program(periodic, self.tx_interval_us(), self.detect_time_us(), self.config.detect_mult, one)
        body = prog.encode()
        if not one and body == self._last_program:
            return []
        self._last_program = Program(periodic, prog.tx_interval_us, prog.detect_time_us, prog.detect_mult).encode()
        return [TxProgram(body)]

    # -- snapshot ------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        w = SnapshotWriter(self.protocol)
        w.str(self.config.model_dump_json())
        for v in (
            int(self.state),
            int(self.diag),
            int(self.remote_state),
            int(self.polling),
            int(self.admin_down),
        ):
            w.u8(v)
        for v in (
            self.local_disc,
            self.remote_disc,
            self.remote_min_rx_us,
            self.remote_desired_tx_us,
            self.remote_detect_mult,
            self.desired_tx_us,
            self.required_rx_us,
        ):
            w.u64(v)
        w.str(json.dumps(self.counters))
        w.blob(self._last_program)
        return w.getvalue()

    @classmethod
    @decodes_snapshot
    def restore(cls, blob: bytes) -> BfdSession:
        r = SnapshotReader(blob, cls.protocol)
        s = cls(BfdSessionConfig.model_validate_json(r.str()))
        s.state, s.diag, s.remote_state = State(r.u8()), Diag(r.u8()), State(r.u8())
        s.polling, s.admin_down = bool(r.u8()), bool(r.u8())
        (
            s.local_disc,
            s.remote_disc,
            s.remote_min_rx_us,
            s.remote_desired_tx_us,
            s.remote_detect_mult,
            s.desired_tx_us,
            s.required_rx_us,
        ) = (r.u64() for _ in range(7))
        s.counters = json.loads(r.str())
        s._last_program = bytes(r.blob())
        r.done()
        return s

    def stats(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "state": self.state.name,
            "diag": self.diag.name,
            "remote_state": self.remote_state.name,
            "local_discriminator": self.local_disc,
            "remote_discriminator": self.remote_disc,
            "tx_interval_ms": self.tx_interval_us() / 1000,
            "detect_time_ms": self.detect_time_us() / 1000,
            **self.counters,
        }


class BfdStack:
    name: ClassVar[str] = "bfd"
    protocol_id: ClassVar[int] = 2

    def create_session(self, config: Mapping[str, Any]) -> BfdSession:
        return BfdSession(BfdSessionConfig.model_validate(dict(config)))

    def restore_session(self, snapshot: bytes) -> BfdSession:
        return BfdSession.restore(snapshot)

"""The agent's configuration: virtual routers and their sessions, in TOML.

```toml
tenant = 1
events = "events.jsonl"          # optional: also write every event as a JSON line here

[[vrouters]]
id = 1
name = "edge-1"

  [[vrouters.bgp]]
  session = 1
  mode = "passive"               # passive: listen for the peer; active: connect to it
  listen = "127.0.0.10:1790"     # passive sessions: where the agent listens (shared by sessions)
  peer = "127.0.0.3"             # the peer's address (active: "address:port")
  local_as = 65010
  peer_as = 65003
  router_id = "10.0.0.10"
  hold_time = 9
  families = ["ipv4-unicast", "ipv6-unicast"]
  next_hop_self = "198.51.100.10"
  announce = [{ prefixes = ["203.0.113.0/24"] }]
  # announce_range = { start = "100.64.0.0/24", count = 1000 }   # many /N prefixes at once
  bfd = 2                        # the BFD session whose Down tears this one down (RFC 5882)
  # password = "..."             # TCP MD5 (RFC 2385); ttl_security_hops = 1: GTSM (RFC 5082)
  # eBGP takes and sends nothing without a policy (RFC 8212; docs/bgp.md "Routing policy")
  import_policy = "ACCEPT"
  export_policy = "ACCEPT"
  policy = { route_maps = { ACCEPT = { entries = [{ action = "permit" }] } } }

  [[vrouters.bfd]]
  session = 2
  local_address = "10.99.0.2"
  peer_address = "10.99.0.1"
  netns = "apsv-b"               # optional: the namespace the session's sockets live in
  desired_min_tx_ms = 100
  required_min_rx_ms = 100
  detect_mult = 3
  auth = { type = "keyed-sha1", key_id = 1, secret = "..." }
```

Any field the BGP or BFD session configuration takes may appear in its table; the loader
checks everything and names the place of each problem (``vrouters[0].bgp[1].peer_as: ...``).
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from apsv.bfd.session import BfdAuthConfig
from apsv.bgp.config import Announcement, BgpSessionConfig
from apsv.bgp.policy_lists import strict_network
from apsv.errors import field_path
from apsv.frame import ProtocolId

Key = tuple[int, int, int, int]


class ConfigError(ValueError):
    """A configuration the agent refuses; the message lists each problem with its place."""


def _endpoint(v: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):
        if default_port is None:
            raise ValueError(f"{v!r}: expected address:port")
        host, port = v, str(default_port)
    host = host.strip("[]")
    try:
        addr = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{v!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{v!r}: port must be 1..65535")
    return addr, int(port)


class PrefixRange(BaseModel):
    """`count` consecutive prefixes of the length of `start` (e.g. 1,000 /24s from 100.64.0.0/24)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str
    count: int = Field(ge=1, le=1_000_000)
    next_hop: str | None = None

    def prefixes(self) -> list[str]:
        net = ipaddress.ip_network(self.start, strict=True)
        step = net.num_addresses
        first = int(net.network_address)
        limit = 2**net.max_prefixlen
        if first + step * self.count > limit:
            raise ValueError(f"{self.count} prefixes from {self.start} run past the address space")
        cls = ipaddress.IPv4Network if net.version == 4 else ipaddress.IPv6Network
        return [str(cls((first + i * step, net.prefixlen))) for i in range(self.count)]

    @field_validator("start")
    @classmethod
    def _start(cls, v: str) -> str:
        return strict_network(v)


def _netns_name(v: str | None) -> str | None:
    if v is not None and (not v or "/" in v or v in (".", "..")):
        raise ValueError(f"{v!r} is not a network namespace name")
    return v


class BgpPeer(BaseModel):
    """One BGP session: where its TCP connection comes from, and the session's own settings."""

    model_config = ConfigDict(extra="allow", frozen=True)

    session: int = Field(ge=1)
    mode: Literal["active", "passive"] = "passive"
    listen: str | None = None  # passive: address:port the agent listens on
    peer: str  # passive: the peer's address; active: address:port to connect to
    local_address: str | None = None  # active: the address to connect from
    announce_range: list[PrefixRange] = Field(default_factory=list)
    events: Literal["all", "state", "none"] = "all"  # to the virtual router; "state": no route changes
    # a BFD session of the same virtual router whose Down tears this session down (RFC 5882)
    bfd: int | None = Field(default=None, ge=1)
    netns: str | None = None  # the network namespace its TCP connection lives in (apsv/agent/netns.py)
    password: SecretStr | None = None  # TCP MD5 signature key (RFC 2385), at most 80 octets
    ttl_security_hops: int | None = Field(default=None, ge=1, le=254)  # GTSM (RFC 5082)

    @field_validator("netns")
    @classmethod
    def _ns(cls, v: str | None) -> str | None:
        return _netns_name(v)

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not 1 <= len(v.get_secret_value().encode()) <= 80:
            raise ValueError("a TCP MD5 password is 1 to 80 octets")
        return v

    def md5_key(self) -> bytes | None:
        return None if self.password is None else self.password.get_secret_value().encode()

    @model_validator(mode="after")
    def _check(self) -> BgpPeer:
        if self.mode == "passive":
            if self.listen is None:
                raise ValueError("a passive session needs 'listen' (address:port)")
            _endpoint(self.listen, None)
            _endpoint(self.peer, 179)
        else:
            _endpoint(self.peer, 179)
        try:
            self.stack_config()  # every session setting checked now, with its name
        except ValidationError as e:
            problems = "; ".join(f"{field_path(err['loc'])}: {err['msg']}" for err in e.errors())
            raise ValueError(problems) from None
        return self

    def listen_endpoint(self) -> tuple[str, int]:
        assert self.listen is not None
        return _endpoint(self.listen, None)

    def peer_endpoint(self) -> tuple[str, int]:
        return _endpoint(self.peer, 179)

    def stack_config(self) -> dict[str, Any]:
        """What the BGP stack is opened with (a BgpSessionConfig, validated)."""
        extra = dict(self.model_extra or {})
        extra.pop("events", None)
        # RFC 8212 for the operator's sessions: an eBGP direction without a policy carries nothing
        extra.setdefault("ebgp_requires_policy", True)
        announce = [Announcement.model_validate(a) for a in extra.pop("announce", [])]
        for r in self.announce_range:
            announce.append(Announcement(prefixes=r.prefixes(), next_hop=r.next_hop))
        peer_addr, _ = self.peer_endpoint()
        local = self.local_address or (self.listen_endpoint()[0] if self.listen else "0.0.0.0")
        cfg = BgpSessionConfig.model_validate(
            {
                **extra,
                "peer_address": peer_addr,
                "local_address": local,
                "passive": self.mode == "passive",
                "announce": [a.model_dump() for a in announce],
            }
        )
        return cfg.model_dump(mode="json")


class BfdPeer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    session: int = Field(ge=1)
    local_address: str
    peer_address: str
    netns: str | None = None
    desired_min_tx_ms: float = Field(default=300.0, ge=1.0, le=60_000.0)
    required_min_rx_ms: float = Field(default=300.0, ge=0.0, le=60_000.0)
    detect_mult: int = Field(default=3, ge=1, le=255)
    auth: BfdAuthConfig | None = None
    local_discriminator: int | None = Field(default=None, ge=1, le=0xFFFFFFFF)
    events: Literal["all", "state", "none"] = "all"

    @field_validator("local_address", "peer_address")
    @classmethod
    def _addr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None

    @field_validator("netns")
    @classmethod
    def _ns(cls, v: str | None) -> str | None:
        return _netns_name(v)


class VRouter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=1, le=0xFFFFFFFF)
    name: str = ""
    bgp: list[BgpPeer] = Field(default_factory=list)
    bfd: list[BfdPeer] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> VRouter:
        ids = [s.session for s in self.bgp] + [s.session for s in self.bfd]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"session id(s) {dup} appear more than once in virtual router {self.id}")
        bfd_ids = {s.session for s in self.bfd}
        for i, b in enumerate(self.bgp):
            if b.bfd is not None and b.bfd not in bfd_ids:
                raise ValueError(f"bgp[{i}].bfd: virtual router {self.id} has no BFD session {b.bfd}")
        return self


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: int = Field(default=1, ge=1, le=0xFFFFFFFF)
    vrouters: list[VRouter] = Field(min_length=1)
    events: str | None = None  # a JSON-lines file every event is appended to
    timer_interval_s: Annotated[float, Field(gt=0, le=10)] = 0.5  # TIMER frames for BGP sessions
    max_inflight: Annotated[int, Field(ge=1, le=64)] = 4
    buffer_bytes: Annotated[int, Field(ge=4096, le=64 << 20)] = 256 << 10
    max_write_buffer: Annotated[int, Field(ge=1 << 16)] = 16 << 20  # per BGP connection, to the peer
    # events kept for the virtual router until it takes them: the oldest go beyond either bound
    max_events: Annotated[int, Field(ge=1)] = 10_000
    max_event_bytes: Annotated[int, Field(ge=1 << 16)] = 16 << 20

    @model_validator(mode="after")
    def _unique(self) -> AgentConfig:
        ids = [v.id for v in self.vrouters]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"virtual router id(s) {sorted(dup)} appear more than once")
        # GTSM filters on the listening socket: the sessions sharing one must agree on it
        listens: dict[tuple[str | None, str], int | None] = {}
        for v in self.vrouters:
            for g in v.bgp:
                on = (g.netns, g.listen or "")
                if g.mode == "passive" and listens.setdefault(on, g.ttl_security_hops) != g.ttl_security_hops:
                    raise ValueError(
                        f"vrouter {v.id} bgp session {g.session}: ttl_security_hops differs from another "
                        f"session listening on {g.listen}"
                    )
        pairs: dict[tuple[str, str], str] = {}
        for v in self.vrouters:
            for b in v.bfd:
                where = f"vrouter {v.id} session {b.session}"
                pair = (f"{b.netns}/{b.local_address}", b.peer_address)
                if pair in pairs:
                    raise ValueError(f"BFD {where} has the same addresses as {pairs[pair]}")
                pairs[pair] = where
        return self

    def warnings(self) -> list[str]:
        """What is valid but unsafe: an eBGP session without a policy in a direction (RFC 8212)."""
        out = []
        for key, proto, cfg, v, _peer in self.sessions():
            if proto != "bgp" or cfg["local_as"] == cfg["peer_as"]:
                continue
            for direction, verb in (("import", "accepts every route received"), ("export", "announces every route")):
                if not cfg[f"{direction}_policy"]:
                    what = "takes nothing" if direction == "import" else "sends nothing"
                    outcome = what if cfg["ebgp_requires_policy"] else verb
                    out.append(
                        f"vrouter {v.id} bgp session {key[3]}: eBGP without an {direction}_policy {outcome} (RFC 8212)"
                    )
        return out

    def sessions(self) -> list[tuple[Key, str, dict[str, Any], VRouter, BgpPeer | BfdPeer]]:
        """(key, protocol, stack config, its virtual router, its peer entry) for every session."""
        out: list[tuple[Key, str, dict[str, Any], VRouter, BgpPeer | BfdPeer]] = []
        for v in self.vrouters:
            for bgp in v.bgp:
                out.append(((self.tenant, v.id, int(ProtocolId.BGP), bgp.session), "bgp", bgp.stack_config(), v, bgp))
            for bfd in v.bfd:
                disc = bfd.local_discriminator or ((v.id & 0xFFFF) << 16 | (bfd.session & 0xFFFF))
                cfg = bfd.model_dump(mode="json", exclude={"session", "local_discriminator", "events"})
                cfg["local_discriminator"] = disc
                out.append(((self.tenant, v.id, int(ProtocolId.BFD), bfd.session), "bfd", cfg, v, bfd))
        return out


EVENT_LEVELS = {"none": 0, "all": 1, "state": 2}  # apsv.runtime.host.EVENTS_*


def parse_config(data: dict[str, Any], source: str = "config") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: {field_path(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid agent configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> AgentConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (octet {e.start})") from None
    return parse_toml(text, str(p))


def parse_toml(text: str, source: str = "config") -> AgentConfig:
    """An agent configuration from TOML text; ConfigError naming `source` otherwise."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return parse_config(data, source)

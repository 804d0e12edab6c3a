"""Configuration of one BGP session, validated with errors that name the field and the reason."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from apsv.bgp import constants as C
from apsv.bgp.policy import Policy

FamilyName = Literal["ipv4-unicast", "ipv6-unicast"]
FAMILY_CODES = C.FAMILY_CODES
ASN = Annotated[int, Field(ge=1, le=4294967295)]


def _ip(value: str, version: int | None = None) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    if version is not None and ip.version != version:
        raise ValueError(f"{value!r} is not an IPv{version} address")
    return str(ip)


def _default_families() -> list[FamilyName]:
    return ["ipv4-unicast"]


class Announcement(BaseModel):
    """Routes this speaker originates towards the peer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefixes: list[str] = Field(min_length=1, max_length=1_000_000)
    next_hop: str | None = None  # default: the session's next_hop_self (v4) / next_hop_self_v6
    med: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None
    local_pref: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None  # iBGP only
    communities: list[str] = Field(default_factory=list)  # "65000:100"
    large_communities: list[str] = Field(default_factory=list)  # "65000:1:2"
    as_path: list[ASN] = Field(default_factory=list)  # ASes after our own (eBGP) / the whole path (iBGP)

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        out = []
        for p in v:
            try:
                out.append(str(ipaddress.ip_network(p, strict=True)))
            except ValueError as e:
                raise ValueError(f"prefix {p!r}: {e}") from None
        return out

    @field_validator("next_hop")
    @classmethod
    def _nh(cls, v: str | None) -> str | None:
        return None if v is None else _ip(v)

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: list[str]) -> list[str]:
        for c in v:
            parts = c.split(":")
            if len(parts) != 2 or not all(p.isdigit() and int(p) <= 0xFFFF for p in parts):
                raise ValueError(f"community {c!r} is not ASN:VALUE with both parts 0..65535")
        return v

    @field_validator("large_communities")
    @classmethod
    def _large(cls, v: list[str]) -> list[str]:
        for c in v:
            parts = c.split(":")
            if len(parts) != 3 or not all(p.isdigit() and int(p) <= 0xFFFFFFFF for p in parts):
                raise ValueError(f"large community {c!r} is not GLOBAL:LOCAL1:LOCAL2 (each 0..4294967295)")
        return v


class BgpSessionConfig(BaseModel):
    """One BGP peering of a virtual router."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_as: ASN
    router_id: str
    peer_as: ASN
    peer_address: str = "0.0.0.0"
    local_address: str = "0.0.0.0"
    hold_time: Annotated[int, Field(ge=0, le=65535)] = 90
    connect_retry_time: Annotated[float, Field(gt=0, le=3600)] = 120.0
    passive: bool = False
    families: list[FamilyName] = Field(default_factory=_default_families, min_length=1)
    add_path_receive: list[FamilyName] = Field(default_factory=list)
    extended_message: bool = False
    route_refresh: bool = True
    # announce the graceful restart capability (RFC 4724) with this restart time and keep a
    # restarting peer's routes stale; None announces nothing and withdraws at once
    graceful_restart_time: Annotated[int, Field(ge=0, le=4095)] | None = None
    # how long stale routes wait for the peer's End-of-RIB once it is back (FRR's stalepath-time)
    stale_routes_time: Annotated[float, Field(gt=0, le=3600)] = 360.0
    # announce long-lived graceful restart (RFC 9494) too, and keep a peer's routes for its
    # long-lived stale time after its restart time, at most this many seconds; None: neither
    long_lived_stale_time: Annotated[int, Field(ge=1, le=0xFFFFFF)] | None = None
    # maximum-prefix per family (apsv/bgp/prefix_limit.py): a warning at max_prefixes_threshold_pct;
    # past it Cease 6/1, then down until started again or for max_prefixes_restart_s; with
    # max_prefixes_warning_only a warning instead (2,000,000 still ends the session)
    max_prefixes: Annotated[int, Field(ge=1)] | None = 2_000_000
    max_prefixes_threshold_pct: Annotated[int, Field(ge=1, le=100)] = 75
    max_prefixes_warning_only: bool = False
    max_prefixes_restart_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    enforce_first_as: bool = True
    next_hop_self: str | None = None
    next_hop_self_v6: str | None = None
    announce: list[Announcement] = Field(default_factory=list)
    auto_restart: bool = True
    idle_hold_time: Annotated[float, Field(ge=0, le=3600)] = 5.0
    max_idle_hold_time: Annotated[float, Field(ge=0, le=3600)] = 120.0
    max_receive_buffer: Annotated[int, Field(ge=65535 + 19)] = 1 << 20
    # routing policy (apsv/bgp/policy.py): its lists and route maps, and the route map applied
    # to what is received (import) and announced (export), for every family or per family;
    # with ebgp_requires_policy an eBGP session without one takes / sends nothing (RFC 8212)
    policy: Policy = Field(default_factory=Policy)
    import_policy: str | dict[FamilyName, str] | None = None
    export_policy: str | dict[FamilyName, str] | None = None
    ebgp_requires_policy: bool = False
    # keep what the peer sent before import policy (apsv/bgp/soft_reconfig.py); kept anyway
    # for a peer without route refresh, so that a new import policy applies without a reset
    soft_reconfiguration_inbound: bool = False
    # how long a peer that went down is expected back with its table (the VPSM provisions for
    # the re-sent table meanwhile, `BgpSession.table_backlog`), and how long its transfer may take
    table_expect_s: Annotated[float, Field(ge=0, le=3600)] = 120.0

    @field_validator("router_id")
    @classmethod
    def _rid(cls, v: str) -> str:
        v = _ip(v, 4)
        if v == "0.0.0.0":
            raise ValueError("router_id 0.0.0.0 is not a valid BGP Identifier")
        return v

    @field_validator("peer_address", "local_address")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _ip(v)

    @field_validator("next_hop_self")
    @classmethod
    def _nh4(cls, v: str | None) -> str | None:
        return None if v is None else _ip(v, 4)

    @field_validator("next_hop_self_v6")
    @classmethod
    def _nh6(cls, v: str | None) -> str | None:
        return None if v is None else _ip(v, 6)

    @field_validator("hold_time")
    @classmethod
    def _hold(cls, v: int) -> int:
        if v in (1, 2):
            raise ValueError("hold_time must be 0 or at least 3 seconds (RFC 4271 §4.2)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BgpSessionConfig:
        for i, a in enumerate(self.announce):
            for p in a.prefixes:
                v6 = ":" in p
                fam = "ipv6-unicast" if v6 else "ipv4-unicast"
                if fam not in self.families:
                    raise ValueError(f"announce[{i}]: prefix {p} needs family {fam} in 'families'")
                nh = a.next_hop or (self.next_hop_self_v6 if v6 else self.next_hop_self)
                if nh is None:
                    raise ValueError(
                        f"announce[{i}]: prefix {p} has no next hop; set announce[{i}].next_hop or "
                        f"{'next_hop_self_v6' if v6 else 'next_hop_self'}"
                    )
        for fam in self.add_path_receive:
            if fam not in self.families:
                raise ValueError(f"add_path_receive: family {fam} is not in 'families'")
        if self.long_lived_stale_time is not None and self.graceful_restart_time is None:
            raise ValueError("long_lived_stale_time needs graceful_restart_time (RFC 9494 extends graceful restart)")
        for direction in ("import", "export"):
            chosen = getattr(self, f"{direction}_policy")
            named = chosen.values() if isinstance(chosen, dict) else [chosen] if chosen else []
            for name in named:
                if name not in self.policy.route_maps:
                    raise ValueError(f"{direction}_policy: no route map {name!r} in policy.route_maps")
            for fam in chosen if isinstance(chosen, dict) else ():
                if fam not in self.families:
                    raise ValueError(f"{direction}_policy: family {fam} is not in 'families'")
        return self

    def route_map(self, direction: Literal["import", "export"], family: FamilyName) -> str | None:
        """The route map a direction applies to a family's routes, if any."""
        chosen = self.import_policy if direction == "import" else self.export_policy
        return chosen.get(family) if isinstance(chosen, dict) else chosen

    @property
    def ibgp(self) -> bool:
        return self.local_as == self.peer_as

    @property
    def family_codes(self) -> tuple[tuple[int, int], ...]:
        return tuple(FAMILY_CODES[f] for f in self.families)

"""OPEN capabilities (RFC 5492) and their negotiation.

Capabilities are kept as (code, raw value) so that an OPEN re-encodes byte for byte; the
typed view (`parse_capability`) is computed from the raw value when it is needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from apsv.bgp import constants as C
from apsv.bgp.errors import BgpError

Family = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Capability:
    code: int
    value: bytes = b""

    def parsed(self) -> object:
        return parse_capability(self.code, self.value)


@dataclass(frozen=True, slots=True)
class Multiprotocol:
    afi: int
    safi: int


@dataclass(frozen=True, slots=True)
class RouteRefresh:
    enhanced: bool = False


@dataclass(frozen=True, slots=True)
class FourOctetAs:
    asn: int


@dataclass(frozen=True, slots=True)
class GracefulRestart:
    restart_state: bool  # R bit
    notification: bool  # N bit (RFC 8538)
    restart_time: int
    families: tuple[tuple[int, int, int], ...]  # (afi, safi, flags: 0x80 = forwarding state preserved)


@dataclass(frozen=True, slots=True)
class LongLivedGracefulRestart:
    # (afi, safi, flags: 0x80 = forwarding state preserved, long-lived stale time in seconds)
    families: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class AddPath:
    families: tuple[tuple[int, int, int], ...]  # (afi, safi, 1 receive | 2 send | 3 both)


@dataclass(frozen=True, slots=True)
class ExtendedMessage:
    pass


@dataclass(frozen=True, slots=True)
class ExtendedNextHop:
    entries: tuple[tuple[int, int, int], ...]  # (nlri afi, nlri safi, next hop afi)


@dataclass(frozen=True, slots=True)
class Role:
    role: int


@dataclass(frozen=True, slots=True)
class Fqdn:
    hostname: str
    domain: str


@dataclass(frozen=True, slots=True)
class SoftwareVersion:
    version: str


@dataclass(frozen=True, slots=True)
class UnknownCapability:
    code: int
    value: bytes


def _bad(code: int, why: str) -> BgpError:
    # RFC 5492 leaves malformed capability values to the OPEN error code with no specific
    # subcode; the data names the capability so the peer can see what it sent.
    return BgpError(C.ERR_OPEN, 0, bytes((code,)), f"malformed capability {code}: {why}")


def parse_capability(code: int, value: bytes) -> object:
    """Typed view of one capability; raises BgpError (OPEN error) on a malformed value."""
    n = len(value)
    if code == C.CAP_MULTIPROTOCOL:
        if n != 4:
            raise _bad(code, f"length {n}, expected 4")
        afi, _res, safi = struct.unpack("!HBB", value)
        return Multiprotocol(afi, safi)
    if code in (C.CAP_ROUTE_REFRESH, C.CAP_ROUTE_REFRESH_OLD, C.CAP_ENHANCED_ROUTE_REFRESH):
        if n != 0:
            raise _bad(code, f"length {n}, expected 0")
        return RouteRefresh(enhanced=code == C.CAP_ENHANCED_ROUTE_REFRESH)
    if code == C.CAP_FOUR_OCTET_AS:
        if n != 4:
            raise _bad(code, f"length {n}, expected 4")
        return FourOctetAs(int.from_bytes(value, "big"))
    if code == C.CAP_GRACEFUL_RESTART:
        if n < 2 or (n - 2) % 4:
            raise _bad(code, f"length {n}, expected 2 + 4*k")
        head = int.from_bytes(value[:2], "big")
        fams = tuple(struct.unpack_from("!HBB", value, i) for i in range(2, n, 4))
        return GracefulRestart(bool(head & 0x8000), bool(head & 0x4000), head & 0x0FFF, fams)
    if code == C.CAP_LONG_LIVED_GR:
        if n % 7:
            raise _bad(code, f"length {n}, expected 7*k")
        llgr = []
        for i in range(0, n, 7):
            afi, safi, flags = struct.unpack_from("!HBB", value, i)
            llgr.append((afi, safi, flags, int.from_bytes(value[i + 4 : i + 7], "big")))
        return LongLivedGracefulRestart(tuple(llgr))
    if code == C.CAP_ADD_PATH:
        if n == 0 or n % 4:
            raise _bad(code, f"length {n}, expected 4*k")
        fams = tuple(struct.unpack_from("!HBB", value, i) for i in range(0, n, 4))
        for _afi, _safi, sr in fams:
            if sr not in (1, 2, 3):
                raise _bad(code, f"send/receive value {sr} is not 1, 2 or 3")
        return AddPath(fams)
    if code == C.CAP_EXTENDED_MESSAGE:
        if n != 0:
            raise _bad(code, f"length {n}, expected 0")
        return ExtendedMessage()
    if code == C.CAP_EXTENDED_NEXT_HOP:
        if n % 6:
            raise _bad(code, f"length {n}, expected 6*k")
        return ExtendedNextHop(tuple(struct.unpack_from("!HHH", value, i) for i in range(0, n, 6)))
    if code == C.CAP_ROLE:
        if n != 1:
            raise _bad(code, f"length {n}, expected 1")
        return Role(value[0])
    if code == C.CAP_FQDN:
        if n < 1 or n < 1 + value[0] + 1 or n < 2 + value[0] + value[1 + value[0]]:
            raise _bad(code, "hostname/domain lengths overrun the value")
        hl = value[0]
        dl = value[1 + hl]
        return Fqdn(
            value[1 : 1 + hl].decode("utf-8", "replace"), value[2 + hl : 2 + hl + dl].decode("utf-8", "replace")
        )
    if code == C.CAP_SOFTWARE_VERSION:
        if n < 1 or value[0] > n - 1:
            raise _bad(code, "version length overruns the value")
        return SoftwareVersion(value[1 : 1 + value[0]].decode("utf-8", "replace"))
    return UnknownCapability(code, value)


def build_capabilities(
    *,
    asn: int,
    families: tuple[Family, ...] = (C.IPV4_UNICAST,),
    route_refresh: bool = True,
    extended_message: bool = False,
    add_path: tuple[tuple[int, int, int], ...] = (),
    graceful_restart_time: int | None = None,
    long_lived_graceful_restart: bool = False,
) -> tuple[Capability, ...]:
    """The capabilities an APSV speaker announces."""
    caps: list[Capability] = [Capability(C.CAP_MULTIPROTOCOL, struct.pack("!HBB", a, 0, s)) for a, s in families]
    if route_refresh:
        caps.append(Capability(C.CAP_ROUTE_REFRESH))
    caps.append(Capability(C.CAP_FOUR_OCTET_AS, asn.to_bytes(4, "big")))
    if extended_message:
        caps.append(Capability(C.CAP_EXTENDED_MESSAGE))
    if add_path:
        caps.append(Capability(C.CAP_ADD_PATH, b"".join(struct.pack("!HBB", *f) for f in add_path)))
    if graceful_restart_time is not None:
        # No address family: APSV performs the receiving speaker's procedures for its peers and
        # does not claim to preserve forwarding across a restart of its own (RFC 4724 §3).
        caps.append(Capability(C.CAP_GRACEFUL_RESTART, (graceful_restart_time & 0x0FFF).to_bytes(2, "big")))
        if long_lived_graceful_restart:
            # likewise with no family (RFC 9494): APSV keeps a peer's routes long-lived stale
            # and takes routes marked LLGR_STALE from it; it keeps none of its own
            caps.append(Capability(C.CAP_LONG_LIVED_GR))
    return tuple(caps)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both sides of a session agreed on (RFC 5492 §3: a capability is in use only if both sent it)."""

    asn4: bool = True
    families: frozenset[Family] = frozenset({C.IPV4_UNICAST})
    add_path_receive: frozenset[Family] = frozenset()  # families whose NLRI we receive with path ids
    add_path_send: frozenset[Family] = frozenset()
    extended_message: bool = False
    route_refresh: bool = False
    enhanced_route_refresh: bool = False
    graceful_restart: bool = False
    peer_restart_time: int = 0
    # the families the peer's graceful restart capability lists, and those among them whose
    # forwarding state it says it preserved (the F bit): what a receiving speaker keeps stale
    peer_gr_families: frozenset[Family] = frozenset()
    peer_gr_forwarding: frozenset[Family] = frozenset()
    peer_capabilities: tuple[int, ...] = field(default=())
    # long-lived graceful restart (RFC 9494), both sides sent it: the peer's families with their
    # long-lived stale time (seconds), and those with forwarding state preserved
    long_lived: bool = False
    peer_llgr_times: tuple[tuple[Family, int], ...] = ()
    peer_llgr_forwarding: frozenset[Family] = frozenset()

    def llgr_stale_time(self, family: Family) -> int:
        """The peer's long-lived stale time for `family` (0: none)."""
        if not self.long_lived:
            return 0
        return next((t for f, t in self.peer_llgr_times if f == family), 0)


def negotiate(local: tuple[Capability, ...], peer: tuple[Capability, ...]) -> Negotiated:
    """Intersect our capabilities with the peer's. Raises BgpError on a malformed peer capability."""
    lp = [parse_capability(c.code, c.value) for c in local]
    pp = [parse_capability(c.code, c.value) for c in peer]

    def mp(caps: list[object]) -> set[Family]:
        fams = {(c.afi, c.safi) for c in caps if isinstance(c, Multiprotocol)}
        # RFC 4760 §8: a speaker that sends no MP capability speaks IPv4 unicast only.
        return fams or {C.IPV4_UNICAST}

    families = mp(lp) & mp(pp)
    asn4 = any(isinstance(c, FourOctetAs) for c in lp) and any(isinstance(c, FourOctetAs) for c in pp)

    def add_path_map(caps: list[object]) -> dict[Family, int]:
        out: dict[Family, int] = {}
        for c in caps:
            if isinstance(c, AddPath):
                for afi, safi, sr in c.families:
                    out[(afi, safi)] = sr
        return out

    mine, theirs = add_path_map(lp), add_path_map(pp)
    # RFC 7911 §4: we receive path ids for a family if we said "receive" and the peer said "send".
    rx = frozenset(f for f in families if mine.get(f, 0) & C.ADD_PATH_RECEIVE and theirs.get(f, 0) & C.ADD_PATH_SEND)
    tx = frozenset(f for f in families if mine.get(f, 0) & C.ADD_PATH_SEND and theirs.get(f, 0) & C.ADD_PATH_RECEIVE)
    peer_gr = next((c for c in pp if isinstance(c, GracefulRestart)), None)
    local_gr = any(isinstance(c, GracefulRestart) for c in lp)
    peer_llgr = next((c for c in pp if isinstance(c, LongLivedGracefulRestart)), None)
    local_llgr = any(isinstance(c, LongLivedGracefulRestart) for c in lp)
    return Negotiated(
        asn4=asn4,
        families=frozenset(families),
        add_path_receive=rx,
        add_path_send=tx,
        extended_message=any(isinstance(c, ExtendedMessage) for c in lp)
        and any(isinstance(c, ExtendedMessage) for c in pp),
        route_refresh=any(isinstance(c, RouteRefresh) for c in lp) and any(isinstance(c, RouteRefresh) for c in pp),
        enhanced_route_refresh=any(c.code == C.CAP_ENHANCED_ROUTE_REFRESH for c in local)
        and any(c.code == C.CAP_ENHANCED_ROUTE_REFRESH for c in peer),
        graceful_restart=local_gr and peer_gr is not None,
        peer_restart_time=peer_gr.restart_time if peer_gr else 0,
        peer_gr_families=frozenset((a, sf) for a, sf, _ in peer_gr.families) if peer_gr else frozenset(),
        peer_gr_forwarding=frozenset((a, sf) for a, sf, fl in peer_gr.families if fl & 0x80)
        if peer_gr
        else frozenset(),
        peer_capabilities=tuple(c.code for c in peer),
        long_lived=local_gr and local_llgr and peer_llgr is not None,
        peer_llgr_times=tuple(sorted(((a, sf), t) for a, sf, _fl, t in peer_llgr.families)) if peer_llgr else (),
        peer_llgr_forwarding=frozenset((a, sf) for a, sf, fl, _t in peer_llgr.families if fl & 0x80)
        if peer_llgr
        else frozenset(),
    )

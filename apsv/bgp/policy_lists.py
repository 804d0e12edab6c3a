"""The lists a route map matches on, as FRR writes them: prefix lists (with ge / le), AS-path
access lists (regular expressions over the path), and community, large-community and
extended-community lists (standard: values; expanded: a regular expression).

Each list is an ordered set of permit / deny entries; the first entry that matches decides and
a route no entry matches is denied (FRR's implicit deny). Everything here is pure: values in,
a verdict out.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Verdict = Literal["permit", "deny"]

# RFC 1997 / 7999 / 8326 / 9494 well-known communities, by the names FRR uses
WELL_KNOWN: dict[str, int] = {
    "no-export": 0xFFFFFF01,
    "no-advertise": 0xFFFFFF02,
    "no-export-subconfed": 0xFFFFFF03,
    "local-AS": 0xFFFFFF03,
    "blackhole": 0xFFFF029A,
    "graceful-shutdown": 0xFFFF0000,
    "no-peer": 0xFFFFFF04,
    "llgr-stale": 0xFFFF0006,  # RFC 9494
    "no-llgr": 0xFFFF0007,
}
_NAMES = {v: k for k, v in WELL_KNOWN.items() if k != "local-AS"}


def strict_network(text: str) -> str:
    """A prefix without host bits, in its normal form; a one-line error otherwise."""
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None


def parse_community(text: str) -> int:
    """'65001:100' or a well-known name -> the 32-bit value."""
    if text in WELL_KNOWN:
        return WELL_KNOWN[text]
    a, sep, b = text.partition(":")
    if not sep or not a.isdigit() or not b.isdigit() or int(a) > 0xFFFF or int(b) > 0xFFFF:
        raise ValueError(f"{text!r} is not a community (ASN:VALUE, each 0-65535, or a well-known name)")
    return (int(a) << 16) | int(b)


def community_text(value: int) -> str:
    return _NAMES.get(value) or f"{value >> 16}:{value & 0xFFFF}"


def parse_large_community(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 0xFFFFFFFF for p in parts):
        raise ValueError(f"{text!r} is not a large community (GLOBAL:LOCAL1:LOCAL2, each 0-4294967295)")
    return int(parts[0]), int(parts[1]), int(parts[2])


def large_community_text(value: tuple[int, int, int]) -> str:
    return f"{value[0]}:{value[1]}:{value[2]}"


# RFC 4360 / 5668 / 4360 §4: route target (subtype 2) and route origin (subtype 3) of the
# two-octet-AS (type 0x00), IPv4-address (0x01) and four-octet-AS (0x02) kinds
_EXT_SUBTYPES = {"rt": 0x02, "soo": 0x03}


def parse_ext_community(text: str) -> int:
    """'rt 65001:100', 'soo 192.0.2.1:7', 'rt 4200000000:1' -> the 64-bit value."""
    kind, _, rest = text.strip().partition(" ")
    glob, sep, local = rest.strip().rpartition(":")
    if kind not in _EXT_SUBTYPES or not sep or not local.isdigit():
        raise ValueError(f"{text!r} is not an extended community ('rt ASN:NN', 'soo A.B.C.D:NN', ...)")
    sub, n = _EXT_SUBTYPES[kind], int(local)
    if "." in glob:
        ip = ipaddress.IPv4Address(glob)
        if n > 0xFFFF:
            raise ValueError(f"{text!r}: the local part of an IPv4-address community is 0-65535")
        return int.from_bytes(bytes((0x01, sub)) + ip.packed + n.to_bytes(2, "big"), "big")
    if not glob.isdigit():
        raise ValueError(f"{text!r} is not an extended community ('rt ASN:NN', 'soo A.B.C.D:NN', ...)")
    asn = int(glob)
    if asn <= 0xFFFF and n <= 0xFFFFFFFF:
        return int.from_bytes(bytes((0x00, sub)) + struct.pack("!HI", asn, n), "big")
    if asn <= 0xFFFFFFFF and n <= 0xFFFF:
        return int.from_bytes(bytes((0x02, sub)) + struct.pack("!IH", asn, n), "big")
    raise ValueError(f"{text!r}: out of range for every extended community kind")


def ext_community_text(value: int) -> str:
    raw = value.to_bytes(8, "big")
    kinds = {v: k for k, v in _EXT_SUBTYPES.items()}
    kind = kinds.get(raw[1])
    if kind is not None and raw[0] == 0x00:
        a, n = struct.unpack("!HI", raw[2:])
        return f"{kind} {a}:{n}"
    if kind is not None and raw[0] == 0x01:
        return f"{kind} {socket.inet_ntoa(raw[2:6])}:{int.from_bytes(raw[6:], 'big')}"
    if kind is not None and raw[0] == 0x02:
        a, n = struct.unpack("!IH", raw[2:])
        return f"{kind} {a}:{n}"
    return "0x" + raw.hex()


def as_path_text(path: tuple[tuple[int, tuple[int, ...]], ...]) -> str:
    """FRR's text of an AS_PATH: sequences space-separated, sets in braces, confederation
    sequences in parentheses and confederation sets in brackets."""
    parts = []
    for seg_type, asns in path:
        if seg_type == 2:
            parts.append(" ".join(map(str, asns)))
        elif seg_type == 1:
            parts.append("{" + ",".join(map(str, asns)) + "}")
        elif seg_type == 3:
            parts.append("(" + " ".join(map(str, asns)) + ")")
        else:
            parts.append("[" + ",".join(map(str, asns)) + "]")
    return " ".join(p for p in parts if p)


def frr_regex(pattern: str) -> re.Pattern[str]:
    """Compile an FRR / Cisco AS-path or community regular expression: `_` matches a delimiter
    (the start, the end, a space, a comma, a brace or a parenthesis)."""
    out, escaped = [], False
    for ch in pattern:
        if escaped:
            out.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "_":
            out.append(r"(?:^|[,{}()\[\] ]|$)")
        else:
            out.append(ch)
    try:
        return re.compile("".join(out))
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefixListEntry(_Strict):
    seq: int | None = Field(default=None, ge=1)
    action: Verdict
    prefix: str
    ge: int | None = Field(default=None, ge=0, le=128)
    le: int | None = Field(default=None, ge=0, le=128)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return strict_network(v)

    @model_validator(mode="after")
    def _bounds(self) -> PrefixListEntry:
        net = ipaddress.ip_network(self.prefix)
        lo, hi = self.bounds()
        if not net.prefixlen <= lo <= hi <= net.max_prefixlen:
            raise ValueError(
                f"{self.prefix} ge {self.ge} le {self.le}: needs {net.prefixlen} <= ge <= le <= {net.max_prefixlen}"
            )
        return self

    def bounds(self) -> tuple[int, int]:
        """The prefix lengths the entry matches (FRR: ge alone runs to the family's maximum)."""
        net = ipaddress.ip_network(self.prefix)
        if self.ge is None and self.le is None:
            return net.prefixlen, net.prefixlen
        return (self.ge if self.ge is not None else net.prefixlen), (
            self.le if self.le is not None else net.max_prefixlen
        )


class PrefixList(_Strict):
    entries: list[PrefixListEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self) -> PrefixList:
        seqs = [e.seq if e.seq is not None else 5 * (i + 1) for i, e in enumerate(self.entries)]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"entries: sequence numbers repeat ({seqs})")
        return self

    def compiled(self) -> CompiledPrefixList:
        return CompiledPrefixList(self)


class CompiledPrefixList:
    """Entries as (version, network int, network length, ge, le, permit), in sequence order."""

    def __init__(self, pl: PrefixList) -> None:
        rows = []
        for i, e in enumerate(pl.entries):
            net = ipaddress.ip_network(e.prefix)
            lo, hi = e.bounds()
            seq = e.seq if e.seq is not None else 5 * (i + 1)
            rows.append((seq, net.version, int(net.network_address), net.prefixlen, lo, hi, e.action == "permit"))
        rows.sort()
        self.rows = [r[1:] for r in rows]

    def permits(self, version: int, address: int, length: int) -> bool:
        bits = 32 if version == 4 else 128
        for v, net, plen, lo, hi, permit in self.rows:
            if v == version and lo <= length <= hi and (address >> (bits - plen)) == (net >> (bits - plen)):
                return permit
        return False


class AsPathEntry(_Strict):
    action: Verdict
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        frr_regex(v)
        return v


class AsPathList(_Strict):
    entries: list[AsPathEntry] = Field(min_length=1)

    def compiled(self) -> list[tuple[re.Pattern[str], bool]]:
        return [(frr_regex(e.regex), e.action == "permit") for e in self.entries]


class CommunityEntry(_Strict):
    """Standard: `communities` (all of them present); expanded: `regex` over the route's
    communities as text, space-separated."""

    action: Verdict
    communities: list[str] | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one(self) -> CommunityEntry:
        if (self.communities is None) == (self.regex is None):
            raise ValueError("an entry has either 'communities' (standard) or 'regex' (expanded)")
        if self.regex is not None:
            frr_regex(self.regex)
        return self


class CommunityList(_Strict):
    entries: list[CommunityEntry] = Field(min_length=1)


COMMUNITY_KINDS = {
    "standard": (parse_community, community_text),
    "large": (parse_large_community, large_community_text),
    "extended": (parse_ext_community, ext_community_text),
}


class CompiledCommunityList:
    """A community list of one kind: entries of (values required | regex, permit)."""

    def __init__(self, cl: CommunityList, kind: str) -> None:
        parse, self.text = COMMUNITY_KINDS[kind]
        self.rows: list[tuple[frozenset[object] | re.Pattern[str], bool]] = []
        for i, e in enumerate(cl.entries):
            if e.communities is not None:
                try:
                    values = frozenset(parse(c) for c in e.communities)
                except ValueError as err:
                    raise ValueError(f"entries[{i}]: {err}") from None
                self.rows.append((values, e.action == "permit"))
            else:
                assert e.regex is not None
                self.rows.append((frr_regex(e.regex), e.action == "permit"))

    def permits(self, values: tuple[object, ...]) -> bool:
        have = set(values)
        text: str | None = None
        for cond, permit in self.rows:
            if isinstance(cond, frozenset):
                if cond <= have:
                    return permit
            else:
                if text is None:
                    text = " ".join(self.text(v) for v in values)  # type: ignore[operator]
                if cond.search(text):
                    return permit
        return False

    def matching(self, values: tuple[object, ...]) -> set[object]:
        """The values a `delete` by this list removes: each one the list permits on its own."""
        return {v for v in values if self.permits((v,))}

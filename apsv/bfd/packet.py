"""BFD Control packets (RFC 5880 §4) and their authentication (§6.7), sans-I/O.

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   |Vers |  Diag   |Sta|P|F|C|A|D|M|  Detect Mult  |    Length     |
   |                       My Discriminator                        |
   |                      Your Discriminator                       |
   |                    Desired Min TX Interval                    |
   |                   Required Min RX Interval                    |
   |                 Required Min Echo RX Interval                 |
   optional authentication section (A bit): Type, Len, Key ID, ...

Both the agent (which transmits, receives and authenticates packets for the session, the way
a line card does) and the stack use this module.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass, replace

from apsv.errors import DecodeError

BFD_PORT = 3784  # RFC 5881: single-hop control packets
HEADER = struct.Struct("!BBBBIIIII")
HEADER_LEN = HEADER.size  # 24
MAX_PACKET = HEADER_LEN + 28  # the largest authentication section (keyed SHA1) is 28 octets


class State(enum.IntEnum):
    ADMIN_DOWN = 0
    DOWN = 1
    INIT = 2
    UP = 3


class Diag(enum.IntEnum):
    NONE = 0
    CONTROL_DETECTION_TIME_EXPIRED = 1
    ECHO_FUNCTION_FAILED = 2
    NEIGHBOR_SIGNALED_SESSION_DOWN = 3
    FORWARDING_PLANE_RESET = 4
    PATH_DOWN = 5
    CONCATENATED_PATH_DOWN = 6
    ADMINISTRATIVELY_DOWN = 7
    REVERSE_CONCATENATED_PATH_DOWN = 8


class AuthType(enum.IntEnum):
    SIMPLE_PASSWORD = 1
    KEYED_MD5 = 2
    METICULOUS_KEYED_MD5 = 3
    KEYED_SHA1 = 4
    METICULOUS_KEYED_SHA1 = 5


AUTH_NAMES = {
    "simple": AuthType.SIMPLE_PASSWORD,
    "keyed-md5": AuthType.KEYED_MD5,
    "meticulous-keyed-md5": AuthType.METICULOUS_KEYED_MD5,
    "keyed-sha1": AuthType.KEYED_SHA1,
    "meticulous-keyed-sha1": AuthType.METICULOUS_KEYED_SHA1,
}
_DIGEST = {
    AuthType.KEYED_MD5: (16, "md5"),
    AuthType.METICULOUS_KEYED_MD5: (16, "md5"),
    AuthType.KEYED_SHA1: (20, "sha1"),
    AuthType.METICULOUS_KEYED_SHA1: (20, "sha1"),
}


class BfdDecodeError(DecodeError):
    """A packet RFC 5880 §6.8.6 says to discard; the message says which rule."""


@dataclass(frozen=True, slots=True)
class Auth:
    """An authentication section as received."""

    type: int
    key_id: int
    password: bytes = b""  # simple password
    seq: int = 0  # keyed types
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class Packet:
    state: State
    my_disc: int
    your_disc: int
    desired_min_tx_us: int
    required_min_rx_us: int
    detect_mult: int
    diag: int = Diag.NONE
    poll: bool = False
    final: bool = False
    cpi: bool = False  # Control Plane Independent
    demand: bool = False
    multipoint: bool = False
    required_min_echo_rx_us: int = 0
    version: int = 1
    auth: Auth | None = None

    def significant(self) -> tuple[int, ...]:
        """Everything but the authentication sequence and digest: what tells the stack
        something new. A packet equal to the last one in these is just a keepalive."""
        return (
            self.state,
            self.diag,
            self.poll,
            self.final,
            self.cpi,
            self.demand,
            self.detect_mult,
            self.my_disc,
            self.your_disc,
            self.desired_min_tx_us,
            self.required_min_rx_us,
            self.required_min_echo_rx_us,
            self.auth is not None,
        )


def _flags(p: Packet) -> int:
    return (
        (p.state & 3) << 6
        | p.poll << 5
        | p.final << 4
        | p.cpi << 3
        | (p.auth is not None) << 2
        | p.demand << 1
        | p.multipoint
    )


@dataclass(frozen=True, slots=True)
class AuthKey:
    """This side's authentication: type, key id and secret (1-16 octets for a password, up to
    16 for MD5, 20 for SHA1)."""

    type: AuthType
    key_id: int
    secret: bytes

    def section_len(self) -> int:
        if self.type == AuthType.SIMPLE_PASSWORD:
            return 3 + len(self.secret)
        return 8 + _DIGEST[self.type][0]

    @property
    def meticulous(self) -> bool:
        return self.type in (AuthType.METICULOUS_KEYED_MD5, AuthType.METICULOUS_KEYED_SHA1)


def make_key(kind: str, key_id: int, secret: bytes) -> AuthKey:
    t = AUTH_NAMES.get(kind)
    if t is None:
        raise ValueError(f"BFD authentication type {kind!r} unknown (one of {', '.join(AUTH_NAMES)})")
    if not 0 <= key_id <= 255:
        raise ValueError(f"BFD authentication key id {key_id} outside 0..255")
    limit = 16 if t not in (AuthType.KEYED_SHA1, AuthType.METICULOUS_KEYED_SHA1) else 20
    if not 1 <= len(secret) <= limit:
        raise ValueError(f"BFD {kind} secret must be 1..{limit} octets, got {len(secret)}")
    return AuthKey(t, key_id, secret)


def encode(p: Packet, key: AuthKey | None = None, seq: int = 0) -> bytes:
    """The packet's octets; with a key, its authentication section (the sequence number `seq`
    for keyed types), signed as RFC 5880 §6.7 says."""
    length = HEADER_LEN + (key.section_len() if key else 0)
    head = HEADER.pack(
        (p.version << 5) | (p.diag & 0x1F),
        _flags(replace(p, auth=Auth(0, 0)) if key else replace(p, auth=None)),
        p.detect_mult,
        length,
        p.my_disc,
        p.your_disc,
        p.desired_min_tx_us,
        p.required_min_rx_us,
        p.required_min_echo_rx_us,
    )
    if key is None:
        return head
    if key.type == AuthType.SIMPLE_PASSWORD:
        return head + bytes((key.type, key.section_len(), key.key_id)) + key.secret
    dlen, algo = _DIGEST[key.type]
    # The digest covers the whole packet with the key (zero-padded) in the digest's place.
    pre = head + bytes((key.type, key.section_len(), key.key_id, 0)) + struct.pack("!I", seq & 0xFFFFFFFF)
    secret = key.secret.ljust(dlen, b"\0")
    return pre + hashlib.new(algo, pre + secret).digest()


def decode(data: bytes | bytearray | memoryview) -> Packet:
    """Parse and apply RFC 5880 §6.8.6's structural checks (version, lengths, detect mult,
    multipoint, discriminators); authentication is checked by `verify`."""
    b = bytes(data)
    if len(b) < HEADER_LEN:
        raise BfdDecodeError(f"BFD packet of {len(b)} octets is shorter than {HEADER_LEN}")
    vd, fl, mult, length, my, your, tx, rx, echo = HEADER.unpack_from(b)
    version = vd >> 5
    if version != 1:
        raise BfdDecodeError(f"BFD version {version} (only 1 is defined)")
    auth_bit = bool(fl & 0x04)
    if length < (HEADER_LEN + 2 if auth_bit else HEADER_LEN) or length > len(b):
        raise BfdDecodeError(f"BFD length field {length} is wrong for a packet of {len(b)} octets")
    if mult == 0:
        raise BfdDecodeError("BFD detect multiplier 0")
    if fl & 0x01:
        raise BfdDecodeError("BFD multipoint bit set")
    if my == 0:
        raise BfdDecodeError("BFD My Discriminator 0")
    state = State((fl >> 6) & 3)
    if your == 0 and state not in (State.DOWN, State.ADMIN_DOWN):
        raise BfdDecodeError(f"BFD Your Discriminator 0 in state {state.name}")
    auth = None
    if auth_bit:
        auth = _decode_auth(b[HEADER_LEN:length])
    return Packet(
        state=state,
        my_disc=my,
        your_disc=your,
        desired_min_tx_us=tx,
        required_min_rx_us=rx,
        detect_mult=mult,
        diag=vd & 0x1F,
        poll=bool(fl & 0x20),
        final=bool(fl & 0x10),
        cpi=bool(fl & 0x08),
        demand=bool(fl & 0x02),
        multipoint=False,
        required_min_echo_rx_us=echo,
        version=version,
        auth=auth,
    )


def _decode_auth(sec: bytes) -> Auth:
    if len(sec) < 3:
        raise BfdDecodeError("BFD authentication section truncated")
    t, alen, key_id = sec[0], sec[1], sec[2]
    if alen != len(sec):
        raise BfdDecodeError(f"BFD authentication length {alen} does not match the {len(sec)} octets present")
    if t == AuthType.SIMPLE_PASSWORD:
        if not 4 <= alen <= 19:
            raise BfdDecodeError(f"BFD simple password section length {alen} outside 4..19")
        return Auth(t, key_id, password=sec[3:])
    if t in _DIGEST:
        dlen = _DIGEST[AuthType(t)][0]
        if alen != 8 + dlen:
            raise BfdDecodeError(f"BFD {AuthType(t).name} section length {alen}, expected {8 + dlen}")
        return Auth(t, key_id, seq=struct.unpack_from("!I", sec, 4)[0], digest=sec[8:])
    raise BfdDecodeError(f"BFD authentication type {t} unknown")


@dataclass
class AuthRxState:
    """The receive side's sequence-number memory for keyed authentication (§6.7.3)."""

    known: bool = False
    last_seq: int = 0


def verify(data: bytes | bytearray | memoryview, p: Packet, key: AuthKey | None, rx: AuthRxState | None = None) -> str:
    """'' if the packet passes authentication (§6.7 and §6.8.6), else why it is discarded.

    With `rx`, the keyed types' sequence window is checked and advanced (the receiver that sees
    every packet - the agent); without, only the password or digest.
    """
    if key is None:
        return "" if p.auth is None else "authentication present but not configured"
    a = p.auth
    if a is None:
        return "authentication configured but absent"
    if a.type != key.type:
        return f"authentication type {a.type}, expected {int(key.type)}"
    if a.key_id != key.key_id:
        return f"authentication key id {a.key_id}, expected {key.key_id}"
    if key.type == AuthType.SIMPLE_PASSWORD:
        return "" if hmac.compare_digest(a.password, key.secret) else "wrong password"
    b = bytes(data)
    length = b[3]
    dlen, algo = _DIGEST[key.type]
    pre = b[: length - dlen]
    expect = hashlib.new(algo, pre + key.secret.ljust(dlen, b"\0")).digest()
    if not hmac.compare_digest(expect, a.digest):
        return "wrong digest"
    if rx is not None:
        if rx.known:
            window = 3 * p.detect_mult
            delta = (a.seq - rx.last_seq) & 0xFFFFFFFF
            if key.meticulous and not 1 <= delta <= window:
                return f"sequence {a.seq} outside ({rx.last_seq}, {rx.last_seq}+{window}]"
            if not key.meticulous and delta > window:
                return f"sequence {a.seq} outside [{rx.last_seq}, {rx.last_seq}+{window}]"
        rx.known = True
        rx.last_seq = a.seq
    return ""

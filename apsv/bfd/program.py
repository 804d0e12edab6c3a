"""The transmission program: what a BFD session asks its agent to run (a TX_PROGRAM frame).

BFD's periodic work - a packet every few tens of milliseconds each way, and a detection timer
re-armed by every valid packet - stays at the edge, next to the socket, as line cards run it
for a route processor. The stack, in the cluster, sees only what changes: a packet that says
something new, or the detection timer expiring. The program tells the agent:

* `packet`: the Control packet to send every `tx_interval_us` (less RFC 5880 §6.8.7's random
  jitter), unsigned - the agent adds the authentication section with its own sequence numbers;
  no transmission when `tx_interval_us` is 0 (the peer asked for none);
* `once`: a packet to send once, now (a Final answering a Poll, or the first packet of a new
  state), or empty;
* `detect_time_us`: the detection time to arm on each valid packet received, 0 for none.

Layout (network byte order): version u8 (1), flags u8 (reserved), detect_mult u8, reserved u8,
tx_interval_us u32, detect_time_us u32, packet length u16, packet, once length u16, once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from apsv.errors import DecodeError

_HEAD = struct.Struct("!BBBBIIH")
VERSION = 1


@dataclass(frozen=True, slots=True)
class TxProgram:
    packet: bytes
    tx_interval_us: int
    detect_time_us: int
    detect_mult: int
    once: bytes = b""

    def encode(self) -> bytes:
        return (
            _HEAD.pack(VERSION, 0, self.detect_mult, 0, self.tx_interval_us, self.detect_time_us, len(self.packet))
            + self.packet
            + struct.pack("!H", len(self.once))
            + self.once
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> TxProgram:
        b = bytes(data)
        if len(b) < _HEAD.size + 2:
            raise DecodeError(f"BFD transmission program of {len(b)} octets is truncated")
        version, _fl, mult, _r, tx, detect, plen = _HEAD.unpack_from(b)
        if version != VERSION:
            raise DecodeError(f"BFD transmission program version {version} unsupported")
        end = _HEAD.size + plen
        if end + 2 > len(b):
            raise DecodeError("BFD transmission program packet truncated")
        (olen,) = struct.unpack_from("!H", b, end)
        if end + 2 + olen != len(b):
            raise DecodeError("BFD transmission program length mismatch")
        return cls(b[_HEAD.size : end], tx, detect, mult, b[end + 2 :])

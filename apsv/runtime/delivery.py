"""Handing a client's output frames over once each, in each session's order (pure; compiled).

Output reaches a client by several ways - with a batch's reply, unasked after a session opened
or moved in, from a session's old instance and its new one - so a session's later frame can
arrive first: it waits here (bounded) until the gap fills. A frame at or below what was handed
over is a repeat - a restored session producing again what it produced before it was restored -
and is dropped and counted. Frames numbered 0 (DEADLINE: a session's next timer) stand outside
that order: each is handed over as it comes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from apsv.frame import HEADER_LEN, Frame, decode_frame
from apsv.runtime.host import Key

MAX_EARLY_OUTPUTS: Final = 100_000  # output frames held back waiting for an earlier one

# What delivery reads of a header: protocol, tenant, vrouter, session, seq, rx_ns, payload length.
_ROUTE: Final = struct.Struct("!4xH2xIIQQQ8xI4x")
MAX_LATENCY_SAMPLES: Final = 65_536  # round trips kept between two reads of `latencies`


class OutputOrder:
    def __init__(self, on_output: Callable[[Frame], None] | None, record_latency: bool = False) -> None:
        self.on_output = on_output
        # round trips (ns): from the frame's receive stamp, which its output carries back, to now
        self.latencies: list[int] | None = [] if record_latency else None
        self.delivered: dict[Key, int] = {}
        self._early: dict[Key, dict[int, bytes | None]] = {}
        self._early_count = 0
        self.outputs = 0  # handed over (or, with no one to hand them to, counted)
        self.repeated_outputs = 0  # regenerated after a restore and dropped here
        self.reordered_outputs = 0  # arrived before an earlier one of their session, held until it came
        self.output_gaps = 0  # output frames given up on (MAX_EARLY_OUTPUTS reached)
        self.unordered_outputs = 0  # frames outside any session's order (DEADLINE), handed over as they came

    def deliver(self, output: bytes, now_ns: int = 0) -> None:
        """Output frames back to back, as an instance returns them (`now_ns`: when they came)."""
        unpack = _ROUTE.unpack_from
        delivered = self.delivered
        bookkeeping_only = self.on_output is None
        lat = self.latencies
        view = memoryview(output)
        off = 0
        end = len(output)
        inline = 0
        while off < end:
            proto, tenant, vrouter, sid, seq, rx, n = unpack(output, off)
            if lat is not None and rx and len(lat) < MAX_LATENCY_SAMPLES:
                lat.append(now_ns - rx)
            key = (tenant, vrouter, proto, sid)
            if seq == 0:
                self.unordered_outputs += 1
                hand = self.on_output
                if hand is not None:
                    hand(decode_frame(view[off : off + HEADER_LEN + n]))
            elif bookkeeping_only and not self._early and seq == delivered.get(key, 0) + 1:
                # the common case, inline: in order, nothing waiting, nobody to hand it to
                delivered[key] = seq
                inline += 1
            else:
                self._accept(key, seq, None if bookkeeping_only else view[off : off + HEADER_LEN + n])
            off += HEADER_LEN + n
        self.outputs += inline

    def forget(self, key: Key) -> None:
        self.delivered.pop(key, None)
        early = self._early.pop(key, None)
        if early:
            self._early_count -= len(early)

    def _accept(self, key: Key, seq: int, frame: memoryview | None) -> None:
        last = self.delivered.get(key, 0)
        if seq <= last:
            self.repeated_outputs += 1
            return
        if seq != last + 1:
            waiting = self._early.setdefault(key, {})
            if seq not in waiting:
                waiting[seq] = None if frame is None else bytes(frame)
                self._early_count += 1
                self.reordered_outputs += 1
                if self._early_count > MAX_EARLY_OUTPUTS:
                    self._skip_gap()
            return
        self._hand(key, seq, frame)
        early = self._early.get(key)
        while early and (seq := seq + 1) in early:
            held = early.pop(seq)
            self._early_count -= 1
            self._hand(key, seq, None if held is None else memoryview(held))
        if early is not None and not early:
            del self._early[key]

    def _hand(self, key: Key, seq: int, frame: memoryview | None) -> None:
        self.delivered[key] = seq
        self.outputs += 1
        if self.on_output is not None and frame is not None:
            self.on_output(decode_frame(frame))

    def _skip_gap(self) -> None:
        """Too much waiting on a gap: give up on the session with the oldest one (counted)."""
        key = min(self._early, key=lambda k: min(self._early[k]))
        first = min(self._early[key])
        self.output_gaps += first - self.delivered.get(key, 0) - 1
        self.delivered[key] = first - 1
        held = self._early[key].pop(first)
        self._early_count -= 1
        self._accept(key, first, None if held is None else memoryview(held))

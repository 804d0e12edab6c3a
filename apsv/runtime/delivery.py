"""Handing a client's output frames over once each, in each session's order (pure).

Output reaches a client by several ways - with a batch's reply, unasked after a session opened
or moved in, from a session's old instance and its new one - so a session's later frame can
arrive first: it waits here (bounded) until the gap fills. A frame at or below what was handed
over is a repeat - a restored session producing again what it produced before it was restored -
and is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from apsv.frame import HEADER, HEADER_LEN, Frame, decode_frame
from apsv.runtime.host import Key

MAX_EARLY_OUTPUTS = 100_000  # output frames held back waiting for an earlier one


@dataclass
class DeliveryStats:
    outputs: int = 0
    repeated_outputs: int = 0  # regenerated after a restore and dropped here
    reordered_outputs: int = 0  # arrived before an earlier one of their session, held until it came
    output_gaps: int = 0  # output frames given up on (MAX_EARLY_OUTPUTS reached)


class OutputOrder:
    def __init__(self, on_output: Callable[[Frame], None] | None, stats: DeliveryStats | None = None) -> None:
        self.on_output = on_output
        self.stats = stats if stats is not None else DeliveryStats()
        self.delivered: dict[Key, int] = {}
        self._early: dict[Key, dict[int, bytes | None]] = {}
        self._early_count = 0

    def deliver(self, output: bytes | memoryview) -> None:
        """Output frames back to back, as an instance returns them."""
        unpack = HEADER.unpack_from
        delivered = self.delivered
        st = self.stats
        bookkeeping_only = self.on_output is None
        view = memoryview(output)
        off, end = 0, len(view)
        while off < end:
            _m, _v, _k, proto, _f, tenant, vrouter, sid, seq, _rx, _tx, n, _e = unpack(view, off)
            key = (tenant, vrouter, proto, sid)
            if bookkeeping_only and not self._early and seq == delivered.get(key, 0) + 1:
                # the common case, inline: in order, nothing waiting, nobody to hand it to
                delivered[key] = seq
                st.outputs += 1
            else:
                self._accept(key, seq, None if bookkeeping_only else view[off : off + HEADER_LEN + n])
            off += HEADER_LEN + n

    def forget(self, key: Key) -> None:
        self.delivered.pop(key, None)
        early = self._early.pop(key, None)
        if early:
            self._early_count -= len(early)

    def _accept(self, key: Key, seq: int, frame: memoryview | None) -> None:
        st = self.stats
        last = self.delivered.get(key, 0)
        if seq <= last:
            st.repeated_outputs += 1
            return
        if seq != last + 1:
            waiting = self._early.setdefault(key, {})
            if seq not in waiting:
                waiting[seq] = None if frame is None else bytes(frame)
                self._early_count += 1
                st.reordered_outputs += 1
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
        self.stats.outputs += 1
        if self.on_output is not None and frame is not None:
            self.on_output(decode_frame(frame))

    def _skip_gap(self) -> None:
        """Too much waiting on a gap: give up on the session with the oldest one (counted)."""
        key = min(self._early, key=lambda k: min(self._early[k]))
        first = min(self._early[key])
        self.stats.output_gaps += first - self.delivered.get(key, 0) - 1
        self.delivered[key] = first - 1
        held = self._early[key].pop(first)
        self._early_count -= 1
        self._accept(key, first, None if held is None else memoryview(held))

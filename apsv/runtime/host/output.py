"""A session host's output: the frames its sessions' events become, and where they wait.

Output made while a batch is applied goes back with that batch; output made outside one
(opens, closes, timers) waits by the owner it goes to until collected. Both are bounded: what
is over the bound is dropped and counted. Compiled: every event a session answers a frame with
passes through here.
"""

from __future__ import annotations

import json
from typing import Any, Final

from apsv.frame import HEADER, MAGIC, VERSION, Frame, FrameKind, encode_deadline, encode_frame
from apsv.runtime.host.state import EVENTS_ALL, EVENTS_STATE, NO_TIMER, UNSENT, Entry, HostCounters, HostLimits, Key
from apsv.stacks.interface import CloseTransport, OpenTransport, Send, StackEvent, TxProgram

MAX_UNSOLICITED_FRAMES = 100_000  # output produced outside a batch, waiting for its owner, per host

# What is looked up per event kept where the compiled module finds it without a lookup.
_pack_header: Final = HEADER.pack
_SendEvent: Final = Send
# Frame kinds as plain ints: compared per event, where an enum member's lookup costs.
_SEND: Final = int(FrameKind.SEND)
_CLOSE: Final = int(FrameKind.CLOSE)
_OPEN: Final = int(FrameKind.OPEN)
_TX_PROGRAM: Final = int(FrameKind.TX_PROGRAM)
_DEADLINE: Final = int(FrameKind.DEADLINE)


class Output:
    def __init__(self, limits: HostLimits, counters: HostCounters) -> None:
        self.limits = limits
        self.counters = counters
        self.tx_ns = 0  # the send stamp of the frames being made (set per batch or call)
        self._out: list[bytes] = []  # output of the batch being applied: headers and payloads
        self._out_frames = 0
        self._in_batch = False
        # output produced outside a batch (opens, closes, timers), by the owner it goes to
        self._unsolicited: dict[str, list[bytes]] = {}
        self.unsolicited_count = 0

    def begin_batch(self, tx_ns: int) -> None:
        """Collect output for the batch about to be applied, stamped `tx_ns`."""
        self.tx_ns = tx_ns
        self._out = []
        self._out_frames = 0
        self._in_batch = True

    def end_batch(self) -> bytes:
        """The batch's output, joined once."""
        out = b"".join(self._out)
        self._out = []
        self._in_batch = False
        return out

    def collect(self) -> dict[str, bytes]:
        """Output produced outside batches, by the owner it is for."""
        out = {owner: b"".join(frames) for owner, frames in self._unsolicited.items() if frames}
        self._unsolicited = {}
        self.unsolicited_count = 0
        return out

    def emit(self, key: Key, e: Entry, events: list[StackEvent], rx_ns: int) -> None:
        """Queue a session's events as output frames: transport actions each as its own frame,
        the events its virtual router asked for (`emit_events`) together as one EVENTS frame."""
        tenant, vrouter, proto, sid = key
        tx = self.tx_ns
        pack = _pack_header
        magic, version = MAGIC, VERSION
        lines: list[dict[str, Any]] | None = None
        for ev in events:
            t = type(ev)
            if t is _SendEvent:
                kind, payload = _SEND, ev.data  # type: ignore[attr-defined]
            elif t is CloseTransport:
                kind, payload = _CLOSE, ev.reason.encode()  # type: ignore[attr-defined]
            elif t is OpenTransport:
                kind, payload = _OPEN, b""
            elif t is TxProgram:
                kind, payload = _TX_PROGRAM, ev.data  # type: ignore[attr-defined]
            else:
                if e.emit_events == EVENTS_ALL or (e.emit_events == EVENTS_STATE and not ev.route_event):
                    if lines is None:
                        lines = []
                    lines.append(ev.to_json())
                continue
            e.out_seq += 1
            # header and payload queued apart, joined once for the whole output
            self.queue(
                e.owner,
                pack(magic, version, kind, proto, 0, tenant, vrouter, sid, e.out_seq, rx_ns, tx, len(payload), 0),
                payload,
            )
        if lines:
            e.out_seq += 1
            body = "\n".join(json.dumps(x, separators=(",", ":")) for x in lines).encode()
            self.queue(
                e.owner,
                encode_frame(Frame(FrameKind.EVENTS, proto, tenant, vrouter, sid, e.out_seq, rx_ns, tx, body)),
                b"",
            )

    def tell_deadline(self, key: Key, e: Entry, now: float) -> None:
        """A DEADLINE frame when the session's next timer comes earlier than the one its client
        was told, or that one has passed (not when a timer only moves later, as the hold timer
        does with every message: the client then ticks early once, and hears the new one)."""
        d = e.session.next_deadline()
        w = e.wake_sent
        if d is None:
            if w == UNSENT or w > now:  # never told, or told "none" (inf), or its tick is still to come
                return
            d_value, payload = NO_TIMER, encode_deadline(None)
        else:
            if w != UNSENT and d >= w - 0.001 and w > now:
                return
            d_value, payload = d, encode_deadline(d)
        e.wake_sent = d_value
        tenant, vrouter, proto, sid = key
        # sequence number 0 and no receive stamp: outside the session's output order
        header = _pack_header(
            MAGIC, VERSION, _DEADLINE, proto, 0, tenant, vrouter, sid, 0, 0, self.tx_ns, len(payload), 0
        )
        self.queue(e.owner, header, payload)

    def queue(self, owner: str, header: bytes, payload: bytes) -> None:
        c = self.counters
        if self._in_batch:
            if self._out_frames >= self.limits.max_output_frames:
                c.output_dropped += 1  # never grows without bound
                return
            self._out.append(header)
            self._out.append(payload)
            self._out_frames += 1
        else:
            if self.unsolicited_count >= MAX_UNSOLICITED_FRAMES:
                c.output_dropped += 1  # an owner that never collects loses the newest (counted)
                return
            self._unsolicited.setdefault(owner, []).append(header + payload)
            self.unsolicited_count += 1
        c.frames_out += 1

"""Replies: reading the links, acting on what the instances answer (outputs, refusals, snapshots),
re-sending from custody, and a link lost."""

from __future__ import annotations

import logging
import select
import time
from typing import Any

from apsv.frame import HEADER
from apsv.runtime import channel
from apsv.runtime.buffer_pool import Buffer
from apsv.runtime.client.base import Parts
from apsv.runtime.host import GAP, MOVED, PENDING, STALE
from apsv.runtime.links import Link, LinkDown, RayLink, ShmLink
from apsv.runtime.outbox import Session

log = logging.getLogger("apsv.client")
POLL_EVERY_S = 0.0001  # service() looks for replies at most this often


class Replies(Parts):
    """Part of `OffloadClient` (core.py): its replies."""

    def service(self) -> None:
        """Take in what arrived and send the buffer if it should go now, without blocking. A
        sender in latency mode calls it after each burst of `send`s (an agent: each turn of its
        loop), and `wait`s for replies when it has nothing to send.

        With a batch delay set, a buffer goes as soon as fewer than `eager_inflight` batches are
        in flight (Nagle's rule: while the cluster works on a batch the next one fills, so light
        load gets small fast batches and heavy load big ones, and the batch rate clocks itself
        to the round trip), or when its first frame has waited `max_batch_delay_s`.
        """
        now = time.perf_counter()
        self._report(now)
        if now - self._last_poll >= POLL_EVERY_S:
            self._last_poll = now
            self.pump(0.0)
        if self._resends:
            self._resend()
        if (
            self.max_batch_delay_s is not None
            and self.outbox.frames
            and (
                self._buffers_out < self.eager_inflight
                or (now - self._batch_started >= self.max_batch_delay_s and self._buffers_out < self.max_inflight)
            )
        ):
            self.flush()

    def wait(self, timeout: float) -> None:
        """Block until something arrives (a reply, a route) or `timeout`; take it in."""
        self.pump(timeout)
        if self._resends:
            self._resend()

    def fds(self) -> list[int]:
        """What to watch for readiness (an event loop's readers): the same-node links and the route feed."""
        return [link.fileno() for link in self.links.values() if isinstance(link, ShmLink) and not link.down] + [
            self.feed.fileno()
        ]

    def needs_polling(self) -> bool:
        """Whether something has no file descriptor to wake on (cross-node calls, multiplexer
        answers, a rate limit's wait)."""
        return (
            bool(self._control)
            or (self.rate is not None and self.rate.wait_s(time.monotonic()) > 0)
            or any(isinstance(link, RayLink) and link.calls for link in self.links.values())
        )

    def pump(self, timeout: float = 0.0) -> None:
        """Read every link with something to read (waiting up to `timeout` for one), then act on it."""
        shm = [link for link in self.links.values() if isinstance(link, ShmLink) and not link.down]
        if self.needs_polling():
            timeout = min(timeout, 0.002)
        watched: list[Any] = [*shm, self.feed]
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # a link closed under us: read them all
            ready = watched
        for r in ready:
            if r is self.feed:
                for update in self.feed.take():
                    self._on_routes(update)
            else:
                self._read(r)
        for link in list(self.links.values()):
            if link.down:  # (a send failed on it: it is gone)
                self._link_lost(link, "sending failed")
            elif isinstance(link, RayLink) and link.calls:
                self._read(link)
        if self._control:
            self._check_control()
        self.feed.arm()
        self._relocate()

    def _read(self, link: Link) -> None:
        try:
            msgs = link.read()
        except LinkDown as e:
            msgs = e.args[1] if len(e.args) > 1 else []
            for m in msgs:
                self._on_message(link, m)
            self._link_lost(link, str(e.args[0]))
            return
        for m in msgs:
            self._on_message(link, m)

    def _on_message(self, link: Link, msg: channel.Message) -> None:
        if isinstance(msg, channel.Reply):
            mark = self._mark
            if msg.batch >= 0:
                now = time.perf_counter()
                if self._buffers_out:
                    self.stats.longest_reply_gap_s = max(self.stats.longest_reply_gap_s, now - self._last_reply)
                self._last_reply = now
                sent = link.answered(msg.batch)
                if sent is not None:
                    mark = sent.mark
                    if sent.buffer is not None:
                        self.batch_latencies.append(now - sent.t0)
                        self._part_done(sent.buffer)
            if msg.output:
                o = self.order
                o.deliver(msg.output, time.time_ns())
                st = self.stats
                st.outputs, st.repeated_outputs = o.outputs, o.repeated_outputs
                st.reordered_outputs, st.output_gaps = o.reordered_outputs, o.output_gaps
            for snap in msg.snapshots:
                self.custody.snapshot(snap.key, snap.seq, snap.blob)
            for r in msg.refusals:
                self._refused(link, r, mark)
        elif isinstance(msg, channel.Restored):
            s = self.sessions.get(msg.key)
            if s is None or s.restoring != msg.request:
                return
            s.restoring = 0
            if msg.error:
                log.info("restoring %s on %s failed: %s", msg.key, link.instance_id, msg.error)
                self._hold(s)
                self._locating[s.key] = s
                s.located = 0.0
            else:
                s.hold = False
                s.part_of = None  # (its next frames go by the new route)
                s.restored = s.epoch
                self._resends[s.key] = s
        elif isinstance(msg, str):
            self._link_lost(link, msg)

    def _part_done(self, buf: Buffer) -> None:
        left = self._open_parts[buf.index] - 1
        if left:
            self._open_parts[buf.index] = left
            return
        del self._open_parts[buf.index]
        self._buffers_out -= 1
        self.pool.release(buf)

    def _refused(self, link: Link, r: channel.Refusal, mark: int) -> None:
        """An instance did not apply some of a session's frames: learn what it says, and send
        them again - from custody, by the right route - from the first it refused."""
        s = self.sessions.get(r.key)
        if s is None:
            return
        self.stats.refused += 1
        newer = r.epoch > s.epoch
        if mark < s.resend_mark and not newer and r.seq >= s.resent_from:
            return  # sent before the last resend, which covered it
        s.resend_from = min(s.resend_from or r.seq, r.seq)
        if newer:
            if r.reason == MOVED:
                target = self._link_to(r.instance)
                if target is None:
                    self._hold(s)
                    self._locating[s.key] = s
                    return
                s.epoch, s.link = r.epoch, target
                s.part_of = None  # (its next frames go by the new route)
            elif r.reason in (STALE, PENDING):
                s.epoch, s.link = r.epoch, link
                s.part_of = None  # (its next frames go by the new route)
                if r.reason == PENDING and not s.restoring:
                    self._restore(s)
                    return
            self._locating.pop(s.key, None)
            if s.hold and not s.restoring:
                s.hold = False
                s.part_of = None  # (its next frames go by the new route)
        elif link is s.link and not s.hold:
            # from the route held now: it has a gap (re-send), or it is waiting for the session's
            # restore, or does not have it at all (ask the multiplexer where it is)
            if r.reason == PENDING and r.epoch == s.epoch:
                if not s.restoring:
                    self._restore(s)
                return
            if r.reason != GAP:
                self._hold(s)
                self._locating[s.key] = s
                return
        # (otherwise: frames sent by a route since replaced - they go again by the new one)
        if not s.hold:
            self._resends[s.key] = s

    def _resend(self) -> None:
        """Send sessions' frames again from custody (in order, at their current epoch), ahead of
        anything newer of theirs."""
        todo, self._resends = self._resends, {}
        self.flush()
        for s in todo.values():
            if s.hold or s.link is None or s.key not in self.sessions:
                continue
            frm, s.resend_from = s.resend_from, 0
            if not frm:
                continue
            s.resent_from, s.resend_mark = frm, self._mark
            for frame in self.custody.frames_from(s.key, frm):
                if not self._append_copy(s, frame):
                    # its link went down under the flush this frame waited for: the session is
                    # held, and goes on from this frame, from custody, once it has a route
                    seq = HEADER.unpack_from(frame)[8]
                    s.resend_from = min(s.resend_from or seq, seq)
                    break
        self.flush()

    def _append_copy(self, s: Session, frame: memoryview) -> bool:
        """Copy a frame from custody into the current buffer, for the session's link; False
        (nothing copied) if the session has no link, or lost it in the flush that made room."""
        if s.link is None:
            return False
        if self._buf is None:
            self._take_buffer()
        if self.outbox.copy(s, frame, s.epoch) < 0:
            self.flush()
            if s.link is None:
                return False
            self._take_buffer()
            self.outbox.copy(s, frame, s.epoch)
        self.stats.frames_resent += 1
        return True

    def _link_lost(self, link: Link, why: str) -> None:
        """An instance is gone (or shut this client out). Its answered batches were applied or
        refused there; the others go again, from custody, by their sessions' routes (those
        still routed there wait for their new home - the multiplexer is told - and are restored
        there if the instance died)."""
        if self.links.get(link.instance_id) is link:
            del self.links[link.instance_id]
        link.close()
        for sent in link.abandon():
            if sent.buffer is not None:
                self._part_done(sent.buffer)
            for key, first in sent.firsts:
                s = self.sessions.get(key)
                if s is not None:
                    s.resend_from = min(s.resend_from or first, first)
                    if s.link is not None and s.link is not link and not s.hold:
                        self._resends[key] = s
        self.stats.links_lost += 1
        log.info("link to %s lost: %s", link.instance_id, why)
        for s in self.sessions.values():
            if s.link is link:
                self._hold(s)
                self._locating[s.key] = s
                s.located = 0.0
        self._control.append(
            ("report", self.im.report_failure.remote(self.client_id, self.credential, link.instance_id))
        )

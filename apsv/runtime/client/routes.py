"""Routes: where each session's frames go - the link to its instance, connected on first use;
held while it has no usable route; restored from custody on an instance that waits for it -
following the multiplexer's route feed, asking it where sessions are that have no usable
route, reclaiming them, and reporting the offered load."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from apsv.runtime import channel
from apsv.runtime.client.base import Parts
from apsv.runtime.host import Key
from apsv.runtime.links import RAY_WINDOW, Link, LinkDown, RayLink, ShmLink
from apsv.runtime.outbox import Session

log = logging.getLogger("apsv.client")
RELOCATE_AFTER_S = 0.05  # a session with no usable route asks the multiplexer again after this
REPORT_EVERY_S = 0.25  # how often a client tells the multiplexer its offered load


class Routes(Parts):
    """Part of `OffloadClient` (core.py): its routes and load reports."""

    # -- a session's route ---------------------------------------------------------------------

    def _link_to(self, iid: str) -> Link | None:
        """The link to an instance, connected on first use (None: it cannot be reached now)."""
        link = self.links.get(iid)
        if link is not None and not link.down:
            return link
        ep = self.endpoints.get(iid)
        if ep is None:
            return None
        try:
            if self.force != "object_store" and ep["node_id"] == self.node_id and ep.get("endpoint"):
                link = ShmLink(iid, ep["endpoint"], self.client_id, self.credential, self.pool.shm_name or "")
            else:
                link = RayLink(iid, ep["handle"], self.client_id, self.credential, int(ep.get("window", RAY_WINDOW)))
        except LinkDown as e:
            log.info("cannot reach %s: %s", iid, e)
            return None
        self.links[iid] = link
        return link

    def _route(self, s: Session, iid: str, epoch: int, state: str) -> None:
        """The session is at `iid`, at `epoch`, in `state` (live, pending, moving, unplaced)."""
        if epoch < s.epoch:
            return  # older than what an instance already told us
        if state in ("moving", "unplaced"):
            self._hold(s)
            self._locating[s.key] = s
            return
        link = self._link_to(iid)
        if link is None:
            self._hold(s)
            self._locating[s.key] = s
            return
        s.epoch, s.link = epoch, link
        s.part_of = None  # (its next frames go by the new route)
        self._locating.pop(s.key, None)
        if state == "pending" and s.restored != epoch:
            if not s.restoring:
                self._restore(s)
        elif s.hold and not s.restoring:
            s.hold = False
            if s.resend_from:
                self._resends[s.key] = s

    def _hold(self, s: Session) -> None:
        """Stop sending the session's frames (they stay in custody) until it has a route."""
        if not s.hold:
            s.hold = True
            s.resend_from = min(s.resend_from or s.seq + 1, s.seq + 1)
        s.link = None
        s.part_of = None  # (its next frames are held)

    def _restore(self, s: Session) -> None:
        """Restore the session on its (new) instance from custody, then re-send what followed."""
        assert s.link is not None
        snapshot, after = self.custody.restore_point(s.key)
        self._restore_ids += 1
        s.restoring = self._restore_ids
        s.hold = True
        s.part_of = None  # (its next frames are held)
        s.resend_from = after
        self.stats.restores += 1
        s.link.send_restore(channel.restore(s.restoring, s.key, s.epoch, s.emit, snapshot, s.config))

    # -- the route feed and relocation ---------------------------------------------------------

    def _on_routes(self, update: dict[str, Any]) -> None:
        self.endpoints.update(update.get("instances", {}))
        routes: dict[Key, tuple[str, int, str]] = update.get("routes", {})
        for key, (iid, epoch, state) in routes.items():
            s = self.sessions.get(key)
            if s is not None:
                self._route(s, iid, epoch, state)
        if update.get("full"):
            # the multiplexer (re)started: a session it did not list may be one it lost (reclaimed
            # if `locate` says so) - or merely one opened after this answer was made
            for k, s in self.sessions.items():
                if k not in routes and s.opened < update.get("issued", 0.0):
                    self._locating[k] = s

    def _relocate(self) -> None:
        """Ask where the sessions without a usable route are (one question at a time)."""
        if not self._locating or any(kind == "locate" for kind, _ in self._control):
            return
        now = time.monotonic()
        keys = [k for k, s in self._locating.items() if now - s.located >= RELOCATE_AFTER_S]
        if not keys:
            return
        for k in keys:
            self._locating[k].located = now
        self.stats.relocations += len(keys)
        self._control.append(("locate", self.im.locate.remote(self.client_id, self.credential, keys)))

    def _reclaim(self, sessions: list[Session]) -> None:
        items = [(s.key, s.protocol, s.epoch) for s in sessions]
        for s in sessions:
            self._hold(s)
        self._control.append(("reclaim", self.im.reclaim.remote(self.client_id, self.credential, items)))

    def _check_control(self) -> None:
        ready, _ = ray.wait([ref for _, ref in self._control], num_returns=len(self._control), timeout=0)
        if not ready:
            return
        done = set(ready)
        keep = []
        for kind, ref in self._control:
            if ref not in done:
                keep.append((kind, ref))
                continue
            try:
                answer = ray.get(ref)
            except Exception as e:  # the multiplexer is down: the sessions ask again later
                log.debug("%s failed: %r", kind, e)
                continue
            if kind in ("locate", "reclaim"):
                self.endpoints.update(answer["instances"])
                unknown = []
                for key, route in answer["routes"].items():
                    s = self.sessions.get(key)
                    if s is None:
                        continue
                    if route is None:
                        unknown.append(s)
                    else:
                        self._route(s, *route)
                if unknown and kind == "locate":
                    self._reclaim(unknown)
        self._control = keep

    # -- load reports --------------------------------------------------------------------------

    def _report(self, now: float, wait: bool = False) -> None:
        """Tell the multiplexer the offered counts (at most every REPORT_EVERY_S, if changed, one
        report in flight at a time: a multiplexer that is down gets no pile of them); export the
        client's metrics (at most once a second)."""
        if wait or now - self._last_metrics >= 1.0:
            self._last_metrics = now
            self.metrics.sample(self.pool.in_use(), now, force=True)  # (kept alive while idle too)
            self.metrics.messages(
                {k: s.seq for k, s in self.sessions.items()}, {k[2]: s.protocol for k, s in self.sessions.items()}
            )
            self.metrics.batch_times(self.batch_latencies[self._latencies_exported :], self.stats.batches)
            if len(self.batch_latencies) > 100_000:
                del self.batch_latencies[:50_000]
            self._latencies_exported = len(self.batch_latencies)
        if not wait and now - self._last_report < REPORT_EVERY_S:
            return
        if self._report_ref is not None and not wait and not ray.wait([self._report_ref], timeout=0)[0]:
            return
        self._last_report = now
        offered: dict[str, int] = {}
        for pid, n in self.offered.items():
            name = self._protocols.get(pid, str(pid))
            offered[name] = offered.get(name, 0) + n
        if offered == self._offered_reported and not wait:
            return
        self._offered_reported = offered
        self._report_ref = self.im.report_offered.remote(self.client_id, self.credential, self._offered_reported)
        if wait:
            try:
                ray.get(self._report_ref, timeout=10)
            except Exception:  # the multiplexer is down: the counts are lost, not the frames
                log.debug("offered-load report failed", exc_info=True)

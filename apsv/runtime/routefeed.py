"""A client's feed of its routes from the multiplexer: a long poll, as a Ray Serve handle keeps.

One call to the multiplexer's `watch` is always outstanding; it answers when any of this
client's routes changes (a move, a recovery) or after `WATCH_S` with nothing. When the answer
comes, Ray completes the call's future on a thread of its own; the callback queues the answer,
writes one octet to a pipe - so the client's own wait (select, or an event loop's reader) wakes
at once - and has the next watch sent (from a timer thread: nothing is submitted to Ray from
Ray's callback thread). Nothing polls, and no thread of this client blocks in Ray. Because the
next watch goes out whether or not the client is busy, a watch outstanding is also the
multiplexer's sign that the client's process lives: one that stops watching is reaped (its
sessions closed) after the multiplexer's client lease. A multiplexer that dies or restarts
only delays the feed - the next watch goes out after a growing pause - and the data path never
waits for it. The callback and the timer hold the feed weakly: a client dropped without closing
stops watching (its lease runs out), and no watch goes out once Ray is shut down.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

import ray

log = logging.getLogger("apsv.client")

WATCH_S = 10.0  # how long one watch call waits for a change before answering "none"
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0


class RouteFeed:
    def __init__(self, multiplexer: Any, client: str, credential: bytes) -> None:
        self.im = multiplexer
        self.client = client
        self.credential = credential
        self.since: tuple[str, int] = ("", 0)  # (the multiplexer's incarnation, its route version)
        self.errors = 0
        self._answers: deque[dict[str, Any]] = deque()  # answers that changed a route, not yet taken
        self._lock = threading.Lock()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        # The pipe is closed with the feed, even one its client dropped without closing it.
        self._fds = weakref.finalize(self, _close_fds, self._rfd, self._wfd)
        self._out = False  # a watch is outstanding
        self._retry_at = 0.0
        self._pause = RETRY_MIN_S
        self._closed = False
        self.arm()

    def fileno(self) -> int:
        return self._rfd

    def arm(self) -> None:
        """Send the next watch, unless one is out, or a failed one's pause has not passed, or
        Ray is shut down (an actor call would start Ray again: its auto-init)."""
        with self._lock:
            if self._out or self._closed or time.monotonic() < self._retry_at:
                return
            if not ray.is_initialized():
                self._closed = True
                return
            self._out = True
            since = self.since
        issued = time.monotonic()
        try:
            fut = self.im.watch.remote(self.client, self.credential, since, WATCH_S).future()
        except Exception as e:  # Ray itself refused (shutting down): stay quiet
            with self._lock:
                self._out = False
            log.debug("route watch not sent: %r", e)
            return
        # Ray's callback and the timer below hold the feed weakly: a feed its client dropped
        # stops watching (and the multiplexer's lease on the client then runs out).
        ref = weakref.ref(self)
        fut.add_done_callback(lambda f: _call(ref, "_done", issued, f))

    def _done(self, issued: float, fut: concurrent.futures.Future[Any]) -> None:
        try:
            answer: Any = fut.result()
        except BaseException as e:  # (on Ray's thread) the multiplexer is down or restarting
            answer = e
        with self._lock:
            if self._closed:
                return
            self._out = False
            if isinstance(answer, BaseException):
                self.errors += 1
                log.debug("route watch failed (%r); again in %.2fs", answer, self._pause)
                self._retry_at = time.monotonic() + self._pause
                delay, self._pause = self._pause, min(RETRY_MAX_S, self._pause * 2)
            else:
                self._pause, delay = RETRY_MIN_S, 0.0
                self.since = (answer["incarnation"], answer["version"])  # the next watch's start
                if answer.get("routes") or answer.get("full"):  # (an empty one is only a heartbeat)
                    answer["issued"] = issued  # (a session opened after this cannot be in it)
                    self._answers.append(answer)
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.write(self._wfd, b"\0")
        again = threading.Timer(delay, _call, args=(weakref.ref(self), "_rearm"))
        again.daemon = True
        again.start()

    def _rearm(self) -> None:
        with self._lock:
            self._retry_at = 0.0  # (this timer is the pause)
        self.arm()

    def take(self) -> list[dict[str, Any]]:
        """Route updates that arrived since the last call, oldest first (each to be applied in
        turn: every one is the change since the one before)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._rfd, 4096)
        with self._lock:
            out = list(self._answers)
            self._answers.clear()
        self.arm()  # (a no-op while one is out, as it nearly always is)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._fds()


def _call(ref: weakref.ref[RouteFeed], method: str, *args: Any) -> None:
    feed = ref()
    if feed is not None:
        getattr(feed, method)(*args)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

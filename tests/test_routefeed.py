"""The route feed's long poll: re-armed from a timer while its client lives, and never after."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import time
from typing import Any

import pytest
import ray

from apsv.runtime.routefeed import RouteFeed


class _Watch:
    """A multiplexer's `watch`, as a Ray handle offers it: `.remote(...).future()`."""

    def __init__(self) -> None:
        self.calls: list[concurrent.futures.Future[Any]] = []

    def remote(self, *_: Any) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.calls.append(fut)
        return type("Ref", (), {"future": lambda _self: fut})()


class _Multiplexer:
    def __init__(self) -> None:
        self.watch = _Watch()


def _answer(fut: concurrent.futures.Future[Any], routes: dict[Any, Any] | None = None) -> None:
    fut.set_result({"incarnation": "i", "version": 1, "full": False, "routes": routes or {}, "instances": {}})


def _wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(cond())


def test_the_next_watch_goes_out_without_the_client_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    im = _Multiplexer()
    feed = RouteFeed(im, "c", b"k")
    _answer(im.watch.calls[0])  # nothing changed: a heartbeat, not kept for the client
    assert _wait_for(lambda: len(im.watch.calls) == 2)
    _answer(im.watch.calls[1], {("k",): "moved"})
    assert _wait_for(lambda: len(im.watch.calls) == 3)
    assert [a["routes"] for a in feed.take()] == [{("k",): "moved"}]
    feed.close()


def test_a_dropped_feed_stops_watching_and_closes_its_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    im = _Multiplexer()
    feed = RouteFeed(im, "c", b"k")
    fds = feed._rfd, feed._wfd
    del feed
    gc.collect()
    _answer(im.watch.calls[0])
    time.sleep(0.2)
    assert len(im.watch.calls) == 1  # no watch after the feed is gone: its client's lease runs out
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_no_watch_once_ray_is_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor call with Ray shut down would start Ray again (its auto-init): none is made."""
    up = [True]
    monkeypatch.setattr(ray, "is_initialized", lambda: up[0])
    im = _Multiplexer()
    feed = RouteFeed(im, "c", b"k")
    up[0] = False
    _answer(im.watch.calls[0])
    time.sleep(0.2)
    assert len(im.watch.calls) == 1
    feed.close()

"""Sockets in another network namespace, without moving the agent there.

A socket belongs to the namespace it was created in, for life. The agent stays in its own
namespace (where it reaches the Ray cluster) and creates a session's socket from a short-lived
thread that has joined the session's namespace (`setns` changes only the calling thread).
Named namespaces are the ones `ip netns add NAME` makes, under /run/netns.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

T = TypeVar("T")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` in network namespace `name` (None: here) and return what it returns."""
    if name is None:
        return fn()
    path = NETNS_DIR / name
    if "/" in name or not path.exists():
        raise FileNotFoundError(f"no network namespace {name!r} (expected {path})")
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            with open(path, "rb") as f:
                _setns(f.fileno())
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def udp_socket(netns: str | None, family: int = socket.AF_INET) -> socket.socket:
    return in_netns(netns, lambda: socket.socket(family, socket.SOCK_DGRAM))

"""A client's link to one stack instance: the data path, without the multiplexer.

* `ShmLink` - the instance is on this node. One Unix-socket connection to the instance's data
  plane (`apsv.runtime.dataplane`); a batch is a descriptor naming where its frames sit in the
  client's shared-memory pool, read there by the instance (no copy); the reply comes back on the
  same socket, whose readiness wakes the client (select, or an event loop's reader).
* `RayLink` - the instance is on another node (or the client was told to use the object store):
  each batch is one direct call to the instance (`rx_batch`), its frames in the object store
  (one copy, read in place there), the same REPLY returned.

A link bounds what it has in flight (octets, its window - the instance's buffer quota) and keeps
batches beyond that in order until replies make room: one slow instance holds back only the
frames sent to it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from apsv.runtime import channel
from apsv.runtime.host import Key

CONNECT_TIMEOUT_S = 10.0
# A write to a closed socket fails with EPIPE, never SIGPIPE: a library in the client's process
# may have restored SIGPIPE's default action (mrtparse does on import), which would end it.
NOSIGNAL = socket.MSG_NOSIGNAL
RAY_WINDOW = 8 << 20  # octets in flight on a cross-node link, unless the instance says otherwise


class LinkDown(ConnectionError):
    """The instance went away (or refused this client)."""


@dataclass(slots=True)
class Sent:
    """A batch (one instance's part of a pool buffer) in flight."""

    batch: int
    buffer: Any  # the pool buffer, released when every part of it is answered
    octets: int
    frames: int
    t0: float
    mark: int  # the client's send counter when it left (orders refusals against resends)
    firsts: list[tuple[Key, int]]  # each session's first frame in it: where a resend starts if it is lost


@dataclass(slots=True)
class _Waiting:
    sent: Sent
    start: int
    length: int
    offsets: bytes
    snapshot_keys: list[Key]
    data: Any  # RayLink: the batch's object ref


class Link:
    transport = ""

    def __init__(self, instance_id: str, window: int) -> None:
        self.instance_id = instance_id
        self.window = window
        self.inflight: dict[int, Sent] = {}
        self.inflight_octets = 0
        self.backlog: deque[_Waiting] = deque()
        self.down = False
        self.window_waits = 0

    def has_room(self, octets: int) -> bool:
        return not self.inflight or self.inflight_octets + octets <= self.window

    def send(
        self, sent: Sent, start: int, length: int, offsets: bytes, snapshot_keys: list[Key], data: Any = None
    ) -> None:
        """Send a batch now, or as soon as the window has room (in order)."""
        if self.backlog or not self.has_room(sent.octets):
            self.window_waits += 1
            self.backlog.append(_Waiting(sent, start, length, offsets, snapshot_keys, data))
            return
        self._transmit(sent, start, length, offsets, snapshot_keys, data)

    def _transmit(
        self, sent: Sent, start: int, length: int, offsets: bytes, snapshot_keys: list[Key], data: Any
    ) -> None:
        self.inflight[sent.batch] = sent
        self.inflight_octets += sent.octets
        self._send_batch(sent.batch, start, length, offsets, snapshot_keys, data)

    def answered(self, batch: int) -> Sent | None:
        """A reply came for `batch`: take it off the window, send what now fits."""
        sent = self.inflight.pop(batch, None)
        if sent is not None:
            self.inflight_octets -= sent.octets
        while self.backlog and not self.down and self.has_room(self.backlog[0].sent.octets):
            w = self.backlog.popleft()
            self._transmit(w.sent, w.start, w.length, w.offsets, w.snapshot_keys, w.data)
        return sent

    def abandon(self) -> list[Sent]:
        """The link is down: every batch on it not answered, sent or waiting (their frames are in
        custody, to go again by their sessions' routes)."""
        self.down = True
        out = list(self.inflight.values()) + [w.sent for w in self.backlog]
        self.inflight.clear()
        self.backlog.clear()
        self.inflight_octets = 0
        return out

    def busy(self) -> bool:
        return bool(self.inflight or self.backlog)

    # -- transport -----------------------------------------------------------------------------

    def _send_batch(
        self, batch: int, start: int, length: int, offsets: bytes, snapshot_keys: list[Key], data: Any
    ) -> None:
        raise NotImplementedError

    def send_restore(self, message: bytes) -> None:
        raise NotImplementedError

    def read(self) -> list[channel.Message]:
        """What the instance sent (never blocks)."""
        raise NotImplementedError

    def poll(self) -> None:
        """Ask for output produced outside batches (a no-op where the instance pushes it)."""

    def close(self) -> None:
        self.down = True


class ShmLink(Link):
    transport = "shm"

    def __init__(self, instance_id: str, path: str, client: str, credential: bytes, segment: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reader = channel.Reader(256 << 10)
        self._early: list[channel.Message] = []  # what came in the same read as the WELCOME
        try:
            self.sock.settimeout(CONNECT_TIMEOUT_S)
            self.sock.connect(path)
            self.sock.sendall(channel.hello(client, credential, segment), NOSIGNAL)
            welcome = self._first_message()
            self.sock.settimeout(None)
        except OSError as e:
            self.sock.close()
            raise LinkDown(f"instance {instance_id} at {path}: {e}") from None
        if isinstance(welcome, str):
            self.sock.close()
            raise LinkDown(f"instance {instance_id} refused this client: {welcome}")
        if not isinstance(welcome, channel.Welcome):
            self.sock.close()
            raise LinkDown(f"instance {instance_id} answered HELLO with {type(welcome).__name__}")
        super().__init__(instance_id, welcome.window)

    def _first_message(self) -> channel.Message:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            n = self.sock.recv_into(self.reader.buffer())
            if n == 0:
                raise OSError("closed during HELLO")
            self.reader.advance(n)
            msgs = self.reader.messages()
            if msgs:
                first, *rest = (channel.decode(m) for m in msgs)
                self._early = rest
                return first
        raise OSError("no WELCOME in time")

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send_batch(
        self, batch: int, start: int, length: int, offsets: bytes, snapshot_keys: list[Key], data: Any
    ) -> None:
        self._sendall(channel.batch(batch, start, length, offsets, snapshot_keys))

    def send_restore(self, message: bytes) -> None:
        self._sendall(message)

    def _sendall(self, msg: bytes) -> None:
        if self.down:
            return
        try:
            self.sock.sendall(msg, NOSIGNAL)
        except OSError:
            self.down = True  # read() reports it

    def read(self) -> list[channel.Message]:
        out, self._early = self._early, []
        if self.down and self.sock.fileno() < 0:
            raise LinkDown(f"instance {self.instance_id} is gone")
        while True:
            try:
                n = self.sock.recv_into(self.reader.buffer(), 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                n = 0
            if n == 0:
                out += [channel.decode(m) for m in self.reader.messages()]
                self.close()
                raise LinkDown(f"instance {self.instance_id} closed the connection", out)
            self.reader.advance(n)
        if self.down:
            self.close()
            raise LinkDown(f"instance {self.instance_id} is gone", out)
        out += [channel.decode(m) for m in self.reader.messages()]
        return out

    def close(self) -> None:
        self.down = True
        with contextlib.suppress(OSError):
            self.sock.close()


class RayLink(Link):
    transport = "object_store"

    def __init__(self, instance_id: str, handle: Any, client: str, credential: bytes, window: int = RAY_WINDOW) -> None:
        super().__init__(instance_id, window)
        self.handle = handle
        self.client = client
        self.credential = credential
        self.calls: deque[Any] = deque()  # answers in call order (Ray keeps a caller's order)
        self.reader = channel.Reader(64 << 10)

    def _send_batch(
        self, batch: int, start: int, length: int, offsets: bytes, snapshot_keys: list[Key], data: Any
    ) -> None:
        self.calls.append(
            self.handle.rx_batch.remote(self.client, self.credential, data, offsets, batch, snapshot_keys)
        )

    def send_restore(self, message: bytes) -> None:
        self.calls.append(self.handle.rx_restore.remote(self.client, self.credential, message))

    def poll(self) -> None:
        if not self.calls:
            self.calls.append(self.handle.rx_poll.remote(self.client, self.credential))

    def refs(self) -> list[Any]:
        return list(self.calls)

    def read(self) -> list[channel.Message]:
        out: list[channel.Message] = []
        while self.calls:
            ready, _ = ray.wait([self.calls[0]], timeout=0)
            if not ready:
                break
            ref = self.calls.popleft()
            try:
                data = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                if isinstance(e, RayTaskError) and not isinstance(e.cause, RayActorError):
                    raise
                self.close()
                raise LinkDown(f"instance {self.instance_id} is gone: {type(e).__name__}", out) from None
            self.reader.feed(data)
            out += [channel.decode(m) for m in self.reader.messages()]
        return out

"""One sans-I/O BGP session on a real TCP socket, for tests against real daemons that check the
stack's own behaviour (graceful restart, BFD, policy) without the cluster in between.

The driver listens on an address of 127.0.0.0/8 for the session's peer (a passive session),
feeds the session what arrives and the time, writes what it sends, and records every event it
returns with the time it returned it. One thread owns the session; tests read it through
`call`, under the same lock.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from apsv.bgp.config import BgpSessionConfig
from apsv.bgp.fsm import State
from apsv.bgp.session import BgpSession
from apsv.stacks.interface import CloseTransport, Send, StackEvent

T = TypeVar("T")


class SessionDriver:
    def __init__(
        self, config: BgpSessionConfig, listen: tuple[str, int], listener: socket.socket | None = None
    ) -> None:
        """`listener`: a listening socket made elsewhere (the agent's, with MD5 or GTSM set)."""
        self.session = BgpSession(config)
        self.events: list[tuple[float, StackEvent]] = []
        self.lock = threading.Lock()
        self._listener = listener if listener is not None else socket.create_server(listen, reuse_port=False)
        self._listener.setblocking(False)
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bgp-session-driver", daemon=True)

    def __enter__(self) -> SessionDriver:
        with self.lock:
            self._apply(self.session.start(time.monotonic()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._listener.close()

    def call(self, fn: Callable[[BgpSession], T]) -> T:
        with self.lock:
            return fn(self.session)

    def seen(self, kind: type[StackEvent], since: float = 0.0) -> list[tuple[float, Any]]:
        with self.lock:
            return [(t, e) for t, e in self.events if isinstance(e, kind) and t >= since]

    def _apply(self, events: list[StackEvent]) -> None:
        now = time.monotonic()
        for e in events:
            self.events.append((now, e))
            if isinstance(e, Send) and self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.sendall(e.data)
            elif isinstance(e, CloseTransport):
                self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(KeyError):
                self._sel.unregister(self._conn)
            self._conn.close()
            self._conn = None

    def _loop(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                with self.lock:
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._read()
            with self.lock:
                now = time.monotonic()
                due = self.session.next_deadline()
                if due is not None and due <= now:
                    self._apply(self.session.on_timer(now))

    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        if self._conn is not None:
            # the peer is back on a new connection while the old one looks alive: it restarted
            self._drop()
            self._apply(self.session.connection_lost(time.monotonic(), "the peer connected again"))
        if self.session.state is State.IDLE:
            conn.close()  # not listening yet (idle hold): the peer retries
            return
        conn.setblocking(False)
        self._conn = conn
        self._sel.register(conn, selectors.EVENT_READ)
        self._apply(self.session.connection_made(time.monotonic()))

    def _read(self) -> None:
        assert self._conn is not None
        try:
            data = self._conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop()
            self._apply(self.session.connection_lost(time.monotonic(), "the peer closed the connection"))
            return
        self._apply(self.session.data_received(data, time.monotonic()))

"""A TCP relay between a routing daemon and APSV that can damage the daemon's next message.

It stands where a faulty link or middlebox would: the daemon connects to the relay, the relay
connects to APSV from the daemon's own address (so APSV sees the peer it expects). It follows
the BGP message framing in both directions, so the test can (a) corrupt the marker of the next
message the daemon sends - a protocol error APSV must answer with NOTIFICATION 1/1, Connection
Not Synchronized - and (b) see the NOTIFICATIONs APSV sends, on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field


@dataclass
class Relay:
    listen: tuple[str, int]
    target: tuple[str, int]
    source: str  # connect to the target from this address
    corrupt_pending: bool = False
    notifications_to_daemon: list[tuple[int, int]] = field(default_factory=list)
    connections: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None

    def start(self) -> Relay:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

            async def serve() -> None:
                self._server = await asyncio.start_server(self._accept, *self.listen, reuse_address=True)
                ready.set()
                async with self._server:
                    await self._server.serve_forever()

            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(serve())

        self._thread = threading.Thread(target=run, daemon=True, name=f"relay-{self.listen}")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            for t in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(t.cancel)

    def corrupt_next(self) -> None:
        self.corrupt_pending = True

    async def _accept(self, dr: asyncio.StreamReader, dw: asyncio.StreamWriter) -> None:
        try:
            ar, aw = await asyncio.open_connection(*self.target, local_addr=(self.source, 0))
        except OSError:
            dw.close()
            return
        self.connections += 1
        await asyncio.gather(self._pump(dr, aw, from_daemon=True), self._pump(ar, dw, from_daemon=False))

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, from_daemon: bool) -> None:
        try:
            while True:
                head = await r.readexactly(19)
                length = int.from_bytes(head[16:18], "big")
                body = await r.readexactly(max(0, length - 19))
                if from_daemon and self.corrupt_pending:
                    self.corrupt_pending = False
                    head = b"\x00" + head[1:]  # the marker must be all ones (RFC 4271 §4.1)
                if not from_daemon and head[18] == 3 and len(body) >= 2:
                    self.notifications_to_daemon.append((body[0], body[1]))
                w.write(head + body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            w.close()

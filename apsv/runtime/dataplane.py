"""An instance's data-plane server: its clients' connections, served in a thread of its own.

Each client on this node connects once to the instance's Unix socket, proves its name with its
credential (HELLO), names its shared-memory buffer pool, and from then on sends BATCH
descriptors: where in that pool a batch's frames for this instance are. The thread maps the pool,
hands the frames - in place, uncopied - to the instance's handler, and writes back the REPLY
(output, refusals, snapshots). The kernel wakes the thread when a descriptor arrives: nothing
polls, no Ray task runs per batch, and the multiplexer is nowhere on the way.

The socket lives in a directory only this user can enter (0700). Connections are bounded in
number, and so is what waits to be written to each: a client that stops reading its replies is
disconnected (counted) rather than allowed to stall the thread or grow memory. Output produced
outside a batch (a session opening, closing, moving in) is queued per client by `send_output`,
from any thread, and written when that client is connected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from apsv.errors import DecodeError
from apsv.runtime import channel
from apsv.runtime.credentials import verify
from apsv.runtime.host import Key
from apsv.runtime.shm import SegmentCache

log = logging.getLogger("apsv.dataplane")

MAX_CONNECTIONS = 1024
NOSIGNAL = socket.MSG_NOSIGNAL  # a client gone is EPIPE here, never SIGPIPE (whatever its action)
MAX_QUEUED_BYTES = 64 << 20  # written to one connection and not yet read by its client
MAX_WAITING_BYTES = 64 << 20  # output for clients not connected now, per instance


class Handler(Protocol):
    def dp_batch(self, owner: str, data: memoryview, offsets: list[int], snapshot_keys: list[Key]) -> channel.Reply: ...

    def dp_restore(self, owner: str, msg: channel.Restore) -> str: ...


@dataclass
class DataPlaneCounters:
    connections: int = 0
    refused_connections: int = 0  # over MAX_CONNECTIONS, or a bad HELLO
    dropped_connections: int = 0  # a client that stopped reading, or spoke out of turn
    batches: int = 0
    bad_messages: int = 0
    waiting_dropped: int = 0  # output for an absent client over MAX_WAITING_BYTES
    snapshots_dropped: int = 0  # one session's snapshot too large for the channel (frames kept instead)


@dataclass
class _Conn:
    sock: socket.socket
    reader: channel.Reader = field(default_factory=lambda: channel.Reader(64 << 10))
    client: str = ""
    segment: str = ""
    inbox: deque[channel.Message] = field(default_factory=deque)  # read, not yet handled
    out: deque[bytes] = field(default_factory=deque)
    out_bytes: int = 0
    writing: bool = False


class DataPlaneServer:
    def __init__(self, instance_id: str, directory: Path, key: bytes, handler: Handler, window: int) -> None:
        self.instance_id = instance_id
        self.key = key
        self.handler = handler
        self.window = window
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.path = directory / f"{instance_id}.sock"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[socket.socket, _Conn] = {}
        self._by_client: dict[str, _Conn] = {}
        self._lock = threading.Lock()  # the queues below, filled from other threads
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._waiting: dict[str, list[bytes]] = {}  # output for clients not connected (yet)
        self._waiting_bytes = 0
        self.segments = SegmentCache()
        self.c = DataPlaneCounters()
        self.queued_frames = 0  # frames of batches read and not yet applied: this instance's queue
        self.on_error: Callable[[str], None] | None = None  # the thread failed: the instance cannot serve
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"apsv-dataplane-{instance_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._close(conn)
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # shared with other instances of this node: only once empty
        self._sel.close()

    # -- from other threads --------------------------------------------------------------------

    def send_output(self, client: str, message: bytes) -> None:
        """Queue an encoded message (OUTPUT) for a client: written now if it is connected,
        else when it connects (bounded)."""
        with self._lock:
            self._outbox.append((client, message))
        self._wake()

    def take_waiting(self, client: str) -> list[bytes]:
        """Messages held for a client that is not connected (one that uses the Ray transport
        collects them with its calls)."""
        self._drain_outbox_locked_for(client)
        with self._lock:
            msgs = self._waiting.pop(client, [])
            self._waiting_bytes -= sum(len(m) for m in msgs)
        return msgs

    def _drain_outbox_locked_for(self, client: str) -> None:
        """Move this client's messages still in the outbox to its waiting list (the server
        thread may not have run since they were queued)."""
        with self._lock:
            if client in self._by_client:
                return
            keep: deque[tuple[str, bytes]] = deque()
            for who, msg in self._outbox:
                if who == client:
                    self._waiting.setdefault(client, []).append(msg)
                    self._waiting_bytes += len(msg)
                else:
                    keep.append((who, msg))
            self._outbox = keep

    def connected(self) -> list[str]:
        with self._lock:
            return list(self._by_client)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0", NOSIGNAL)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug or a dead backend: the instance must not look alive
            log.exception("data plane of %s failed", self.instance_id)
            if self.on_error is not None and not self._stop.is_set():
                self.on_error(f"data plane failed: {type(e).__name__}: {e}")
            raise

    def _serve(self) -> None:
        """Read whatever every connection has sent, then handle the messages one connection at a
        time, round robin (no client's backlog starves another's), looking for new events
        between rounds."""
        busy: list[_Conn] = []
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0 if busy else 1.0)
            except OSError:
                if self._stop.is_set():
                    return
                raise
            for sk, mask in events:
                if sk.data is None:
                    self._accept()
                elif sk.data == "wake":
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    self._drain_outbox()
                else:
                    conn: _Conn = sk.data
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if mask & selectors.EVENT_READ and conn.sock in self._conns:
                        self._read(conn)
            busy = [c for c in self._conns.values() if c.inbox]
            for conn in busy:
                if conn.sock in self._conns and conn.inbox:
                    msg = conn.inbox.popleft()
                    self._handle(conn, msg)
                    if isinstance(msg, channel.Batch):  # applied now (counted until then)
                        self.queued_frames -= len(msg.offsets) // 4
            busy = [c for c in self._conns.values() if c.inbox]

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        if len(self._conns) >= MAX_CONNECTIONS:
            self.c.refused_connections += 1
            with contextlib.suppress(OSError):
                sock.sendall(channel.error("too many connections"), NOSIGNAL)
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)
        self.c.connections += 1

    def _read(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(conn.reader.buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close(conn)
            return
        conn.reader.advance(n)
        try:
            for body in conn.reader.messages():
                msg = channel.decode(body)
                if isinstance(msg, channel.Batch):
                    self.queued_frames += len(msg.offsets) // 4
                conn.inbox.append(msg)
        except DecodeError as e:
            self.c.bad_messages += 1
            self._refuse(conn, f"bad message: {e}")

    def _handle(self, conn: _Conn, msg: channel.Message) -> None:
        if not conn.client:
            if not isinstance(msg, channel.Hello):
                self._refuse(conn, "HELLO first")
                return
            self._hello(conn, msg)
            return
        if isinstance(msg, channel.Batch):
            self.c.batches += 1
            try:
                view = self.segments.view(conn.segment, msg.start, msg.length) if conn.segment else None
            except (ValueError, OSError) as e:
                self._refuse(conn, f"cannot read the batch: {e}")
                return
            if view is None:
                self._refuse(conn, "a BATCH needs a shared-memory segment (named in HELLO)")
                return
            try:
                reply = self.handler.dp_batch(conn.client, view, channel.offsets_list(msg.offsets), msg.snapshot_keys)
            finally:
                del view
            reply.batch = msg.batch
            msgs, dropped = channel.reply_messages(reply)
            self.c.snapshots_dropped += dropped
            for m in msgs:
                self._write(conn, m)
        elif isinstance(msg, channel.Restore):
            err = self.handler.dp_restore(conn.client, msg)
            self._write(conn, channel.restored(msg.request, msg.key, err))
        else:
            self._refuse(conn, f"unexpected {type(msg).__name__}")

    def _hello(self, conn: _Conn, msg: channel.Hello) -> None:
        if msg.version != channel.VERSION:
            self._refuse(conn, f"channel version {msg.version} unsupported (this instance speaks {channel.VERSION})")
            return
        if not verify(self.key, msg.client, msg.credential):
            self.c.refused_connections += 1
            self._refuse(conn, "credential refused")
            return
        if msg.segment:
            try:
                with self.segments.view(msg.segment, 0, 0):
                    pass
            except (ValueError, OSError) as e:
                self._refuse(conn, f"cannot map the buffer pool: {e}")
                return
        conn.client, conn.segment = msg.client, msg.segment
        old = self._by_client.get(msg.client)
        if old is not None and old is not conn:
            self._close(old)  # a client reconnecting: the newer connection is the one
        with self._lock:
            self._by_client[msg.client] = conn
            waiting = self._waiting.pop(msg.client, [])
            self._waiting_bytes -= sum(len(m) for m in waiting)
        self._write(conn, channel.welcome(self.instance_id, self.window))
        for m in waiting:
            self._write(conn, m)

    def _drain_outbox(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                client, msg = self._outbox.popleft()
                conn = self._by_client.get(client)
                if conn is None:
                    if self._waiting_bytes + len(msg) > MAX_WAITING_BYTES:
                        self.c.waiting_dropped += 1
                        continue
                    self._waiting.setdefault(client, []).append(msg)
                    self._waiting_bytes += len(msg)
                    continue
            self._write(conn, msg)

    def _write(self, conn: _Conn, msg: bytes) -> None:
        if conn.out:
            conn.out.append(msg)
            conn.out_bytes += len(msg)
        else:
            try:
                sent = conn.sock.send(msg, NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent < len(msg):
                rest = msg[sent:]
                conn.out.append(rest)
                conn.out_bytes += len(rest)
        if conn.out_bytes > MAX_QUEUED_BYTES:
            self.c.dropped_connections += 1
            log.warning("client %s stopped reading its replies: disconnected", conn.client)
            self._close(conn)
            return
        if conn.out and not conn.writing:
            conn.writing = True
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            msg = conn.out[0]
            try:
                sent = conn.sock.send(msg, NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            conn.out_bytes -= sent
            if sent < len(msg):
                conn.out[0] = msg[sent:]
                return
            conn.out.popleft()
        if conn.writing:
            conn.writing = False
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _refuse(self, conn: _Conn, reason: str) -> None:
        self.c.dropped_connections += 1
        with contextlib.suppress(OSError):
            conn.sock.setblocking(True)
            conn.sock.settimeout(0.1)
            conn.sock.sendall(channel.error(reason), NOSIGNAL)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        self.queued_frames -= sum(len(m.offsets) // 4 for m in conn.inbox if isinstance(m, channel.Batch))
        conn.inbox.clear()
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        with self._lock:
            if conn.client and self._by_client.get(conn.client) is conn:
                del self._by_client[conn.client]
        with contextlib.suppress(OSError):
            conn.sock.close()


def socket_directory() -> Path:
    """Where this node's instances put their sockets: inside Ray's session directory (removed
    with it), or a private temp directory if that path would be too long for a Unix socket."""
    try:
        import ray._private.worker as w

        node: Any = w.global_worker.node
        session = Path(node.get_session_dir_path())
        d = session / "apsv"
        if len(str(d)) < 80:
            return d
    except Exception:  # not in a Ray worker, or Ray's private layout changed
        pass
    import tempfile

    return Path(tempfile.mkdtemp(prefix="apsv-dp-", dir="/tmp"))

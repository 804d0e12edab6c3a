"""Pre-allocated message buffers with backpressure.

The sending side (the agent, or the replay driver) writes frames straight into a buffer taken
from the pool - for a socket, `recv_into` the buffer's free space - and hands the filled buffer
to the cluster. Two transports, one pool:

* **shared memory** (to stack instances on the sender's node): the pool's arena is a POSIX
  shared-memory segment. The instances map it and read the frames where the sender wrote them:
  no copy at all between the sender's buffer and the stack decoder, and no object-store round
  trip per batch (which costs more than the frames).
* **object store** (to instances on other nodes): the part of a buffer bound there goes into the
  Ray object store with one copy, and is read in place (read-only, zero-copy) from there on.

A buffer returns to the pool when the cluster has applied its frames, so the pool bounds the
payload bytes a sender can have in flight.

When the pool is empty, `acquire` waits (up to a timeout): the sender is slowed, never allowed to
grow memory, and every wait and every timeout is counted.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from apsv.frame import HEADER, HEADER_LEN, MAGIC, VERSION

_EPOCH = struct.Struct("!I")  # the frame header's epoch field, at offset 52


class PoolExhausted(TimeoutError):
    """No buffer became free within the timeout (the cluster is not keeping up)."""


@dataclass
class PoolStats:
    acquired: int = 0
    released: int = 0
    waits: int = 0
    wait_seconds: float = 0.0
    exhausted: int = 0
    max_in_use: int = 0


class Buffer:
    """One slot of the pool: frames are appended until it is full."""

    __slots__ = ("array", "cap", "frames", "index", "mv", "offsets", "used")

    def __init__(self, index: int, array: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        self.index = index
        self.array = array
        self.mv = array.data  # written through directly by a client's hot path
        self.cap = int(array.shape[0])
        self.used = 0
        self.frames = 0
        self.offsets: list[int] = []  # where each frame starts (`append` keeps it; a client routes its own)

    @property
    def capacity(self) -> int:
        return self.cap

    def room(self) -> int:
        return self.cap - self.used

    def append(
        self,
        kind: int,
        protocol: int,
        tenant: int,
        vrouter: int,
        session: int,
        seq: int,
        rx_ns: int,
        payload: bytes | memoryview,
        epoch: int = 0,
    ) -> bool:
        """Write one frame; False if it does not fit (the caller sends this buffer and takes another)."""
        n = len(payload)
        end = self.used + HEADER_LEN + n
        if end > self.cap:
            return False
        mv = self.mv
        HEADER.pack_into(
            mv,
            self.used,
            MAGIC,
            VERSION,
            kind,
            protocol,
            0,
            tenant,
            vrouter,
            session,
            seq,
            rx_ns,
            time.time_ns(),
            n,
            epoch,
        )
        mv[self.used + HEADER_LEN : end] = payload  # the sender producing its message into the pool
        self.offsets.append(self.used)
        self.used = end
        self.frames += 1
        return True

    def append_frame(self, frame: bytes | memoryview, epoch: int) -> bool:
        """Copy a whole frame in (a re-send from custody), addressed to `epoch`; False if it
        does not fit."""
        end = self.used + len(frame)
        if end > self.cap:
            return False
        mv = self.mv
        mv[self.used : end] = frame
        _EPOCH.pack_into(mv, self.used + 52, epoch)
        self.offsets.append(self.used)
        self.used = end
        self.frames += 1
        return True

    def filled(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        return self.array[: self.used]

    def reset(self) -> None:
        self.used = 0
        self.frames = 0
        self.offsets = []


SHM_PREFIX = "apsv-pool-"  # the only segments the cluster side agrees to map
CREATED_HERE: set[str] = set()  # segments this process created (and its resource tracker owns)


class BufferPool:
    """`slots` buffers of `slot_bytes` each, allocated once - in shared memory if `shared`."""

    def __init__(self, slots: int = 16, slot_bytes: int = 256 << 10, *, shared: bool = False) -> None:
        if slots < 1 or slot_bytes < HEADER_LEN + 64:
            raise ValueError("a buffer pool needs at least one slot of at least 120 octets")
        if slots * slot_bytes > 1 << 32:
            raise ValueError("a buffer pool is limited to 4 GiB (frame offsets are 32-bit)")
        self.slot_bytes = slot_bytes
        self.shm: shared_memory.SharedMemory | None = None
        if shared:
            self.shm = shared_memory.SharedMemory(
                name=f"{SHM_PREFIX}{uuid.uuid4().hex[:16]}", create=True, size=slots * slot_bytes
            )
            CREATED_HERE.add(self.shm.name)
            self._arena = np.ndarray((slots * slot_bytes,), dtype=np.uint8, buffer=self.shm.buf)
        else:
            self._arena = np.zeros(slots * slot_bytes, dtype=np.uint8)
        self._buffers = [Buffer(i, self._arena[i * slot_bytes : (i + 1) * slot_bytes]) for i in range(slots)]
        self._free: deque[int] = deque(range(slots))
        self._cv = threading.Condition()
        self.stats = PoolStats()

    @property
    def slots(self) -> int:
        return len(self._buffers)

    @property
    def shm_name(self) -> str | None:
        return None if self.shm is None else self.shm.name

    def close(self) -> None:
        """Free the shared segment (those who mapped it keep their mapping until they drop it)."""
        if self.shm is not None:
            shm, self.shm = self.shm, None
            self._buffers = []
            self._free.clear()
            self._arena = np.zeros(0, dtype=np.uint8)
            # A view of it may still be alive in this process: then the OS frees it later.
            with contextlib.suppress(BufferError):
                shm.close()
            shm.unlink()
            CREATED_HERE.discard(shm.name)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def in_use(self) -> int:
        return len(self._buffers) - len(self._free)

    def acquire(self, timeout: float = 30.0) -> Buffer:
        with self._cv:
            if not self._free:
                self.stats.waits += 1
                t0 = time.perf_counter()
                ok = self._cv.wait_for(lambda: bool(self._free), timeout)
                self.stats.wait_seconds += time.perf_counter() - t0
                if not ok:
                    self.stats.exhausted += 1
                    raise PoolExhausted(f"no free buffer in {timeout}s ({len(self._buffers)} in flight)")
            buf = self._buffers[self._free.popleft()]
            self.stats.acquired += 1
            self.stats.max_in_use = max(self.stats.max_in_use, self.in_use())
        buf.reset()
        return buf

    def release(self, buf: Buffer) -> None:
        with self._cv:
            self._free.append(buf.index)
            self.stats.released += 1
            self._cv.notify()

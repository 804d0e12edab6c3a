"""Mapping senders' shared-memory buffer pools on the cluster side.

A stack instance maps each client's pool segment by name (named in the client's HELLO) and
reads frames where the client wrote them. Only segments named by the pool's prefix are mapped,
a bounded number at a time (least recently used are dropped, mapped again on their next use),
and Python's resource tracker is told not to unlink them: they belong to the sender.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from multiprocessing import resource_tracker, shared_memory

from apsv.runtime.buffer_pool import CREATED_HERE, SHM_PREFIX


class SegmentCache:
    def __init__(self, max_segments: int = 64) -> None:
        self.max_segments = max_segments
        self._maps: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()
        self.attached = 0
        self.evicted = 0

    def view(self, name: str, start: int, length: int) -> memoryview:
        """The octets [start, start + length) of segment `name`, in place."""
        shm = self._maps.get(name)
        if shm is None:
            shm = self._attach(name)
        else:
            self._maps.move_to_end(name)
        if start < 0 or length < 0 or start + length > shm.size:
            raise ValueError(f"range {start}+{length} is outside segment {name} ({shm.size} octets)")
        buf = shm.buf
        assert buf is not None  # None only once closed, and closed ones leave the cache
        return buf[start : start + length]

    def _attach(self, name: str) -> shared_memory.SharedMemory:
        if not name.startswith(SHM_PREFIX) or "/" in name:
            raise ValueError(f"refusing to map {name!r}: not an APSV buffer pool segment")
        shm = shared_memory.SharedMemory(name=name)
        # Before Python 3.13 mapping a segment registers it for unlinking when this process exits;
        # it is the sender's to unlink (unless the sender is this very process).
        if name not in CREATED_HERE:
            with contextlib.suppress(Exception):
                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        self._maps[name] = shm
        self.attached += 1
        while len(self._maps) > self.max_segments:
            _, old = self._maps.popitem(last=False)
            self._close(old)
            self.evicted += 1
        return shm

    def drop(self, name: str) -> None:
        shm = self._maps.pop(name, None)
        if shm is not None:
            self._close(shm)

    @staticmethod
    def _close(shm: shared_memory.SharedMemory) -> None:
        with contextlib.suppress(BufferError):  # a view is still referenced; the mapping goes when it does
            shm.close()

    def __len__(self) -> int:
        return len(self._maps)

"""Events waiting for the virtual router: bounded by count and by bytes, the oldest dropped first.

An event's size is the length of its JSON line. Counting events alone is not enough: one
`routes` event can carry every prefix a session withdrew (a peer with 10,000 routes resetting
gives an event of about a megabyte), so a buffer of 10,000 such events nobody reads would hold
gigabytes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EventBuffer:
    max_events: int = 10_000
    max_bytes: int = 16 << 20
    dropped: int = 0  # events dropped, oldest first, to stay within the bounds
    dropped_bytes: int = 0
    _items: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)
    _bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_bytes < 1:
            raise ValueError("an event buffer holds at least one event and one byte")

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def push(self, event: dict[str, Any], size: int) -> None:
        """Keep `event` (`size`: its JSON line's length); drop the oldest while over a bound.
        An event larger than `max_bytes` on its own is dropped at once."""
        if size > self.max_bytes:
            self.dropped += 1
            self.dropped_bytes += size
            return
        self._items.append((size, event))
        self._bytes += size
        while len(self._items) > self.max_events or self._bytes > self.max_bytes:
            old, _ = self._items.popleft()
            self._bytes -= old
            self.dropped += 1
            self.dropped_bytes += old

    def pop(self) -> dict[str, Any]:
        size, event = self._items.popleft()
        self._bytes -= size
        return event

    def drain(self) -> list[dict[str, Any]]:
        out = [e for _, e in self._items]
        self._items.clear()
        self._bytes = 0
        return out

"""The offered load, from the clients' own counters (pure).

Each client counts the frames offered to it per protocol - sent, or held back by backpressure -
and reports the cumulative counts; the multiplexer passes on the last report of each
(`Multiplexer.offered_by_client`). The rate is the sum of each client's own increase: a client
that has not reported since the multiplexer restarted, or has closed, adds nothing and takes
nothing away, so the load never seems to go back. A client's counter only grows while it lives.
"""

from __future__ import annotations

from collections.abc import Mapping

FORGET_AFTER_S = 1800.0  # a client unseen this long is forgotten (it closed, long ago)


class OfferedLoad:
    def __init__(self) -> None:
        self._last: dict[str, dict[str, int]] = {}  # per client: protocol -> count
        self._seen: dict[str, float] = {}
        self._at: float | None = None

    def rates(self, now: float, counts: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
        """Frames per second per protocol since the last call, from each client's cumulative
        `counts` now; {} on the first call (it only sets the baseline)."""
        grown: dict[str, int] = {}
        first = self._at is None
        for client, per in counts.items():
            last = self._last.get(client, {})
            if not first:  # (a client new since the last call: all it counts is new)
                for proto, n in per.items():
                    grown[proto] = grown.get(proto, 0) + max(0, int(n) - last.get(proto, 0))
            self._last[client] = {p: max(int(n), last.get(p, 0)) for p, n in per.items()}
            self._seen[client] = now
        for client in [c for c, t in self._seen.items() if now - t > FORGET_AFTER_S]:
            del self._seen[client], self._last[client]
        dt = 0.0 if self._at is None else now - self._at
        self._at = now
        if dt <= 0:
            return {}
        return {proto: n / dt for proto, n in grown.items()}

"""The chaos soak's replay load: real MRT churn, round after round on new sessions, each round
checked against an in-process replay of the same messages."""

from __future__ import annotations

import threading
import time
from typing import Any

from apsv.bench import shared_data

DUMPS = ["mrt/bgpdump-testdata/updates.20070211.0141.gz", "mrt/bgpkit-ripe-fixtures/updates.20100227.1600.gz"]
REPLAY_TENANT = 2


class ReplayLoad(threading.Thread):
    """MRT churn, round after round, each round's sessions checked against an in-process replay."""

    def __init__(self, im: Any, deployment: Any, sessions: int, round_s: float) -> None:
        super().__init__(daemon=True, name="apsv-chaos-replay")
        from apsv.runtime.buffer_pool import BufferPool
        from apsv.runtime.client import OffloadClient
        from apsv.runtime.recorded_sessions import load_streams, local_digests, plan_sessions

        self.dep = deployment
        self.im = im
        self.pool = BufferPool(slots=8, slot_bytes=64 << 10, shared=True)
        self.slots = self.pool.slots
        self.client = OffloadClient(im, self.pool, max_inflight=4, tenant=REPLAY_TENANT)
        streams = load_streams([shared_data() / d for d in DUMPS], min_messages=20)
        self.base = plan_sessions(streams, sessions=sessions, vrouters=max(1, sessions // 10), tenant=REPLAY_TENANT)
        self.reference = local_digests(self.base)  # per key of the base plan
        span = max(s.stream.times[-1] for s in self.base) - min(s.stream.times[0] for s in self.base)
        self.speed = max(1.0, span / round_s)
        self.rounds: list[dict[str, Any]] = []
        self.error: str | None = None
        self._halt = threading.Event()
        self._closed = False
        self._stall = 0.0
        self._stalled = threading.Event()
        self._in_use = 0

    def stall(self, seconds: float) -> int:
        """Have the replay stop taking answers for `seconds` (from its next progress point);
        returns the pool's buffers in flight when it stopped."""
        self._stalled.clear()
        self._stall = seconds
        self._stalled.wait(seconds + 30)
        return self._in_use

    def _progress(self, _sent: int, _total: int) -> None:
        if self._stall:
            self._in_use = self.pool.in_use()
            time.sleep(self._stall)  # nothing read meanwhile: the answers wait at the instances
            self._stall = 0.0
            self._stalled.set()

    def _round(self, r: int) -> dict[str, Any]:
        import ray

        from apsv.runtime.recorded_sessions import ReplaySession, replay

        sessions = [ReplaySession((*s.key[:3], s.key[3] + 1000 * r), s.stream) for s in self.base]
        placed = self.client.open_sessions([(s.key, "bgp", s.config(), 0) for s in sessions], timeout=120)
        refused = [v for v in placed.values() if v.startswith("error")]
        if refused:
            raise RuntimeError(f"round {r}: {len(refused)} sessions refused: {refused[0]}")
        t0 = time.monotonic()
        replay(self.client, sessions, speed=self.speed, on_progress=self._progress, progress_every=100)
        infos: dict[Any, Any] = {}
        for _ in range(30):  # the control plane may be down this moment: ask again
            try:
                got = ray.get(self.im.session_infos.remote([s.key for s in sessions]), timeout=120)
                infos = {tuple(k): v for k, v in got.items()}
                if len(infos) == len(sessions):
                    break
            except Exception:
                pass
            time.sleep(2.0)
        lost = duplicated = mismatched = missing = 0
        for s, base in zip(sessions, self.base, strict=True):
            info = infos.get(s.key)
            n = len(s.stream.messages)
            if info is None:
                missing += 1
                lost += n
                continue
            lost += max(0, n - int(info["frames"])) + int(info["gaps"])
            duplicated += max(0, int(info["frames"]) - n)
            mismatched += info.get("rib_digest") != self.reference[base.key]
        self.client.close_sessions([s.key for s in sessions], timeout=120)
        return {
            "round": r,
            "sessions": len(sessions),
            "frames": sum(len(s.stream.messages) for s in sessions),
            "seconds": round(time.monotonic() - t0, 1),
            "lost": lost,
            "duplicated": duplicated,
            "rib_mismatches": mismatched,
            "sessions_missing": missing,
        }

    def run(self) -> None:
        r = 0
        try:
            while not self._halt.is_set():
                self.rounds.append(self._round(r))
                r += 1
        except Exception as e:  # the soak reports it: a load that died is a failure, not a crash
            self.error = repr(e)

    def finish(self, timeout: float) -> None:
        """Let the round under way end (it is checked like the others), then stop (again: a no-op)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout)
        if not self._closed:
            self._closed = True
            self.client.close()

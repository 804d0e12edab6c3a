"""The clock a protocol's scaling runs on: the wall's, or a replayed trace's.

The VPSM is given one per protocol (`VPSM.set_clock`); by default it is `IDENTITY`, the wall.
A trace replayed through the live system (`apsv.evaluation.live`) gives its own, so the policy
sees the trace's own time and rates exactly as the simulator gives them and one policy
configuration means the same in both. Pure: conversions of times and rates, no clock read.
"""

from __future__ import annotations

from dataclasses import dataclass

from apsv.scaling.simulator import Forecasts


@dataclass
class ReplayClock:
    """A load trace's clock: wall time runs `speed` times slower than trace time and the live
    system carries `rate_scale` messages per trace message."""

    origin: float  # wall time (time.time()) of the trace's step 0
    speed: float = 1.0  # trace seconds per wall second
    rate_scale: float = 1.0  # live messages per trace message
    forecasts: Forecasts | None = None  # indexed by trace step, as the simulator's
    future: tuple[float, ...] = ()  # the trace's rates: the oracle's foresight
    # the trace's tables to re-send per step (its reset storms), as the simulator is told them;
    # added to what the instances' BGP sessions report
    tables: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.speed <= 0 or self.rate_scale <= 0:
            raise ValueError("speed and rate_scale must be positive")

    def trace_time(self, wall: float) -> float:
        return (wall - self.origin) * self.speed

    def rate(self, wall_rate: float) -> float:
        """Live messages per wall second -> trace messages per trace second."""
        return wall_rate / (self.rate_scale * self.speed)


IDENTITY = ReplayClock(origin=0.0)

"""What a simulator run reports: SLO-violation seconds, instance-seconds, scale actions, lost and
late messages, session moves, and the timeline for plots (`SimResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apsv.scaling.latency_mixture import Components, mixture_quantile
from apsv.scaling.sim_config import FloatArray


@dataclass
class SimResult:
    policy: str
    slo_violation_s: float
    instance_s: float
    scale_actions: int
    lost: float
    late: float
    messages: float
    p99_ms: float  # over the whole run (message-weighted)
    session_moves: int
    timeline: dict[str, FloatArray] = field(repr=False)
    # scale-outs within a start latency (plus one decision) of a scale-in: churn that undid itself
    reversals: int = 0
    forecast_trust: float | None = None  # mean over decisions, where the policy reports one

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slo_violation_s": round(self.slo_violation_s, 3),
            "instance_s": round(self.instance_s, 1),
            "scale_actions": self.scale_actions,
            "lost": round(self.lost, 1),
            "late": round(self.late, 1),
            "messages": round(self.messages, 1),
            "p99_ms": round(self.p99_ms, 3),
            "session_moves": self.session_moves,
            "mean_instances": round(float(self.timeline["instances"].mean()), 3),
            "reversals": self.reversals,
        }
        if self.forecast_trust is not None:
            out["forecast_trust"] = round(self.forecast_trust, 3)
        return out


def whole_run_p99(kept: Sequence[Components]) -> float:
    """The p99 latency over a whole run, message-weighted, from the steps' latency components
    kept along it (a point mass at 0 when none were kept)."""
    parts = list(zip(*kept, strict=True)) if kept else None
    if parts:
        all_lo, all_hi, all_w, all_rho, all_m = (np.concatenate(p) for p in parts)
    else:
        all_lo, all_hi, all_w, all_rho, all_m = np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1)
    return mixture_quantile(all_lo, all_hi, all_w, 0.99, all_rho, all_m)

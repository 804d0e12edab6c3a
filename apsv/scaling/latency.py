"""Latency histograms with fixed log-spaced bins: mergeable across instances, steps and runs,
for a p99 over a whole run and for CDF plots, without keeping every sample."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

# 0.1 ms .. 100 s, 20 bins a decade (each bin ~12 % wide)
LATENCY_BINS_MS: npt.NDArray[np.float64] = np.logspace(-1, 5, 121)
IntArray = npt.NDArray[np.int64]


def histogram(latencies_ms: npt.ArrayLike) -> IntArray:
    """Counts per bin; values beyond the ends land in the first or last bin."""
    x = np.clip(np.asarray(latencies_ms, dtype=np.float64), LATENCY_BINS_MS[0], LATENCY_BINS_MS[-1])
    return np.histogram(x, LATENCY_BINS_MS)[0].astype(np.int64)


def merge(rows: Iterable[Mapping[str, Any]], key: str = "hist") -> IntArray:
    """The sum of the histograms in `rows[key]` (rows without one - no messages - skipped):
    the VPSM's per-step records merged over a run."""
    total = np.zeros(LATENCY_BINS_MS.size - 1, dtype=np.int64)
    for r in rows:
        h = r.get(key)
        if h is not None:
            total += np.asarray(h, dtype=np.int64)
    return total


def quantile(counts: IntArray, q: float) -> float:
    """The q-quantile of a histogram (geometric interpolation within the bin); 0 when empty."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    cum = np.cumsum(counts)
    i = min(int(np.searchsorted(cum, q * total)), counts.size - 1)
    lo, hi = float(LATENCY_BINS_MS[i]), float(LATENCY_BINS_MS[i + 1])
    before = int(cum[i - 1]) if i else 0
    frac = (q * total - before) / max(int(counts[i]), 1)
    return float(lo * (hi / lo) ** min(max(frac, 0.0), 1.0))

"""The simulator's latency model for one step's messages: a weighted mixture of components, each
a uniform wait (the fluid wait behind a queue) plus, with probability rho, an exponential wait of
mean m (the queueing of random arrivals at a busy server: M/D/1's waits, as an exponential tail);
its CDF and its quantiles."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
# a mixture's components: (lo, hi, weight, rho, mean exponential wait), one entry per component
Components = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]


def mixture_cdf(x: float, lo: FloatArray, hi: FloatArray, wt: FloatArray, rho: FloatArray, m: FloatArray) -> FloatArray:
    """Per component, P(latency <= x), weighted: latency = U[lo, hi] (the fluid wait behind the
    queue) plus, with probability rho, an exponential wait of mean m (the queueing of random
    arrivals at a busy server: M/D/1's waits, as an exponential tail). Point masses when lo == hi."""
    width = hi - lo
    top = np.minimum(x, hi)
    u = np.where(width > 1e-12, np.clip((x - lo) / np.maximum(width, 1e-12), 0.0, 1.0), (x >= lo).astype(np.float64))
    safe_m = np.maximum(m, 1e-12)
    # P(U + E <= x) for U uniform on [lo, hi], E ~ Exp(mean m)
    tail_lo = np.exp(-np.maximum(x - lo, 0.0) / safe_m)
    conv_range = np.where(
        width > 1e-12,
        ((top - lo) - safe_m * (np.exp(-(x - top) / safe_m) - tail_lo)) / np.maximum(width, 1e-12),
        1.0 - tail_lo,
    )
    conv = np.where(x > lo, np.clip(conv_range, 0.0, 1.0), 0.0)
    conv = np.where(m > 1e-12, conv, u)
    return np.asarray(wt * ((1.0 - rho) * u + rho * conv), dtype=np.float64)


def mixture_quantile(
    lo: FloatArray,
    hi: FloatArray,
    wt: FloatArray,
    q: float,
    rho: FloatArray | None = None,
    m: FloatArray | None = None,
) -> float:
    """The q-quantile of the latency mixture (see `mixture_cdf`), by bisection on its CDF."""
    total = float(wt.sum())
    if total <= 0:
        return float(lo.min()) if lo.size else 0.0
    rho = np.zeros_like(lo) if rho is None else rho
    m = np.zeros_like(lo) if m is None else m
    a = float(lo.min())
    b = float((hi + 12.0 * m).max())
    if b - a < 1e-12:
        return a
    # `mixture_cdf` with what does not depend on x computed once (this runs every step over
    # every instance: it is most of a large simulation's time)
    width = hi - lo
    has_w = width > 1e-12
    inv_w = 1.0 / np.maximum(width, 1e-12)
    safe_m = np.maximum(m, 1e-12)
    inv_m = 1.0 / safe_m
    queued = m > 1e-12
    w_plain = wt * np.where(queued, 1.0 - rho, 1.0)
    w_conv = wt * np.where(queued, rho, 0.0)
    goal = q * total

    def below(x: float) -> float:
        d = x - lo
        u = np.clip(d * inv_w, 0.0, 1.0)
        u = np.where(has_w, u, d >= 0.0)
        dl = np.maximum(d, 0.0)
        tail_lo = np.exp(-dl * inv_m)
        span = np.minimum(dl, width)
        conv = np.where(has_w, (span - safe_m * (np.exp((span - dl) * inv_m) - tail_lo)) * inv_w, 1.0 - tail_lo)
        conv = np.clip(conv, 0.0, 1.0)
        return float(w_plain @ u + w_conv @ conv)

    # to a thousandth of a millisecond or 0.01 % of the value (its lower bracket), whichever is
    # coarser: finer is noise next to the model, and each halving costs a pass over every instance
    while b - a > max(1e-3, 1e-4 * a):
        x = 0.5 * (a + b)
        if below(x) < goal:
            a = x
        else:
            b = x
    return 0.5 * (a + b)

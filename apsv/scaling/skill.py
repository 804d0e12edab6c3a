"""How far a forecast has earned trust, measured on the steps already seen (pure).

The predictive policy provisions for the peak load over a window ahead (the lead time: an
instance asked for now serves only after it starts). Each decision records, for that window,
the load level each recommendation provisions for (instances x what one serves at the target
utilization): the forecast-driven one (`proactive`) and the reactive fallback's (in effect a
naive forecast: the load now, with the fallback's headroom). When the window has
passed, the peak load actually seen scores both with the quantile (pinball) loss at the
forecast's level tau (0.9 for p90) - a shortfall costs tau, an excess 1 - tau per unit:

    ratio    = sum QL_tau(proactive, peak) / sum QL_tau(fallback, peak)
    coverage = the fraction of windows whose peak stayed within what proactive provisioned

each sum decaying by half every `halflife` scored windows, so skill is that of the recent past.
`ratio` is a relative scaled error against the naive forecast reactive scaling makes: 1 means
provisioning on the forecast did no better than reacting, 0 perfect. Trust is

    trust = clip((1 - ratio) / (1 - full_at), 0, 1)                  skill
          x clip((coverage - cov_zero) / (nominal - cov_zero), 0, 1)  the band held
          x min(1, evidence / min_evidence)                          enough windows scored

so a forecast that provisions no better than reacting, or whose band is breached far more often
than its level says (covering fewer than `cov_zero` = half of the windows), is not trusted at
all, and one that halves the fallback's loss (`full_at` 0.5) with a band that holds is
trusted fully. Until `min_evidence` windows are scored, trust grows with the evidence from 0.
Beside it, for operators: the median forecast's error over that of persistence (`forecast_ratio`).

The loss weighs a shortfall tau : 1 - tau against an excess, so a forecast can win on it by
saving much capacity while running short a little more often than the fallback - more SLO
violations, which prediction must never cost. `guard` counts, per window, whether each
recommendation's capacity within the SLO fell short of the peak:

    guard = clip((fallback's short windows + 1) / (proactive's short windows + 1), 0, 1)

and trust takes provisioning below the fallback's only as far as trust x guard: a forecast that
runs short no more often than reacting may save everything it trusts, one that runs short twice
as often half of that. Above the fallback (the forecast sees more coming) trust alone applies.

Several fallback rules can be scored side by side (by default the HPA rule and Ray Serve's), each
on a path of its own (the policy runs them): the policy falls back on the one that ran short
in the fewest windows, then lost the least (`better_fallback`), and weighs the forecast against it.

The band is calibrated online as well: the policy provisions for median + margin x (upper -
median), and `margin` follows adaptive conformal inference (Gibbs & Candes, 2021): after each
scored window it is multiplied by exp(gain x (miss - (1 - tau))), so the band ends up missed in
1 - tau of the windows - narrower than the model's where the model is over-cautious, wider where
bursts beat it - within 0.25..4 times the model's width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_PENDING = 512  # windows awaiting their outcome (one per decision within a lead time)
MARGIN_MIN, MARGIN_MAX = 0.25, 4.0  # the band's calibrated width, relative to the model's


@dataclass(frozen=True)
class SkillConfig:
    halflife: float = 200.0  # scored windows
    min_evidence: float = 30.0  # scored windows before full trust is possible
    full_at: float = 0.5  # relative error at (and below) which skill is full
    nominal: float = 0.9  # the upper quantile's level
    cov_zero: float = 0.5  # coverage at (and below) which the band earns no trust


PROACTIVE = "proactive"  # the forecast-driven recommendation's name among the candidates


def observe(
    state: Mapping[str, Any] | None,
    *,
    now: float,
    load: float,
    window_s: float,
    median_peak: float | None,
    candidates: Mapping[str, tuple[float, float]] | None,
    band_peak: float | None = None,
    tau: float = 0.9,
    score_tau: float | None = None,
    halflife: float = SkillConfig.halflife,
    band_gain: float = 0.05,
) -> dict[str, Any]:
    """The skill state after one decision at `now`: `load` (the last interval's) counts toward the
    windows open before now; windows that end by now are scored; a new window opens for what is
    predicted and provisioned now. `candidates`: per recommendation (`PROACTIVE` and each
    fallback by name), the load level it provisions for at the target and the load it serves
    within the SLO; None: no forecast this step, nothing to score later. `band_peak`: the upper
    quantile's peak as the policy used it, whose misses steer `margin`."""
    st = dict(state or {})
    sums = {k: float(st.get(k, 0.0)) for k in _SUMS}
    loss = {k: float(v) for k, v in st.get("loss", {}).items()}
    short = {k: float(v) for k, v in st.get("short", {}).items()}
    margin = float(st.get("margin", 1.0))
    st_tau = tau if score_tau is None else score_tau
    decay = 0.5 ** (1.0 / max(halflife, 1e-9))
    keep: list[list[Any]] = []
    for issued, due, med, naive, band, seen, cands in (list(p) for p in st.get("pending", [])):
        peak = max(seen, load) if now > issued else seen
        if now < due - 1e-9:
            keep.append([issued, due, med, naive, band, peak, cands])
            continue
        if not math.isnan(band):  # (NaN: no band recorded)
            # adaptive conformal calibration of the band: widen on a miss, narrow on a hit, so
            # that it is missed in 1 - tau of the windows whatever the model's own calibration
            miss = 1.0 if peak > band else 0.0
            margin = min(MARGIN_MAX, max(MARGIN_MIN, margin * math.exp(band_gain * (miss - (1.0 - tau)))))
        for k in _SUMS:
            sums[k] *= decay
        for d in (loss, short):
            for k in d:
                d[k] *= decay
        for name, (level, cap) in cands.items():
            loss[name] = loss.get(name, 0.0) + _quantile_loss(level, peak, st_tau)
            short[name] = short.get(name, 0.0) + (1.0 if peak > cap else 0.0)
        sums["err_fc"] += abs(med - peak)
        sums["err_naive"] += abs(naive - peak)
        sums["covered"] += 1.0 if peak <= cands[PROACTIVE][0] else 0.0
        sums["evidence"] += 1.0
    if median_peak is not None and candidates is not None:
        band = float("nan") if band_peak is None else float(band_peak)
        cands = {k: [float(level), float(cap)] for k, (level, cap) in candidates.items()}
        keep.append([now, now + window_s, float(median_peak), float(load), band, float("-inf"), cands])
    return {"pending": keep[-MAX_PENDING:], "margin": margin, "loss": loss, "short": short, **sums}


_SUMS = ("err_fc", "err_naive", "covered", "evidence")


def _quantile_loss(level: float, actual: float, tau: float) -> float:
    return tau * (actual - level) if actual > level else (1.0 - tau) * (level - actual)


def _ratio(num: float, den: float, evidence: float) -> float:
    if evidence <= 0 or den <= 1e-12:
        return 1.0 if num <= 1e-12 else float("inf")
    return num / den


def ratio(state: Mapping[str, Any], fallback: str) -> float:
    """Provisioning on the forecast's loss relative to the fallback's (1.0 with no evidence)."""
    loss = state.get("loss", {})
    return _ratio(float(loss.get(PROACTIVE, 0.0)), float(loss.get(fallback, 0.0)), float(state.get("evidence", 0.0)))


def short_windows(state: Mapping[str, Any], name: str) -> float:
    """The (decayed) count of windows whose peak exceeded what `name` served within the SLO."""
    return float(state.get("short", {}).get(name, 0.0))


def guard(state: Mapping[str, Any], fallback: str) -> float:
    """How far the forecast may take provisioning below the fallback's: 1 while provisioning on
    it has run short of the SLO's capacity in no more windows than the fallback would have,
    shrinking as (fallback's short windows + 1) / (the forecast's + 1) where it has in more."""
    return _clip((short_windows(state, fallback) + 1.0) / (short_windows(state, PROACTIVE) + 1.0))


def better_fallback(state: Mapping[str, Any], names: list[str], current: str | None) -> str:
    """Of several fallback rules scored side by side, the one that ran short of the SLO's
    capacity in the fewest windows, then lost the least; the `current` one stays unless another
    ran short in fewer by a whole window and a quarter of its count or, as short within that,
    lost a tenth less (no flapping on noise; among rules as safe, the cheaper)."""
    if current not in names:
        current = names[0]
    loss = state.get("loss", {})

    def key(n: str) -> tuple[float, float]:
        return short_windows(state, n), float(loss.get(n, 0.0))

    s_cur, l_cur = key(current)
    safer = [n for n in names if short_windows(state, n) <= s_cur - max(1.0, 0.25 * s_cur)]
    if safer:
        return min(safer, key=key)
    slack = max(1.0, 0.25 * s_cur)
    as_safe = [n for n in names if short_windows(state, n) < s_cur + slack and key(n)[1] < 0.9 * l_cur]
    return min(as_safe, key=lambda n: key(n)[1]) if as_safe else current


def forecast_ratio(state: Mapping[str, Any]) -> float:
    """The median forecast's error on the window peaks relative to persistence's."""
    return _ratio(
        float(state.get("err_fc", 0.0)), float(state.get("err_naive", 0.0)), float(state.get("evidence", 0.0))
    )


def coverage(state: Mapping[str, Any]) -> float:
    n = float(state.get("evidence", 0.0))
    return float(state.get("covered", 0.0)) / n if n > 0 else 0.0


def trust(state: Mapping[str, Any], cfg: SkillConfig, fallback: str) -> float:
    """0 (react only) .. 1 (provision fully on the forecast); see the module's docstring."""
    evidence = float(state.get("evidence", 0.0))
    if evidence <= 0:
        return 0.0
    skill = _clip((1.0 - ratio(state, fallback)) / max(1.0 - cfg.full_at, 1e-9))
    band = _clip((coverage(state) - cfg.cov_zero) / max(cfg.nominal - cfg.cov_zero, 1e-9))
    return skill * band * min(1.0, evidence / max(cfg.min_evidence, 1e-9))


def _clip(x: float) -> float:
    return 0.0 if math.isnan(x) else max(0.0, min(1.0, x))

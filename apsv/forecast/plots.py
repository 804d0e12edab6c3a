"""PNG plots of backtest forecasts against actuals, with the quantile bands (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apsv.forecast.backtest import SeriesBacktest
from apsv.forecast.metrics import QUANTILES


def plot_backtest(result: SeriesBacktest, path: str | Path, *, windows: int = 4) -> Path:
    """One panel per model: the last `windows` test windows, the actual series, the median
    forecast, the p10-p90 band and the p99 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.forecasts)
    k = min(windows, len(result.origins))
    origins = result.origins[-k:]
    h = result.horizon
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 2.6 * len(models)), sharex=True, squeeze=False)
    x_actual = np.concatenate([np.arange(o, o + h) for o in origins])
    y_actual = result.actual[-k:].reshape(-1)
    lo, med, hi, top = (QUANTILES.index(q) for q in (0.1, 0.5, 0.9, 0.99))
    for ax, name in zip(axes[:, 0], models, strict=True):
        q = result.forecasts[name][-k:]
        ax.plot(x_actual, y_actual, color="black", lw=1.0, label="actual")
        for j, o in enumerate(origins):
            xs = np.arange(o, o + h)
            ax.fill_between(
                xs, q[j, :, lo], q[j, :, hi], color="tab:blue", alpha=0.25, lw=0, label="p10-p90" if j == 0 else None
            )
            ax.plot(xs, q[j, :, med], color="tab:blue", lw=1.2, label="p50" if j == 0 else None)
            ax.plot(xs, q[j, :, top], color="tab:red", lw=0.8, ls="--", label="p99" if j == 0 else None)
            ax.axvline(o, color="grey", lw=0.5, ls=":")
        s = result.scores[name]
        ax.set_title(
            f"{result.series} - {name}: MASE {s.mase:.3f} (x{s.relative_mase:.2f} seasonal naive), "
            f"p90 coverage {s.p90_coverage:.0%}",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

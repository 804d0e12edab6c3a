"""The figures both evaluations write: matplotlib set up headless, a trace's file stem, the
saving of a figure, and the latency CDF against the SLO."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend: plots are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def file_stem(trace: str) -> str:
    """A trace's name as a file name's stem (a source such as `synthetic:bfd` or a path)."""
    return trace.replace(":", "_").replace("/", "_")


def save(fig: Any, path: Path) -> Path:
    """Lay out, write and close `fig`."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path


def latency_cdf(
    curves: Mapping[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]],
    slo_ms: float,
    xlabel: str,
    ylabel: str,
    path: Path,
) -> Path:
    """One CDF per label (latencies on a log axis, cumulative fractions) with the SLO marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (latency_ms, fraction) in curves.items():
        ax.plot(latency_ms, fraction, label=label)
    ax.axvline(slo_ms, color="red", ls="--", lw=0.8, label="SLO")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return save(fig, path)

"""The demo's report: its summary, its plots, and what it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def summarize(timeline: list[dict[str, Any]], slo_ms: float) -> dict[str, Any]:
    """Latency percentiles over every message, instances over time, the forecast's error against
    what came, SLO-violation seconds - from the VPSM's per-step record."""
    from apsv.scaling.latency import merge, quantile

    hist = merge(timeline)
    load = np.array([float(r["load"]) for r in timeline])
    p50 = np.array([float(r.get("forecast", {}).get("p50", np.nan)) for r in timeline])
    p90 = np.array([float(r.get("forecast", {}).get("p90", np.nan)) for r in timeline])
    # the forecast made at step t for step t+1, against the load measured at t+1
    ok = np.isfinite(p50[:-1]) & (load[1:] > 0)
    actual = load[1:][ok]
    wape = float(np.abs(p50[:-1][ok] - actual).sum() / actual.sum()) if ok.any() else None
    cover = float((actual <= p90[:-1][ok]).mean()) if ok.any() else None
    inst = [int(r["instances"]) for r in timeline]
    return {
        "latency_ms": {f"p{q}": round(quantile(hist, q / 100), 2) for q in (50, 90, 99)} if hist.sum() else None,
        "latency_samples": int(hist.sum()),
        "instances_over_time": inst,
        "instances_max": max(inst, default=0),
        "instances_mean": round(float(np.mean(inst)), 2) if inst else 0.0,
        "forecast_wape": round(wape, 3) if wape is not None else None,
        "forecast_p90_coverage": round(cover, 3) if cover is not None else None,
        "forecast_steps": int(ok.sum()),
        "slo_ms": slo_ms,
        "slo_violation_s": int(sum(1 for r in timeline if r.get("p99_ms") is not None and r["p99_ms"] > slo_ms)),
        "steps": len(timeline),
    }


def plot_demo(timeline: list[dict[str, Any]], slo_ms: float, directory: Path) -> list[Path]:
    """Load, forecast band and instances over time; the message latency CDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apsv.scaling.latency import LATENCY_BINS_MS, merge

    directory.mkdir(parents=True, exist_ok=True)
    t = np.array([float(r["ts"]) for r in timeline])
    t = t - t[0] if t.size else t
    load = np.array([float(r["load"]) for r in timeline])
    fc = {q: np.array([float(r.get("forecast", {}).get(q, np.nan)) for r in timeline]) for q in ("p10", "p50", "p90")}
    paths = []
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t, load, color="black", lw=1.0, label="BGP UPDATEs/s (measured)")
    ax.plot(t[1:], fc["p50"][:-1], color="tab:blue", lw=0.9, label="TPE p50, one step ahead")
    ax.fill_between(t[1:], fc["p10"][:-1], fc["p90"][:-1], color="tab:blue", alpha=0.2, label="TPE p10-p90")
    ax2 = ax.twinx()
    ax2.step(t, [r["instances"] for r in timeline], where="post", color="tab:red", lw=1.4, label="instances")
    ax.set_xlabel("s")
    ax.set_ylabel("messages/s")
    ax2.set_ylabel("BGP stack instances")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    ax.set_title("apsv demo: load, forecast and predictive scaling", fontsize=9)
    fig.tight_layout()
    paths.append(directory / "demo-scaling.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    hist = merge(timeline)
    fig, ax = plt.subplots(figsize=(6, 4))
    if hist.sum():
        ax.plot(np.sqrt(LATENCY_BINS_MS[:-1] * LATENCY_BINS_MS[1:]), np.cumsum(hist) / hist.sum())
    ax.axvline(slo_ms, color="red", ls="--", lw=0.8, label=f"SLO {slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("message latency, agent receive -> applied (ms)")
    ax.set_ylabel("fraction of messages")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(directory / "demo-latency-cdf.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def print_report(decoded: list[dict[str, Any]], o: dict[str, Any]) -> None:
    console = Console()
    t = Table(title="Real BGP data through the BGP-4 decoder")
    t.add_column("")
    for r in decoded:
        t.add_column(str(r["file"]), justify="right", overflow="fold")
    for label, key in (
        ("MRT records", "records"),
        ("UPDATE messages", "updates"),
        ("prefixes announced", "announced"),
        ("prefixes withdrawn", "withdrawn"),
        ("decode errors", "errors"),
        ("decode rate (prefixes/s)", "prefixes_per_second"),
    ):
        t.add_row(label, *(f"{r[key]:,}" for r in decoded))
    console.print(t)
    t2 = Table(title=f"Offloaded to a local Ray cluster ({o['backend']} backend, {o['transport']} transport)")
    t2.add_column("")
    t2.add_column("", justify="right")
    lat = o["latency_ms"] or {}
    fc = o["forecaster"]
    rows = [
        ("BGP sessions / virtual routers", f"{o['sessions']} / {o['vrouters']} (from {o['recorded_peers']} peers)"),
        ("UPDATEs replayed", f"{o['updates']:,} in {o['seconds']} s ({o['speed']:g}x real time)"),
        ("latency p50 / p90 / p99", " / ".join(f"{lat.get(k, 0):.1f}" for k in ("p50", "p90", "p99")) + " ms"),
        ("SLO-violation seconds", f"{o['slo_violation_s']} of {o['steps']} (p99 > {o['slo_ms']:g} ms)"),
        ("policy / forecaster", f"{o['policy']} / " + (f"TPE {fc['model']} on Ray Serve" if fc else "none")),
        (
            "forecast error (1 step ahead)",
            f"WAPE {o['forecast_wape']}, p90 covers {o['forecast_p90_coverage']}"
            if o["forecast_wape"] is not None
            else "n/a",
        ),
        ("instances over time", _spark(o["instances_over_time"])),
        ("instances max / mean", f"{o['instances_max']} / {o['instances_mean']} ({o['scale_actions']} scale actions)"),
        ("live session moves", f"{o['session_moves']} ({o['sessions_moved']} sessions moved)"),
        ("redelivered frames dropped", str(o["duplicates_dropped"])),
        ("lost or out-of-order sessions", str(o["lost_or_misordered"])),
        (
            "BFD sessions Up (cluster / remote)",
            f"{o['bfd']['cluster_up']} / {o['bfd']['remote_up']} of {o['bfd']['sessions']} at {o['bfd']['tx_ms']:g} ms"
            if o["bfd"]
            else "none",
        ),
        ("Loc-RIB = in-process replay", "yes, every session" if o["identical_ribs"] else "NO"),
        ("Loc-RIB prefixes (all sessions)", f"{o['loc_rib_prefixes']:,}"),
        ("telemetry (Parquet)", o["telemetry"]),
        ("plots", " ".join(o["plots"])),
    ]
    for label, value in rows:
        t2.add_row(label, value)
    console.print(t2)
    for p in o["problems"]:
        console.print(f"[red]{p}[/red]")


def _spark(values: list[int]) -> str:
    """Instances per step as one line of digits (a step per character, at most 90)."""
    if len(values) > 90:
        k = -(-len(values) // 90)
        values = [max(values[i : i + k]) for i in range(0, len(values), k)]
    return "".join(str(min(v, 9)) for v in values)

"""Scaling policies compared on the repository's traces, in the simulator, and its speed at scale.

python benchmarks/scaling_policies.py [--quick] [--keep-scale] [--out benchmarks/results/scaling_policies.json]
                                      [--plots benchmarks/results/scaling_plots]
python benchmarks/scaling_policies.py --heldout NAB_CHECKOUT [--heldout-set traffic|cpu]
                                      [--out benchmarks/results/scaling_heldout.json]

Traces (each: the first 30 % trains the Transformer forecaster, the rest is evaluated):
- every series of ../shared/data/timeseries (benchmarks/catalog.py; the last 8,000 samples of
  longer ones), peak scaled to 20,000 msgs/s, played twice: one sample per simulated second, and
  at its own sampling step (one decision per sample; the same forecasts, trained once);
- real BGP churn (RouteViews updates.20070211.0141, looped) x20, with a 900k-prefix reset storm;
- a BFD population of 20,000 sessions at 300 ms on a compressed day (SLO 10 ms).
Instance capacity 2,000 msgs/s, start latency 3 s, SLO 100 ms (BFD 10 ms), 1,000 virtual routers
(4 sessions each) on 100 nodes. `threshold` (0.6, 60 s) and `ray_serve` (Ray's defaults) are
fixed baselines; `reactive` is the best of a grid tuned on each trace. Writes the JSON, a
markdown table beside it (`.md`) and plots per trace.
Scale: one simulated day (86,400 steps) at 10,000 virtual routers on 1,000 nodes, wall time.

`--heldout DIR`: the same evaluation, played the same two ways, on the held-out series instead
(`catalog.HELDOUT`: NAB's traffic series that are not in ../shared/data, which no policy setting
was ever chosen on; DIR is a checkout of github.com/numenta/NAB). No synthetic traces, no scale
test, and no plots unless `--plots` is given; the files' SHA-256 go into the JSON.
`--heldout-set cpu`: NAB's CPU-utilization series instead (`catalog.HELDOUT_CPU`, kept unrun to
judge a change chosen after the traffic set had been seen), into scaling_heldout_cpu.json.
`--predictive KEY=VALUE` (repeatable; VALUE in JSON): a setting of the predictive policy over the
defaults it runs at, recorded in the JSON; with it, --out must be given (the defaults' results
stay as they are).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from catalog import HELDOUT_SETS, NAB_COMMIT, SERIES, Entry, nab_data, shared_data

from apsv.evaluation.compare import claims, evaluate, plot, policy_configs, public
from apsv.forecast.model_backtest import read_series
from apsv.scaling.predictive import check_config
from apsv.scaling.simulator import Forecasts, SimConfig, simulate
from apsv.scaling.traces import Trace, at_sample_step, bfd_population, bgp_churn, forecast_trace, from_series

MRT_CHURN = "mrt/bgpdump-testdata/updates.20070211.0141.gz"
MAX_POINTS = 8000
QUICK_POINTS = 1500


def series_traces(data: Path, quick: bool, entries: list[Entry] = SERIES) -> list[tuple[Trace | None, str]]:
    """One trace per catalogued series (None with the reason where it cannot be evaluated)."""
    out: list[tuple[Trace | None, str]] = []
    for e in entries:
        s = read_series(data / e.path, season=e.season, max_gap=e.max_gap)
        keep = QUICK_POINTS if quick else MAX_POINTS
        s = replace(s, values=s.values[-keep:], step=e.step_s or s.step)
        if len(s) < 90:
            out.append((None, f"{s.name}: {len(s)} samples; 90 are needed (30 % to train, 60 to evaluate)"))
            continue
        out.append((from_series(s, 20_000.0), ""))
    return out


def synthetic_traces(data: Path, quick: bool) -> list[Trace]:
    return [
        bgp_churn(data / MRT_CHURN, length_s=3600, scale=20.0),
        bfd_population(20_000, length_s=3600 if not quick else 1200),
    ]


def scale_test(quick: bool) -> dict[str, Any]:
    """One simulated day at 10,000 virtual routers (40,000 sessions) on 1,000 nodes."""
    steps = 86_400 if not quick else 8_640
    t = np.arange(steps)
    rng = np.random.default_rng(0)
    load = 1.2e6 + 0.8e6 * np.sin(2 * np.pi * t / 86_400) + rng.normal(0, 2e4, steps)
    cfg = SimConfig(
        capacity=2000.0,
        start_latency_s=3.0,
        vrouters=10_000,
        nodes=1000,
        instances_per_node=4,
        max_instances=2000,
        zipf=0.3,  # at this load a steeper skew gives single sessions more than an instance serves
    )
    t0 = time.perf_counter()
    load = np.maximum(load, 0)
    start = int(np.ceil(load[0] / (cfg.capacity * 0.6)))  # the day starts provisioned for its load
    r = simulate(load, "reactive", cfg, policy_config={"target_utilization": 0.6}, initial_instances=start)
    wall = time.perf_counter() - t0
    return {
        "steps": steps,
        "vrouters": cfg.vrouters,
        "sessions": cfg.vrouters * cfg.sessions_per_vrouter,
        "nodes": cfg.nodes,
        "wall_s": round(wall, 2),
        "simulated_s_per_wall_s": round(steps / wall, 1),
        "result": r.to_json(),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many traces meet each target, and which do not."""
    never = [r["trace"] for r in rows if r["claims"].get("never_worse") is False]
    skilled = [r for r in rows if "skilled" in r["claims"]]
    return {
        "traces": len(rows),
        "never_worse": len(rows) - len(never),
        "never_worse_missed": never,
        "skilled_traces": len(skilled),
        "skilled_met": sum(1 for r in skilled if r["claims"]["skilled"]["ok"]),
        "skilled_missed": [r["trace"] for r in skilled if not r["claims"]["skilled"]["ok"]],
    }


POLICY_ORDER = ("static", "reactive", "ray_serve", "threshold", "predictive", "oracle")


def markdown(rows: list[dict[str, Any]], skipped: list[str]) -> str:
    """The table docs/scaling.md and the README show: per trace, the forecaster's skill and each
    policy's violation seconds / instance-seconds (relative to threshold's) / actions / moves."""
    head = "| trace | rel. MASE | trust | " + " | ".join(POLICY_ORDER) + " | never worse |"
    lines = [head, "|" + "---|" * (len(POLICY_ORDER) + 4)]
    for r in rows:
        pol = r["policies"]
        ref = max(pol.get("threshold", {}).get("instance_s", 0.0), 1e-9)
        cells = []
        for name in POLICY_ORDER:
            m = pol.get(name)
            if m is None:
                cells.append("-")
                continue
            cost = m["instance_s"] / ref
            cells.append(f"{m['slo_violation_s']:g} / {cost:.2f} / {m['scale_actions']} / {m['session_moves']}")
        mase = (r.get("forecast") or {}).get("relative_mase")
        trust = pol.get("predictive", {}).get("forecast_trust")
        nw = r["claims"].get("never_worse")
        miss = [k for k, ok in r["claims"].get("never_worse_detail", {}).get("checks", {}).items() if not ok]
        lines.append(
            f"| {r['trace']} | {'-' if mase is None else f'{mase:.2f}'} | {'-' if trust is None else f'{trust:.2f}'} | "
            + " | ".join(cells)
            + f" | {'yes' if nw else 'no: ' + ', '.join(miss)} |"
        )
    for why in skipped:
        lines.append(
            f"| {why.split(':')[0]} | not evaluated: {why.split(': ', 1)[1]} |" + " |" * (len(POLICY_ORDER) + 2)
        )
    return "\n".join(lines) + "\n"


def predictive_overrides(ap: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    """`--predictive KEY=VALUE` as settings, checked against the predictive policy's own
    (argparse's one-line error, exit 2, on a malformed pair or a setting it refuses)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            ap.error(f"--predictive: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            ap.error(f'--predictive {key}: {raw!r} is not a JSON value (a number, true/false, "text", ...)')
    try:
        check_config({**policy_configs(np.ones(1))["predictive"], **out})
    except ValueError as e:
        ap.error(f"--predictive: {e}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--scale-only",
        action="store_true",
        help="only the simulator's speed at scale (run it on an idle machine); updates `scale` in --out",
    )
    ap.add_argument(
        "--keep-scale", action="store_true", help="keep the `scale` entry --out has (measured on an idle machine)"
    )
    ap.add_argument(
        "--heldout",
        nargs="?",
        const="",
        metavar="NAB_CHECKOUT",
        help="evaluate a held-out set of NAB series (--heldout-set) under this NAB checkout (default: APSV_NAB_DATA)",
    )
    ap.add_argument(
        "--heldout-set",
        choices=sorted(HELDOUT_SETS),
        help="which held-out set (default traffic: catalog.HELDOUT; cpu: catalog.HELDOUT_CPU)",
    )
    ap.add_argument("--out", type=Path, help="default: results/scaling_policies.json, or scaling_heldout[_cpu].json")
    ap.add_argument("--plots", type=Path, help="default: results/scaling_plots (held out: none)")
    ap.add_argument(
        "--predictive",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a predictive policy setting over its defaults (VALUE in JSON, e.g. hedge_below=0.25); needs --out",
    )
    a = ap.parse_args()
    overrides = predictive_overrides(ap, a.predictive)
    if overrides and a.out is None:
        ap.error("--predictive: give --out too (the default files hold the results at the policy's defaults)")
    results = Path(__file__).resolve().parent / "results"
    heldout = a.heldout is not None
    if heldout and a.scale_only:
        ap.error("--scale-only measures the simulator's speed, not the held-out series: not with --heldout")
    if overrides and a.scale_only:
        ap.error("--scale-only measures the simulator's speed with the reactive policy: not with --predictive")
    if a.heldout_set and not heldout:
        ap.error("--heldout-set chooses among the held-out sets: give --heldout too")
    which = a.heldout_set or "traffic"
    suffix = "" if which == "traffic" else f"_{which}"
    a.out = a.out or results / (f"scaling_heldout{suffix}.json" if heldout else "scaling_policies.json")
    a.plots = a.plots or (None if heldout else results / "scaling_plots")
    if a.scale_only:
        scale = scale_test(a.quick)
        print(f"scale: {json.dumps(scale)}")
        doc = json.loads(a.out.read_text()) if a.out.exists() else {"benchmark": "scaling_policies"}
        doc["scale"] = scale
        a.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"saved {a.out}")
        return
    data, entries = shared_data(), SERIES
    if heldout:
        nab = Path(a.heldout) if a.heldout else nab_data()
        if nab is None:
            sys.exit("--heldout: give a NAB checkout (github.com/numenta/NAB) or set APSV_NAB_DATA")
        data, entries = nab, HELDOUT_SETS[which]
        missing = [e.path for e in entries if not (data / e.path).is_file()]
        if missing:
            sys.exit(f"--heldout: {data} is not a NAB checkout: no {missing[0]} (and {len(missing) - 1} more)")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def run(tr: Trace, forecast: tuple[Forecasts, dict[str, Any]] | None, train_s: float) -> None:
        cfg = SimConfig(
            capacity=2000.0, start_latency_s=3.0, slo_ms=10.0 if tr.protocol == "bfd" else 100.0, max_instances=64
        )
        t0 = time.perf_counter()
        doc = evaluate(tr, cfg, forecaster_steps=steps, forecast=forecast, predictive=overrides)
        if a.plots is not None:
            plot(doc, a.plots)
        row = public(doc)
        row["forecast"]["train_seconds"] = round(train_s, 2)
        row["claims"] = claims(doc)
        row["wall_s"] = round(time.perf_counter() - t0 + train_s, 1)
        rows.append(row)
        print(f"{tr.name}: {json.dumps(row['claims'])}", flush=True)
        for p, r in row["policies"].items():
            print(
                f"  {p:11s} viol={r['slo_violation_s']:8.0f}s inst={r['instance_s']:11.0f}s "
                f"actions={r['scale_actions']:5d} moves={r['session_moves']:7d} trust={r.get('forecast_trust', '')}"
            )

    steps = 300 if a.quick else 600
    for tr, why in series_traces(data, a.quick, entries):
        if tr is None:
            skipped.append(why)
            print(f"skipped {why}")
            continue
        # one training per series: the forecasts are in samples, whatever a sample's duration
        t0 = time.perf_counter()
        fc = forecast_trace(tr, start=tr.split(0.3), horizon=32, steps=steps)
        train_s = time.perf_counter() - t0
        run(tr, fc, train_s)
        run(at_sample_step(tr), fc, 0.0)
    extra: dict[str, Any] = {}  # held out: where the data came from; else the scale test
    if heldout:
        extra["data"] = {
            "set": which,
            "source": "https://github.com/numenta/NAB",
            "commit": NAB_COMMIT,
            "sha256": {e.path: hashlib.sha256((data / e.path).read_bytes()).hexdigest() for e in entries},
        }
    else:
        for tr in synthetic_traces(data, a.quick):
            run(tr, None, 0.0)
        kept = json.loads(a.out.read_text()).get("scale") if a.keep_scale and a.out.exists() else None
        extra["scale"] = kept or scale_test(a.quick)
        print(f"scale: {json.dumps(extra['scale'])}")
    if overrides:
        extra["predictive_overrides"] = overrides
    out = {
        "benchmark": "scaling_heldout" if heldout else "scaling_policies",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "traces": rows,
        "skipped": skipped,
        "summary": summary(rows),
        **extra,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    table = a.out.with_suffix(".md")
    table.write_text(
        "Each cell: SLO-violation seconds / instance-seconds relative to threshold's / scale actions / "
        "session moves.\n\n" + markdown(rows, skipped)
    )
    print(f"saved {a.out} and {table}")


if __name__ == "__main__":
    main()

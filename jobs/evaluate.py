"""Compare scaling policies on a load trace in the simulator, as a Ray job (`apsv evaluate --mode sim`).

    ray job submit --working-dir . -- python jobs/evaluate.py ../shared/data/timeseries/...csv \
        --policies static,reactive,predictive --out /tmp/apsv-eval/result.json

The trace is a CSV / one-value-per-line series, an MRT update dump (BGP churn) or
``synthetic:bfd[:PEAK_SESSIONS]``; the first 30 % trains the forecaster and every policy is
simulated on the rest (apsv.evaluation.compare). The evaluation runs as one Ray task with
`--num-cpus` CPUs, wherever the cluster has them (the job's driver stays light on the head);
the driver writes the plots (`--plots`, default: beside `--out`) and the JSON: per policy
SLO-violation seconds, instance-seconds, scale actions, lost messages, p99, plus the claims.
Exit status 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# The job's working_dir (the repository root) holds apsv/; make it importable however we start.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apsv.evaluation.compare import POLICY_NAMES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="CSV / one-value-per-line series, an MRT update dump, or synthetic:bfd[:PEAK]")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated (default: all)")
    p.add_argument("--column", default=None, help="CSV value column")
    p.add_argument("--season", type=int, default=None, help="seasonal period of the series in samples")
    p.add_argument("--peak-rate", type=float, default=20_000.0, help="messages/s the series' peak becomes")
    p.add_argument("--capacity", type=float, default=2_000.0, help="messages/s one instance serves")
    p.add_argument("--start-latency", type=float, default=3.0, help="instance start latency, seconds")
    p.add_argument("--slo-ms", type=float, default=None, help="p99 latency SLO (default: BGP 100, BFD 10)")
    p.add_argument("--vrouters", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--max-instances", type=int, default=64)
    p.add_argument("--forecaster-steps", type=int, default=600, help="training steps of the forecaster")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the evaluation task (default 1)")
    p.add_argument("--out", default="apsv-evaluate/result.json", help="the result JSON (default apsv-evaluate/)")
    p.add_argument("--plots", default=None, help="directory for the PNG plots (default: the --out directory)")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICY_NAMES]
    if not names or unknown:
        bad = ", ".join(unknown) or "(none given)"
        problems.append(f"--policies: unknown {bad} (known: {', '.join(POLICY_NAMES)})")
    for name in ("peak_rate", "capacity", "num_cpus"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    for name in ("vrouters", "nodes", "max_instances", "forecaster_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if args.start_latency < 0:
        problems.append("--start-latency must not be negative")
    if not args.trace.startswith("synthetic:bfd") and not Path(args.trace).is_file():
        problems.append(f"{args.trace}: no such file")
    return problems


def run_evaluation(opts: dict[str, Any]) -> dict[str, Any]:
    """Load the trace and simulate the policies (runs in the Ray task). Raises ValueError for
    a trace that cannot be evaluated."""
    from apsv.evaluation.compare import evaluate
    from apsv.forecast.series import SeriesError
    from apsv.scaling.simulator import SimConfig
    from apsv.scaling.traces import load_trace

    trace = str(opts["trace"])
    try:
        tr = load_trace(trace, column=opts["column"], season=opts["season"], peak_rate=opts["peak_rate"])
        slo = opts["slo_ms"] if opts["slo_ms"] is not None else (10.0 if tr.protocol == "bfd" else 100.0)
        cfg = SimConfig(
            capacity=opts["capacity"],
            start_latency_s=opts["start_latency"],
            slo_ms=slo,
            vrouters=opts["vrouters"],
            nodes=opts["nodes"],
            max_instances=opts["max_instances"],
        )
        return evaluate(tr, cfg, tuple(opts["policies"]), forecaster_steps=opts["forecaster_steps"])
    except SeriesError as e:
        raise ValueError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = check_args(args)
    if problems:
        for p in problems:
            print(f"evaluate: {p}", file=sys.stderr)
        return 2
    import ray

    from apsv.evaluation.compare import claims, plot, public

    if not ray.is_initialized():
        ray.init()  # inside `ray job submit` this joins the job's cluster; alone, it starts a local one
    opts = {
        "trace": args.trace if args.trace.startswith("synthetic:") else str(Path(args.trace).resolve()),
        "policies": [p.strip() for p in args.policies.split(",") if p.strip()],
        "column": args.column,
        "season": args.season,
        "peak_rate": args.peak_rate,
        "capacity": args.capacity,
        "start_latency": args.start_latency,
        "slo_ms": args.slo_ms,
        "vrouters": args.vrouters,
        "nodes": args.nodes,
        "max_instances": args.max_instances,
        "forecaster_steps": args.forecaster_steps,
    }
    t0 = time.perf_counter()
    task = ray.remote(run_evaluation).options(num_cpus=args.num_cpus, max_retries=0)
    try:
        doc = ray.get(task.remote(opts))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):
            print(f"evaluate: {e.cause}", file=sys.stderr)
            return 2
        raise
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [] if args.no_plots else plot(doc, Path(args.plots) if args.plots else out.parent)
    result = public(doc)
    result["claims"] = claims(doc)
    result["plots"] = [str(p.resolve()) for p in written]
    result["job_seconds"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(result, default=str)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

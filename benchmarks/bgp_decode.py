"""BGP decode and decode + Loc-RIB insert rates on real MRT dumps, against mrtparse in the same run.

    python benchmarks/bgp_decode.py [--repeat 3] [--out benchmarks/results/bgp_decode.json]

For the largest update dump and the largest RIB dump in shared/data/mrt it measures, on one
core (the process pins itself), the median over --repeat runs of:

* mrtparse 2.2.0 (PyPI) reading the file: records, UPDATEs and prefixes per second - the baseline;
* APSV decoding every message and attribute set (`mrt_stats`);
* APSV decoding and inserting into Adj-RIB-Ins and a Loc-RIB with the RFC 4271 decision
  (`replay_updates` for update dumps, `load_rib_dump` for RIB dumps);

and the memory a loaded RIB takes per prefix and per path (tracemalloc, separate run). Prints a
table and writes one JSON object. Ratios compare numbers from the same run on the same core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrtparse import Reader

from apsv.bgp.path_attributes import reset_interners
from apsv.gc_tuning import tune_gc
from apsv.mrt.replay import CollectorView, load_rib_dump, replay_updates, replay_updates_per_session
from apsv.mrt.stats import mrt_stats

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("APSV_SHARED_DATA", REPO.parent / "shared" / "data"))
UPDATE_DUMP = "mrt/bgpdump-testdata/updates.20070211.0141.gz"  # most UPDATEs of any dump here
RIB_DUMP = "mrt/pyasn-data/rib.20140523.0600_firstMB.complete-records.mrt.gz"  # most RIB entries mrtparse reads
APSV_ONLY_RIB = "mrt/bgpkit-ripe-fixtures/bview.20000111.0032.gz"  # the largest dump; mrtparse fails on it


def pin_one_core() -> int | None:
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def median_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        reset_interners()  # every run starts cold: no attribute set seen before
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def mrtparse_count(path: Path) -> dict[str, int]:
    recs = updates = prefixes = entries = 0
    for m in Reader(str(path)):
        recs += 1
        d = m.data
        if "bgp_message" in d:
            bm = d["bgp_message"]
            if 2 in bm.get("type", {}):
                updates += 1
                prefixes += len(bm.get("nlri", [])) + len(bm.get("withdrawn_routes", []))
                for a in bm.get("path_attributes", []):
                    code = next(iter(a["type"]))
                    if code == 14:
                        prefixes += len(a["value"].get("nlri", []))
                    elif code == 15:
                        prefixes += len(a["value"].get("withdrawn_routes", []))
        elif "rib_entries" in d:
            entries += len(d["rib_entries"])
    return {"records": recs, "updates": updates, "prefixes": prefixes, "rib_entries": entries}


def rib_memory(load: Callable[[], CollectorView]) -> dict[str, float]:
    """Bytes allocated by a loaded view (Adj-RIB-Ins, Loc-RIBs and interned attributes)."""
    reset_interners()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    view = load()
    total = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    prefixes = view.prefixes()
    loc_only = 0
    for loc in view.loc_rib.values():
        loc_only += sys.getsizeof(loc.best)
        if loc.holders is not None:
            loc_only += sys.getsizeof(loc.holders) + sum(sys.getsizeof(h) for h in loc.holders.values())
    return {
        "rib_bytes_total": total,
        "bytes_per_prefix": round(total / prefixes, 1),
        "bytes_per_path": round(total / max(view.paths, 1), 1),
        "loc_rib_bytes_per_prefix": round(loc_only / prefixes, 1),
        "loc_rib_prefixes": prefixes,
        "paths": view.paths,
    }


def compiled() -> bool:
    import apsv.bgp.attributes as mod

    return not mod.__file__.endswith(".py") if mod.__file__ else False


def bench_file(rel: str, kind: str, repeat: int, with_baseline: bool = True) -> dict[str, Any]:
    path = DATA / rel
    row: dict[str, Any] = {"file": rel, "kind": kind}
    if with_baseline:
        t_ref, ref = median_time(lambda: mrtparse_count(path), repeat)
        assert isinstance(ref, dict)
        work = ref["prefixes"] if kind == "updates" else ref["rib_entries"]
        row["mrtparse"] = {"seconds": round(t_ref, 4), **ref, "prefixes_per_s": round(work / t_ref)}
        if kind == "updates":
            row["mrtparse"]["updates_per_s"] = round(ref["updates"] / t_ref)
    t_dec, s = median_time(lambda: mrt_stats(path), repeat)
    assert not isinstance(s, type(None))
    stats = s.to_json()  # type: ignore[attr-defined]
    work = stats["announced"] + stats["withdrawn"] if kind == "updates" else stats["rib_entries"]
    row["apsv_decode"] = {
        "seconds": round(t_dec, 4),
        "updates": stats["updates"],
        "prefixes": work,
        "prefixes_per_s": round(work / t_dec),
        "errors": stats["errors"],
    }
    if kind == "updates":
        row["apsv_decode"]["updates_per_s"] = round(stats["updates"] / t_dec)
    loader = (lambda: replay_updates(path)) if kind == "updates" else (lambda: load_rib_dump(path))
    t_ins, view = median_time(loader, repeat)
    assert isinstance(view, CollectorView)
    row["apsv_decode_insert"] = {
        "seconds": round(t_ins, 4),
        "prefixes": work,
        "prefixes_per_s": round(work / t_ins),
        "loc_rib_prefixes": view.prefixes(),
        "peers": len(view.sources),
    }
    if kind == "updates":
        # APSV's own layout: one BGP session per recorded peer, each with its own Loc-RIB.
        t_ps, views = median_time(lambda: replay_updates_per_session(path), repeat)
        assert isinstance(views, dict)
        row["apsv_decode_insert_per_session"] = {
            "seconds": round(t_ps, 4),
            "prefixes": work,
            "prefixes_per_s": round(work / t_ps),
            "sessions": len(views),
            "loc_rib_prefixes": sum(v.prefixes() for v in views.values()),
        }
    if with_baseline:
        ref_rate = row["mrtparse"]["prefixes_per_s"]
        row["ratio_decode_vs_mrtparse"] = round(row["apsv_decode"]["prefixes_per_s"] / ref_rate, 2)
        row["ratio_decode_insert_vs_mrtparse"] = round(row["apsv_decode_insert"]["prefixes_per_s"] / ref_rate, 2)
    if kind == "rib":
        row["memory"] = rib_memory(loader)  # type: ignore[arg-type]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bgp_decode.json")
    ap.add_argument("--quick", action="store_true", help="one run each, skip the APSV-only dump")
    args = ap.parse_args()
    if not (DATA / "MANIFEST.tsv").is_file():
        print(f"benchmark data not found at {DATA} (set APSV_SHARED_DATA)", file=sys.stderr)
        return 2
    cpu = pin_one_core()
    tune_gc()
    repeat = 1 if args.quick else args.repeat
    rows = [bench_file(UPDATE_DUMP, "updates", repeat), bench_file(RIB_DUMP, "rib", repeat)]
    if not args.quick:
        rows.append(bench_file(APSV_ONLY_RIB, "rib", 1, with_baseline=False))
    upd, rib = rows[0], rows[1]
    result = {
        "benchmark": "bgp_decode",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_pinned": cpu,
        "compiled_with_mypyc": compiled(),
        "repeat": repeat,
        "files": rows,
        "targets": {
            "decode_ratio_vs_mrtparse_min": min(upd["ratio_decode_vs_mrtparse"], rib["ratio_decode_vs_mrtparse"]),
            # Update dumps into per-session Loc-RIBs (how APSV runs) and the RIB dump into the
            # collector's Loc-RIB (what a RIB dump is).
            "decode_insert_prefixes_per_s_min": min(
                upd["apsv_decode_insert_per_session"]["prefixes_per_s"], rib["apsv_decode_insert"]["prefixes_per_s"]
            ),
            "collector_view_update_decode_insert_prefixes_per_s": upd["apsv_decode_insert"]["prefixes_per_s"],
            "meets_5x_mrtparse": min(upd["ratio_decode_vs_mrtparse"], rib["ratio_decode_vs_mrtparse"]) >= 5,
            "meets_300k_decode_insert": min(
                upd["apsv_decode_insert_per_session"]["prefixes_per_s"], rib["apsv_decode_insert"]["prefixes_per_s"]
            )
            >= 300_000,
        },
    }
    print(f"{'file':<55} {'mrtparse/s':>11} {'decode/s':>10} {'x':>6} {'+insert/s':>10} {'x':>6}")
    print("  (+insert: one Loc-RIB for every peer of the dump, the collector's view)")
    for r in rows:
        ref = r.get("mrtparse", {}).get("prefixes_per_s", 0)
        print(
            f"{r['file'][-55:]:<55} {ref:>11,} {r['apsv_decode']['prefixes_per_s']:>10,} "
            f"{r.get('ratio_decode_vs_mrtparse', 0):>6} {r['apsv_decode_insert']['prefixes_per_s']:>10,} "
            f"{r.get('ratio_decode_insert_vs_mrtparse', 0):>6}"
        )
        if "apsv_decode_insert_per_session" in r:
            ps = r["apsv_decode_insert_per_session"]
            print(f"  per-session Loc-RIBs ({ps['sessions']} sessions, as APSV runs them): {ps['prefixes_per_s']:,}/s")
        if "memory" in r:
            m = r["memory"]
            print(
                f"  RIB memory: {m['bytes_per_prefix']} B/prefix, {m['bytes_per_path']} B/path "
                f"(Loc-RIB structures alone {m['loc_rib_bytes_per_prefix']} B/prefix)"
            )
    print(json.dumps(result["targets"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

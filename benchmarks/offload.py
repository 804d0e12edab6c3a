"""The offload path against a bare Ray batched echo (see apsv/bench/offload.py).

python benchmarks/offload.py [--json] [--quick] [--out benchmarks/results/offload.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apsv.bench.offload import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "offload.json")
    a = ap.parse_args()
    main(as_json=a.json, quick=a.quick, out=a.out)

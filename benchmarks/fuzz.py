"""Coverage-guided fuzzing of APSV's decoders with atheris (see apsv/bench/fuzz.py).

python benchmarks/fuzz.py [--runs 1000000] [--targets bgp_message,...] [--out benchmarks/results/fuzz.json]
    [--regressions tests/fuzz_regressions]
"""

from __future__ import annotations

from apsv.bench.fuzz import main

if __name__ == "__main__":
    main()

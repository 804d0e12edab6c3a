"""Process-level settings for processes that hold large RIBs (or many frames in custody).

CPython's cyclic garbage collector walks every container it tracks each time enough new ones
have been allocated since the last walk. A process that builds a RIB allocates millions of
long-lived tuples and dicts that never form cycles, so the default thresholds make it walk the
whole (growing) heap over and over: loading a 270k-path RIB dump spends about half its time
there - and a pause of tens of milliseconds on the message path. Stack instances, agents, the
CLI and the benchmarks call `tune_gc()` once: it moves what exists
to the permanent generation and collects far less often. Reference counting still frees
everything that is not in a cycle, immediately.
"""

from __future__ import annotations

import gc

_TUNED = False


def tune_gc(gen0: int = 200_000) -> None:
    global _TUNED
    if _TUNED:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0, 50, 100)
    _TUNED = True

"""Benchmarks that the CLI runs (`apsv bench ...`); benchmarks/ holds the scripts that call them."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data() -> Path:
    """The real data the benchmarks read: $APSV_SHARED_DATA, else ../shared/data beside the checkout."""
    return Path(os.environ.get("APSV_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))

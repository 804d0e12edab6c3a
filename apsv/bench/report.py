"""How every benchmark reports: one JSON object (`--json`) or lines for a person, and the same
object written to a file (`--out`) for benchmarks/results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apsv.runtime.cluster import stdout_for_one_object


def run_and_report(
    run: Callable[[], dict[str, Any]], render: Callable[[dict[str, Any]], str], as_json: bool, out: Path | None
) -> dict[str, Any]:
    with stdout_for_one_object(as_json):  # Ray's own messages stay off a JSON stdout
        r = run()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r) if as_json else render(r))
    return r

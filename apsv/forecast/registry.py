"""A versioned model registry on a filesystem path, so every serving decision can be traced.

```
<root>/versions/v0001/model.json, weights.pt   the forecaster (NeuralForecaster.save)
<root>/versions/v0001/card.json                 metrics, data window, training settings, parent
<root>/CURRENT                                  the serving version's name (replaced atomically)
<root>/decisions.jsonl                          every promote / refuse, with both scores and why
```

A version directory is written under a temporary name and renamed into place, so a reader (a
Serve replica hot-swapping) never sees a half-written model.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apsv.forecast.model_error import ModelLoadError

if TYPE_CHECKING:
    from apsv.forecast.neural import NeuralForecaster

_VERSION = re.compile(r"^v(\d{4,})$")


@dataclass(frozen=True)
class Decision:
    candidate: str
    serving: str | None
    promoted: bool
    metric: str
    candidate_score: float
    serving_score: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "time": time.time()}


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        names = [p.name for p in (self.root / "versions").iterdir() if _VERSION.match(p.name)]
        return sorted(names, key=lambda n: int(n[1:]))

    def path(self, version: str) -> Path:
        if not _VERSION.match(version):
            raise ValueError(f"not a version name: {version!r} (expected v0001, v0002, ...)")
        return self.root / "versions" / version

    def register(self, model: NeuralForecaster, card: dict[str, Any]) -> str:
        """Store a trained model with its card (metrics, data window, ...); returns its version."""
        existing = self.versions()
        n = int(existing[-1][1:]) + 1 if existing else 1
        version = f"v{n:04d}"
        tmp = self.root / "versions" / f".{version}.{os.getpid()}.tmp"
        model.save(tmp)
        card = {**card, "version": version, "registered": time.time(), "kind": model.kind, "horizon": model.horizon}
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        tmp.rename(self.path(version))
        return version

    def card(self, version: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path(version) / "card.json").read_text())
        return data

    def current(self) -> str | None:
        try:
            v = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        return v or None

    def load(self, version: str | None = None) -> tuple[str, NeuralForecaster]:
        """The named version, or the serving one; ModelLoadError when there is none or it is unusable."""
        v = version if version not in (None, "current") else self.current()
        if v is None:
            raise ModelLoadError(f"{self.root}: no model has been promoted yet")
        p = self.path(v)
        if not p.is_dir():
            raise ModelLoadError(f"{self.root}: no version {v}")
        from apsv.forecast.neural import NeuralForecaster  # torch: only once there is a model to load

        return v, NeuralForecaster.load(p)

    def promote(self, version: str) -> None:
        if not self.path(version).is_dir():
            raise ValueError(f"{self.root}: no version {version}")
        tmp = self.root / f".CURRENT.{os.getpid()}.tmp"
        tmp.write_text(version + "\n")
        tmp.replace(self.root / "CURRENT")

    def decide(
        self,
        candidate: str,
        candidate_score: float,
        serving_score: float,
        *,
        metric: str = "wql",
        min_gain: float = 0.0,
    ) -> Decision:
        """Promote the candidate only if its score (lower is better) beats the serving model's by
        more than `min_gain` (relative); record the decision either way."""
        serving = self.current()
        # NaN compares false: a candidate without a score is never promoted
        better = math.isfinite(candidate_score) and candidate_score < serving_score * (1.0 - min_gain)
        reason = (
            f"{metric} {candidate_score:.6g} < {serving_score:.6g}"
            + (f" by more than {min_gain:.0%}" if min_gain else "")
            if better
            else f"{metric} {candidate_score:.6g} does not beat {serving_score:.6g}"
            + (f" by more than {min_gain:.0%}" if min_gain else "")
        )
        d = Decision(candidate, serving, better, metric, candidate_score, serving_score, reason)
        if better:
            self.promote(candidate)
        with open(self.root / "decisions.jsonl", "a") as f:
            f.write(json.dumps(d.to_json()) + "\n")
        return d

    def decisions(self) -> list[dict[str, Any]]:
        try:
            lines = (self.root / "decisions.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

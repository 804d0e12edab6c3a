"""Training and batched prediction for the torch forecasters.

`NeuralForecaster.fit` trains one global model over any number of series (windows sampled
uniformly per series), keeps the weights with the best hold-out pinball loss, then calibrates the
quantile band on that hold-out (`apsv.forecast.calibration`: pinball training alone tends to
give bands that are too narrow out of sample). `predict` falls back to seasonal
naive for histories too short for the model, and says how often it did.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apsv.forecast.baselines import seasonal_naive_quantiles, seasonal_naive_rows
from apsv.forecast.calibration import apply_calibration, blend_factors, calibrate
from apsv.forecast.metrics import QUANTILES
from apsv.forecast.model_error import ModelLoadError
from apsv.forecast.models import N_COVARIATES, ModelConfig, QuantileForecaster, build_model, pinball_loss
from apsv.forecast.series import FloatArray, Series

Reporter = Callable[[int, float], None]  # (training step, hold-out loss) -> None; may raise to stop
# contexts (N, L), targets (N, H), covariates (N, C) and, for an anchored model, the seasonal
# naive quantiles (N, H, Q) each window's model output corrects
Windows = tuple[FloatArray, FloatArray, FloatArray, FloatArray | None]


MIN_FREE_WINDOWS = 64  # fewer training windows than this: the model corrects seasonal naive


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 100
    holdout_fraction: float = 0.15
    seed: int = 0
    threads: int = 2
    max_seconds: float | None = None  # stop early (keeping the best weights) past this wall time
    # at most this many passes over the training windows: a short series (a few dozen windows)
    # is fitted for a few steps, not thousands of passes over the same points
    max_epochs: float = 100.0


def auto_context(season: int, horizon: int, patch_len: int, available: int) -> int:
    """Context length: about four seasons (at least four horizons), capped so the training data
    still holds many windows, rounded to whole patches."""
    want = max(4 * season, 4 * horizon, 8 * patch_len)
    want = min(want, 1536, max(patch_len * 2, available // 3))
    return max(patch_len * 2, (want // patch_len) * patch_len)


def auto_patch(season: int, horizon: int) -> int:
    """About 64 tokens over four seasons, and never wider than the horizon's order of magnitude."""
    target = max(4 * season, 4 * horizon) / 64
    return int(min(48, max(4, 2 ** round(math.log2(max(target, 1.0))))))


def covariates(series: Series, index: int) -> FloatArray:
    """Calendar features of step `index` (the first forecast step): phase in the season, hour of
    day and day of week (zeros when the series has no timestamps)."""
    out = np.zeros(N_COVARIATES, dtype=np.float64)
    if series.season > 1:
        a = 2 * math.pi * (index % series.season) / series.season
        out[0], out[1] = math.sin(a), math.cos(a)
    if series.start is not None and series.step is not None:
        t = series.start + index * series.step
        hod = 2 * math.pi * ((t % 86400) / 86400)
        dow = 2 * math.pi * (((t // 86400) + 3) % 7) / 7  # 1970-01-01 was a Thursday: Monday = 0
        out[2], out[3], out[4], out[5] = math.sin(hod), math.cos(hod), math.sin(dow), math.cos(dow)
    return out


@dataclass
class FitReport:
    seconds: float = 0.0
    steps: int = 0
    best_step: int = 0
    holdout_loss: float = float("nan")
    windows: int = 0
    calibration: list[float] = field(default_factory=list)
    skipped: str | None = None  # why no model was trained (then every forecast is seasonal naive)


class NeuralForecaster:
    def __init__(
        self,
        kind: str,
        horizon: int,
        *,
        context_length: int | None = None,
        patch_len: int | None = None,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.1,
        train: TrainConfig | None = None,
        recent_windows: int = 4,
    ) -> None:
        self.name = kind
        self.kind = kind
        self.horizon = horizon
        self.context_length = context_length
        self.patch_len = patch_len
        self.arch: dict[str, Any] = {"d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "dropout": dropout}
        self.train_cfg = train or TrainConfig()
        self.recent_windows = recent_windows  # backcasts per series used to widen its band
        self.cfg: ModelConfig | None = None
        self.model: QuantileForecaster | None = None
        self.calibration = np.ones(len(QUANTILES))
        self.report = FitReport()
        self.fallbacks = 0  # forecasts answered by seasonal naive (too little history)

    # -- training -------------------------------------------------------------------------

    def _config(self, train: Sequence[Series]) -> ModelConfig | None:
        season = max(s.season for s in train)
        patch = self.patch_len or auto_patch(season, self.horizon)
        longest = max(len(s) for s in train)
        ctx = self.context_length or auto_context(season, self.horizon, patch, longest)
        ctx = (ctx // patch) * patch
        if ctx < 2 * patch or longest < ctx // 2 + 2 * self.horizon:
            return None
        return ModelConfig(self.kind, ctx, self.horizon, patch_len=patch, **self.arch)

    def fit(self, train: Sequence[Series], report: Reporter | None = None) -> FitReport:
        if not train:
            raise ValueError("fit needs at least one series")
        t0 = time.perf_counter()
        cfg = self._config(train)
        if cfg is None:
            return self._skip("series too short for the model; seasonal naive answers")
        tc = self.train_cfg
        torch.set_num_threads(tc.threads)
        gen = torch.Generator().manual_seed(tc.seed)  # the batches' draws
        torch.manual_seed(tc.seed)  # the initial weights (and dropout)
        fit_parts, val = _hold_out(train, cfg, tc.holdout_fraction)
        windows = self._windows(fit_parts, cfg)
        n_windows = int(windows[0].shape[0])
        if n_windows == 0:
            return self._skip("no training windows; seasonal naive answers")
        season = max(s.season for s in train)
        if n_windows < MIN_FREE_WINDOWS and cfg.context_length >= season > 1:
            # too few windows to learn a series' shape from: learn a correction to its seasonal
            # naive forecast instead (shrinkage toward the baseline)
            cfg = replace(cfg, anchor_season=season)
            windows = self._windows(fit_parts, cfg)  # now with their anchors
        model = build_model(cfg)
        holdout = self._origins(val, cfg) if val else None
        run = self._train(model, windows, holdout, gen, t0, report)
        model.load_state_dict(run.best_weights)
        model.eval()
        self.cfg, self.model = cfg, model
        self.calibration = np.ones(len(QUANTILES))
        if holdout is not None:
            xv, yv, cv, av = holdout
            self.calibration = calibrate(self._forward(xv, cv, av), yv)
        self.report = FitReport(
            seconds=time.perf_counter() - t0,
            steps=run.steps,
            best_step=run.best_step,
            holdout_loss=run.best_loss,
            windows=n_windows,
            calibration=[round(float(c), 4) for c in self.calibration],
        )
        return self.report

    def _skip(self, why: str) -> FitReport:
        """No model: every forecast is seasonal naive."""
        self.report = FitReport(skipped=why)
        self.model = None
        return self.report

    def _train(
        self,
        model: QuantileForecaster,
        windows: Windows,
        holdout: Windows | None,
        gen: torch.Generator,
        t0: float,
        report: Reporter | None,
    ) -> _TrainingRun:
        """Minibatch steps over the (context, target, covariates) windows, scored on the hold-out
        (else on the batch's loss) every `eval_every` steps and at the last; the best weights kept."""
        tc = self.train_cfg
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        n_steps = max(1, min(tc.steps, math.ceil(tc.max_epochs * windows[0].shape[0] / tc.batch_size)))
        sched = _warmup_cosine(opt, n_steps)
        # An anchored model starts as seasonal naive (its head is zero): that start is the first
        # candidate, so training that cannot beat the baseline on the hold-out leaves it. An
        # unanchored start is random weights, no baseline: only trained weights compete.
        run = _TrainingRun()
        anchored = model.cfg.anchor_season > 1
        run.keep(model, float("inf") if holdout is None or not anchored else self._holdout_loss(model, *holdout), 0)
        x_t, y_t, c_t = (torch.from_numpy(a).float() for a in windows[:3])
        a_t = None if windows[3] is None else torch.from_numpy(windows[3]).float()
        for step in range(1, n_steps + 1):
            run.steps = step
            model.train()
            idx = torch.randint(0, x_t.shape[0], (tc.batch_size,), generator=gen)
            q, loc, scale = model.forward_scaled(x_t[idx], c_t[idx], None if a_t is None else a_t[idx])
            loss = pinball_loss(q, (y_t[idx] - loc) / scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            last = step == n_steps or (tc.max_seconds is not None and time.perf_counter() - t0 > tc.max_seconds)
            if step % tc.eval_every == 0 or last:
                vloss = float(loss.item()) if holdout is None else self._holdout_loss(model, *holdout)
                if vloss < run.best_loss:
                    run.keep(model, vloss, step)
                if report is not None:
                    report(step, vloss)
            if last:
                break
        return run

    @staticmethod
    def _windows(parts: Sequence[Series], cfg: ModelConfig) -> Windows:
        """Every (context, target) window of the training parts; short prefixes edge-padded."""
        L, H = cfg.context_length, cfg.horizon
        xs, ys, cs = [], [], []
        prefixes: list[FloatArray] = []  # each window's whole history, for its anchor
        for s in parts:
            v = s.values
            first = max(L // 2, 1)
            if len(v) < first + H:
                continue
            padded = np.concatenate([np.full(L, v[0]), v])
            win = np.lib.stride_tricks.sliding_window_view(padded, L + H)
            # window k covers padded[k : k+L+H]: its forecast origin in v is k (context v[k-L:k])
            origins = np.arange(first, len(v) - H + 1)
            xs.append(win[origins, :L])
            ys.append(win[origins, L:])
            cs.append(np.stack([covariates(s, int(o)) for o in origins]))
            if cfg.anchor_season > 1:
                prefixes.extend(v[:o] for o in origins)
        if not xs:
            return np.zeros((0, L)), np.zeros((0, H)), np.zeros((0, N_COVARIATES)), None
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(cs), _anchors(prefixes, cfg)

    @staticmethod
    def _origins(val: Sequence[tuple[Series, int]], cfg: ModelConfig) -> Windows:
        L, H = cfg.context_length, cfg.horizon
        xs = np.stack([_context(s.values[:o], L) for s, o in val])
        ys = np.stack([s.values[o : o + H] for s, o in val])
        cs = np.stack([covariates(s, o) for s, o in val])
        return xs, ys, cs, _anchors([s.values[:o] for s, o in val], cfg)

    def _holdout_loss(
        self, model: QuantileForecaster, x: FloatArray, y: FloatArray, c: FloatArray, a: FloatArray | None
    ) -> float:
        model.eval()
        with torch.inference_mode():
            anchor = None if a is None else torch.from_numpy(a).float()
            q, loc, scale = model.forward_scaled(torch.from_numpy(x).float(), torch.from_numpy(c).float(), anchor)
            return float(pinball_loss(q, (torch.from_numpy(y).float() - loc) / scale).item())

    # -- prediction -----------------------------------------------------------------------

    def _forward(self, x: FloatArray, c: FloatArray, a: FloatArray | None = None, chunk: int = 1024) -> FloatArray:
        # One conversion to float32 for the whole request, then chunks of up to 1,024 windows:
        # on a 2-core host a 1,000-window request takes ~13 ms in one pass against ~16 ms in
        # chunks of 256 (benchmarks/forecast_serve.py); chunks bound the activations' memory.
        assert self.model is not None
        if x.shape[0] == 0:
            return np.zeros((0, self.horizon, len(QUANTILES)))
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        ct = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
        at = None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        with torch.inference_mode():
            out = torch.cat(
                [
                    self.model(xt[i : i + chunk], ct[i : i + chunk], None if at is None else at[i : i + chunk])
                    for i in range(0, x.shape[0], chunk)
                ]
            )
        return out.numpy().astype(np.float64)

    def _backcasts(self) -> int:
        """Backcasts per series that calibrate its band: none for an anchored model, whose band is
        already this series' own (seasonal naive's errors over its whole history), where a few
        backcasts (a short series has two or three) would only add their noise."""
        return 0 if self.cfg is not None and self.cfg.anchor_season > 1 else self.recent_windows

    def min_history(self) -> int:
        if self.cfg is None:
            return 1 << 62
        return max(2 * self.cfg.patch_len, self.cfg.context_length // 4)

    def predict(self, histories: Sequence[Series], horizon: int | None = None) -> FloatArray:
        """(n, horizon, Q) quantile forecasts; horizon may be at most the model's."""
        h = horizon or self.horizon
        if h > self.horizon:
            raise ValueError(f"this model forecasts {self.horizon} steps, {h} asked")
        out = np.zeros((len(histories), h, len(QUANTILES)))
        use = [i for i, s in enumerate(histories) if self.cfg is not None and len(s) >= self.min_history()]
        for i in set(range(len(histories))) - set(use):
            out[i] = seasonal_naive_quantiles(histories[i].values, histories[i].season, h)
            self.fallbacks += 1
        if use:
            assert self.cfg is not None
            L, H = self.cfg.context_length, self.horizon
            xs = [_context(histories[i].values, L) for i in use]
            cs = [covariates(histories[i], len(histories[i])) for i in use]
            prefixes = [histories[i].values for i in use]
            # Backcasts: forecasts from the last few horizons inside each history, whose outcome is
            # known, calibrate that series' band (recent errors of this series, not only the
            # training hold-out's).
            back: list[tuple[int, int]] = []  # (row in `use`, origin)
            for j, i in enumerate(use):
                n = len(histories[i])
                for k in range(1, self._backcasts() + 1):
                    o = n - k * H
                    if o < self.min_history():
                        break
                    back.append((j, o))
                    xs.append(_context(histories[i].values[:o], L))
                    cs.append(covariates(histories[i], o))
                    prefixes.append(histories[i].values[:o])
            q_all = self._forward(np.stack(xs), np.stack(cs), _anchors(prefixes, self.cfg))
            factors = np.broadcast_to(self.calibration, (len(use), len(QUANTILES))).copy()
            if back:
                qb = q_all[len(use) :]
                yb = np.stack([histories[use[j]].values[o : o + H] for j, o in back])
                rows = np.asarray([j for j, _ in back])
                for j in np.unique(rows):
                    sel = rows == j
                    factors[j] = blend_factors(self.calibration, calibrate(qb[sel], yb[sel], default=self.calibration))
            q = apply_calibration(q_all[: len(use), :h, :], factors[:, None, :])
            for j, i in enumerate(use):
                v = histories[i].values
                out[i] = np.maximum(q[j], 0.0) if v.min() >= 0 else q[j]
        return out

    def predict_array(
        self,
        values: FloatArray,
        season: int,
        horizon: int | None = None,
        *,
        start: float | None = None,
        step: float | None = None,
    ) -> FloatArray:
        """(n, horizon, Q) for n histories of one length, one season and one clock, given as one
        (n, T) array: the serving fast path (no per-series objects; one context slice, one
        covariate row). The same forecasts as `predict` with the hold-out calibration alone
        (`recent_windows` 0); with backcasts configured it takes `predict`'s path."""
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 2:
            raise ValueError(f"expected a 2-D array of histories, got shape {v.shape}")
        n, length = v.shape
        h = horizon or self.horizon
        if h > self.horizon:
            raise ValueError(f"this model forecasts {self.horizon} steps, {h} asked")
        if self._backcasts() > 0 or self.cfg is None or length < self.min_history() or n == 0:
            ser = [Series(str(i), v[i], step=step, start=start, season=season) for i in range(n)]
            return self.predict(ser, h)
        L = self.cfg.context_length
        ctx = v[:, -L:] if length >= L else np.concatenate([np.repeat(v[:, :1], L - length, axis=1), v], axis=1)
        cov = np.broadcast_to(
            covariates(Series("", v[0], step=step, start=start, season=season), length), (n, N_COVARIATES)
        )
        q = self._forward(ctx, np.ascontiguousarray(cov), _anchors(v, self.cfg))
        q = apply_calibration(q[:, :h, :], self.calibration)
        nonneg = v.min(axis=1) >= 0
        q[nonneg] = np.maximum(q[nonneg], 0.0)
        return q

    # -- persistence ----------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": 1,
            "kind": self.kind,
            "horizon": self.horizon,
            "model": self.cfg.to_dict() if self.cfg else None,
            "train": asdict(self.train_cfg),
            "calibration": [float(c) for c in self.calibration],
            "recent_windows": self.recent_windows,
            "quantiles": list(QUANTILES),
            "fit": asdict(self.report),
        }
        if self.model is not None:
            tmp = d / "weights.pt.tmp"
            torch.save(self.model.state_dict(), tmp)
            tmp.replace(d / "weights.pt")
        (d / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> NeuralForecaster:
        d = Path(directory)
        try:
            meta = json.loads((d / "model.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{d}: cannot read model.json: {e}") from e
        if meta.get("format") != 1 or list(meta.get("quantiles", [])) != list(QUANTILES):
            raise ModelLoadError(f"{d}: model format {meta.get('format')!r} / quantiles do not match this version")
        try:
            f = cls(
                meta["kind"],
                int(meta["horizon"]),
                train=TrainConfig(**meta["train"]),
                recent_windows=int(meta.get("recent_windows", 4)),
            )
            f.calibration = np.asarray(meta["calibration"], dtype=np.float64)
            f.report = FitReport(**meta["fit"])
            if meta["model"] is not None:
                f.cfg = ModelConfig(**meta["model"])
                f.model = build_model(f.cfg)
                state = torch.load(d / "weights.pt", map_location="cpu", weights_only=True)
                f.model.load_state_dict(state)
                f.model.eval()
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{d}: cannot load the model: {type(e).__name__}: {e}") from e
        return f


@dataclass
class _TrainingRun:
    """How far one training run went, and the best weights it has seen."""

    best_loss: float = float("inf")
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    def keep(self, model: QuantileForecaster, loss: float, step: int) -> None:
        self.best_loss, self.best_step = loss, step
        self.best_weights = {k: v.clone() for k, v in model.state_dict().items()}


def _hold_out(
    train: Sequence[Series], cfg: ModelConfig, fraction: float
) -> tuple[list[Series], list[tuple[Series, int]]]:
    """Each series' head to train on, and the forecast origins in its held-out tail; a series
    too short to spare a tail is trained on whole."""
    L, H = cfg.context_length, cfg.horizon
    fit_parts: list[Series] = []
    val: list[tuple[Series, int]] = []  # (series, origin)
    for s in train:
        hold = max(H, int(len(s) * fraction))
        if len(s) - hold < L // 2 + H:
            hold = 0
        fit_parts.append(s.head(len(s) - hold))
        stride = max(1, (hold - H + 1) // 256)  # many origins: the calibration needs points
        val.extend((s, o) for o in range(len(s) - hold, len(s) - H + 1, stride))
    return fit_parts, val


def _warmup_cosine(opt: torch.optim.Optimizer, n_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over a tenth of the steps, then cosine decay to a tenth of the peak rate."""
    warm = max(1, n_steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            (i + 1) / warm
            if i < warm
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, n_steps - warm)))
        ),
    )


def _anchors(histories: Sequence[FloatArray] | FloatArray, cfg: ModelConfig) -> FloatArray | None:
    """(N, H, Q): seasonal naive's quantiles after each history (a list, or an (N, T) array of
    histories of one length), the forecast an anchored model corrects - its band from the
    history's seasonal errors, not the context's alone; None unanchored."""
    if cfg.anchor_season <= 1:
        return None
    if isinstance(histories, np.ndarray) and histories.ndim == 2:
        return seasonal_naive_rows(histories, cfg.anchor_season, cfg.horizon)
    if not len(histories):
        return np.zeros((0, cfg.horizon, len(QUANTILES)))
    return np.stack([seasonal_naive_quantiles(h, cfg.anchor_season, cfg.horizon) for h in histories])


def _context(v: FloatArray, length: int) -> FloatArray:
    if v.size >= length:
        return v[-length:]
    return np.concatenate([np.full(length - v.size, v[0] if v.size else 0.0), v])

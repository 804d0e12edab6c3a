"""Each scaling policy's settings, typed, with their defaults in one place (pure).

A policy's `config` mapping (`ProtocolPlan.policy_config`, the config file's
`protocols[].policy_config`, what `apsv evaluate` and the simulator pass) is read through the
policy's dataclass here, in the manner of Ray Serve's `AutoscalingConfig`: every key a policy
takes is a field with its default, a key it does not take is refused with its name and the
known ones, and a value of the wrong type or range is refused with the field's name.
`ray_serve` takes Ray's own `AutoscalingConfig` (`apsv/scaling/ray_serve.py` checks it).

The fields of `Common` are what callers add to every policy's config: the decision interval,
and what the SLO's queueing model needs (`apsv.scaling.policy.slo_utilization`).
"""

from __future__ import annotations

import copy
import math
import threading
import types
import typing
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from apsv.scaling.skill import SkillConfig


@dataclass(frozen=True)
class Common:
    interval_s: float = 1.0  # seconds between decisions
    # one message's service time, where the capacity is counted in other units (a replayed
    # trace: the VPSM counts trace messages, an instance serves live ones); None: 1 / capacity
    service_ms: float | None = None
    fixed_latency_ms: float = 0.0  # what every message has whatever the load (transport, batching)
    slo_fraction: float = 0.8  # the share of the SLO queueing may take at the target utilization


@dataclass(frozen=True)
class Static(Common):
    instances: int | None = None  # a fixed count; None: sized for `peak_load`
    peak_load: float | None = None  # None: the highest load in the history
    target_utilization: float = 0.7


@dataclass(frozen=True)
class Reactive(Common):
    target_utilization: float = 0.7
    upscale_smoothing: float = 1.0
    downscale_smoothing: float = 0.5
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0


@dataclass(frozen=True)
class Threshold(Common):
    target_cpu: float = 0.7
    tolerance: float = 0.1  # HPA's: a ratio within 10 % of 1 changes nothing
    stabilization_s: float = 300.0  # HPA's scale-down window


@dataclass(frozen=True)
class Oracle(Common):
    target_utilization: float = 0.9
    hold_s: float = 20.0  # provisioned this long past the lead time (no drain just before a need)


@dataclass(frozen=True)
class Fixed(Common):
    instances: int | None = None  # None: the current count


@dataclass(frozen=True)
class Predictive(Common):
    quantile: str = "p90"  # the forecast quantile provisioned for
    target_utilization: float = 0.8
    dwell_s: float = 5.0
    backlog_s: float = 2.0
    backlog_tolerance_s: float = 0.05
    max_forecast_ratio: float = 3.0
    recent_s: int = 60
    live_band: float = 0.5
    table_transfer_s: float = 20.0
    stabilization_s: float = 60.0  # the scale-in window, whatever the trust (the HPA baseline's)
    hold_decisions: int = 2
    scale_tolerance: float = 0.1
    min_lifetime_s: float = 60.0
    margin: float | None = None  # the band's width over the model's; None: calibrated online
    trust: float | None = None  # a fixed trust in the forecast; None: measured (`skill`)
    hedge_below: float = 0.0  # under this trust, the most any fallback rule asks (0: off)
    skill_level: float | None = None  # the level the skill is scored at; None: the quantile's
    skill_halflife: float = SkillConfig.halflife  # (apsv.scaling.skill says what each means)
    skill_min_evidence: float = SkillConfig.min_evidence
    skill_full_at: float = SkillConfig.full_at
    skill_coverage_floor: float = SkillConfig.cov_zero
    # the reactive rule(s) the forecast is weighed against, and their settings (one rule's, or
    # with several a mapping by name); `apsv.scaling.predictive.fallbacks` reads these
    fallback: str | list[str] | None = None
    fallback_config: dict[str, Any] | None = None


SETTINGS: dict[str, type[Common]] = {
    "static": Static,
    "reactive": Reactive,
    "threshold": Threshold,
    "oracle": Oracle,
    "fixed": Fixed,
    "predictive": Predictive,
}
_FRACTIONS = {"slo_fraction", "target_utilization", "tolerance", "scale_tolerance", "live_band", "trust"}
_FRACTIONS |= {"skill_full_at", "skill_coverage_floor", "skill_level", "hedge_below"}

S = TypeVar("S", bound=Common)
T = TypeVar("T")


def parse(cls: type[S], config: Mapping[str, Any], policy: str = "") -> S:
    """`config` as `cls`; ValueError naming the field that is unknown or wrong. Parsed once per
    config object while its contents stay the same (`cached`)."""
    return cached((cls, policy), config, lambda: _parse(cls, config, policy))


def _parse(cls: type[S], config: Mapping[str, Any], policy: str) -> S:
    known = {f.name: f for f in fields(cls)}
    name = policy or cls.__name__.lower()
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a setting of the {name} policy (known: {', '.join(sorted(known))})")
    hints = _hints(cls)
    values = {k: _value(k, v, hints[k]) for k, v in config.items()}
    return cls(**values)


# Settings (and what else is derived from a config alone) by (what was built, id(config)): a
# policy reads its settings at every decision (thousands in a simulated run), from the same config
# object. An entry holds the object, so that its id is not reused while cached, and a deep
# snapshot of it, and serves only while the object still matches the snapshot: a config is a
# mutable dict, and one changed since is parsed again (an invalid one raises again). Bounded,
# least recently used out first: each entry keeps its config alive, and a caller may pass a new
# config object at every decision.
_CACHE: OrderedDict[tuple[Any, ...], tuple[Mapping[str, Any], dict[str, Any], Any]] = OrderedDict()
_CACHE_SIZE = 256
_CACHE_LOCK = threading.Lock()  # (policies run on one thread; the module does not assume it)


def cached(kind: tuple[Any, ...], config: Mapping[str, Any], build: Callable[[], T]) -> T:
    """`build()`, a value derived from `config` alone, built once per config object while its
    contents stay the same; `kind` names what is built (no two builders share one)."""
    key = (*kind, id(config))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is config and _unchanged(hit[1], config):
            _CACHE.move_to_end(key)
            return typing.cast(T, hit[2])
    value = build()  # raises before anything is cached
    try:
        snapshot = {k: copy.deepcopy(v) for k, v in config.items()}
    except (TypeError, copy.Error):  # a value that cannot be copied: not cached
        return value
    with _CACHE_LOCK:
        _CACHE[key] = (config, snapshot, value)
        _CACHE.move_to_end(key)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def _unchanged(snapshot: dict[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether `config` still equals `snapshot`, the types of its values included (1, 1.0 and
    True are equal and parse differently; nested values are not read by type)."""
    try:
        return snapshot == config and tuple(map(type, snapshot.values())) == tuple(map(type, config.values()))
    except (TypeError, ValueError):  # a value without a truth value for ==, an array: parsed again
        return False


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """A settings class's field types (resolved once: the annotations are strings)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _value(key: str, v: Any, hint: Any) -> Any:
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if v is None:
        if type(None) in kinds:
            return None
        raise ValueError(f"{key}: a value is needed")
    for kind in kinds:
        if kind is float and isinstance(v, int | float) and not isinstance(v, bool):
            x = float(v)
            if not math.isfinite(x) or x < 0 or (key in _FRACTIONS and x > 1):
                rng = "a number in 0..1" if key in _FRACTIONS else "a finite number >= 0"
                raise ValueError(f"{key}: expected {rng}, got {v!r}")
            return x
        if kind is int and isinstance(v, int | float) and not isinstance(v, bool):
            if v < 0 or not float(v).is_integer():
                raise ValueError(f"{key}: expected a whole number >= 0, got {v!r}")
            return int(v)
        if kind is str and isinstance(v, str):
            return v
        origin = typing.get_origin(kind)
        if origin is list and isinstance(v, list | tuple):
            return list(v)
        if origin is dict and isinstance(v, Mapping):
            return dict(v)
    want = " or ".join(_kind_name(k) for k in kinds if k is not type(None))
    raise ValueError(f"{key}: expected {want}, got {v!r}")


def _kind_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return {float: "a number", int: "a whole number", str: "a string"}.get(kind, str(kind))


_COMMON = frozenset(f.name for f in fields(Common))


def common(config: Mapping[str, Any]) -> Common:
    """The settings every policy shares, out of any policy's config (cached on `config`
    itself: the subset parsed is a new mapping each time)."""
    return cached(
        ("common",), config, lambda: _parse(Common, {k: v for k, v in config.items() if k in _COMMON}, "common")
    )


def check(policy: str, config: Mapping[str, Any]) -> None:
    """ValueError naming what is wrong in `config` for `policy` (a policy without a settings
    class here - `ray_serve`, which Ray checks - passes)."""
    cls = SETTINGS.get(policy)
    if cls is not None:
        parse(cls, config, policy)

"""Loading a configuration: YAML, environment overrides, and one line per problem naming the
file (or variable), the field's path and the reason."""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from apsv.config.sections import CONFIG_ENV, DEFAULTS_SOURCE, ENV_PREFIX, ApsvConfig, ConfigError
from apsv.errors import field_path
from apsv.sizes import format_size

if typing.TYPE_CHECKING:  # the runtime (and Ray) are imported only when plans are built
    pass


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The section model inside an annotation (X, X | None, list[X], Annotated[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is None and not isinstance(annotation, types.UnionType):
        return None
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = ApsvConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _submodel(field.annotation) if field is not None else None
    return model


def _kind(x: Any) -> str:
    return "null" if x is None else f"{type(x).__name__} {x!r}"[:60]


def _message(err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        model = _model_at(loc[:-1])
        if model is not None:
            known = list(model.model_fields)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return f"unknown field ({hint}known: {', '.join(known)})"
        return "unknown field"
    if err["type"] == "missing":
        return "required field missing"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of fields, not {_kind(err.get('input'))}"
    if err["type"] == "list_type":
        return f"expected a list, not {_kind(err.get('input'))}"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


# libyaml's safe loader where PyYAML was built with it (10x faster), else the Python one
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (octet {e.start})"]) from None
    return yaml_sections(text, str(path))


def yaml_sections(text: str, source: str) -> dict[str, Any]:
    """The configuration mapping a YAML text holds; ConfigError naming `source` otherwise."""
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{source}: not valid YAML: {where}{problem}"]) from None
    if data is None:  # an empty file: every default
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: (top level): expected a mapping of sections (ray, protocols, ...), not {_kind(data)}"]
        )
    return data


def _apply_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[Any, ...], str]:
    """Apply APSV__A__B=value variables to `data` in place; returns each set path -> variable."""
    applied: dict[tuple[Any, ...], str] = {}
    problems: list[str] = []
    defaults: dict[str, Any] | None = None
    for var in sorted(k for k in env if k.startswith(ENV_PREFIX)):
        raw = env[var]
        label = f"environment {var}={raw[:40]!r}"
        parts = var[len(ENV_PREFIX) :].split("__")
        if not parts or any(not p for p in parts):
            problems.append(f"{label}: expected APSV__<SECTION>__<FIELD> (names and list indices, '__' between them)")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"{label}: not a YAML value: {getattr(e, 'problem', None) or e}")
            continue
        path: list[Any] = [int(p) if p.isdigit() else p.lower() for p in parts]
        node: Any = data
        ok = True
        for depth, key in enumerate(path[:-1]):
            here = field_path(tuple(path[:depth])) if depth else "(top level)"
            nxt = path[depth + 1]
            if isinstance(node, dict) and not isinstance(key, int):
                if key not in node:
                    if depth == 0 and key in ApsvConfig.model_fields:
                        # a section the file left out: start from its defaults (protocols: [bgp])
                        defaults = defaults or ApsvConfig().model_dump(mode="json")
                        node[key] = defaults[key]
                    else:
                        node[key] = [] if isinstance(nxt, int) else {}
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int):
                if key == len(node):  # one past the end: a new entry (APSV__PROTOCOLS__1__PROTOCOL=bfd)
                    node.append({})
                elif key > len(node):
                    problems.append(f"{label}: {here} has {len(node)} entries: index {key} is past the end")
                    ok = False
                    break
                node = node[key]
            else:
                kind = "list (use an index)" if isinstance(node, list) else "value, not a section"
                problems.append(f"{label}: {here} is a {kind}")
                ok = False
                break
        if not ok:
            continue
        last = path[-1]
        if isinstance(node, dict) and not isinstance(last, int):
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last <= len(node):
            if last == len(node):
                node.append(value)
            else:
                node[last] = value
        else:
            what = "a list (use an index)" if isinstance(node, list) else "a value, not a section"
            problems.append(f"{label}: {field_path(tuple(path[:-1]))} is {what}")
            continue
        applied[tuple(path)] = var
    if problems:
        raise ConfigError(problems)
    return applied


def _source_of(
    loc: tuple[Any, ...],
    applied: Mapping[tuple[Any, ...], str],
    env: Mapping[str, str],
    source: str,
    related: str | None = None,
) -> str:
    """The environment variable that set this field (or a section above it) - or, for a check
    against a sibling field (`related`), that sibling's variable - else the file."""
    locs = [loc] + ([(*loc[:-1], related)] if related and loc else [])
    for where in locs:
        for n in range(len(where), 0, -1):
            var = applied.get(where[:n])
            if var is not None:
                return f"environment {var}={env[var][:40]!r}"
    return source


def parse_config(
    data: Mapping[str, Any], source: str = DEFAULTS_SOURCE, *, env: Mapping[str, str] | None = None
) -> ApsvConfig:
    """Validate a configuration mapping (environment overrides applied on top)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = _deepcopy(dict(data))
    applied = _apply_overrides(merged, env)
    try:
        cfg = ApsvConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(
            [
                f"{_source_of(tuple(err['loc']), applied, env, source, (err.get('ctx') or {}).get('related'))}: "
                f"{field_path(tuple(err['loc']))}: {_message(err)}"
                for err in e.errors()
            ]
        ) from None
    problems = []
    seen: dict[str, int] = {}
    for i, p in enumerate(cfg.protocols):
        loc: tuple[Any, ...] = ("protocols", i, "protocol")
        if p.protocol in seen:
            problems.append(
                f"{_source_of(loc, applied, env, source)}: {field_path(loc)}: {p.protocol!r} already configured "
                f"at protocols[{seen[p.protocol]}]"
            )
        seen.setdefault(p.protocol, i)
        if p.policy == "predictive" and not cfg.forecaster.enabled:
            loc = ("protocols", i, "policy")
            problems.append(
                f"{_source_of(loc, applied, env, source)}: {field_path(loc)}: 'predictive' scales on forecasts: "
                "set forecaster.enabled: true"
            )
    if problems:
        raise ConfigError(problems)
    cfg._source = source
    return cfg


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> ApsvConfig:
    """Read and check the configuration: `path`, else $APSV_CONFIG, else the built-in defaults
    (one BGP protocol, process backend, reactive policy, a local Ray head); then the
    ``APSV__...`` environment overrides. Raises ConfigError naming each problem's place."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    if path is None:
        return parse_config({}, DEFAULTS_SOURCE, env=env)
    p = Path(path)
    return parse_config(_read_yaml(p), str(p), env=env)


def dump_config(cfg: ApsvConfig) -> str:
    """The configuration as YAML, every default filled in (what `apsv config` prints)."""
    data = cfg.model_dump(mode="json")
    for proto in data["protocols"]:
        alloc = proto["allocation"]
        alloc["memory"] = format_size(alloc["memory"])
        alloc["buffer_quota"] = format_size(alloc["buffer_quota"])
    if data["ray"]["object_store_memory"] is not None:
        data["ray"]["object_store_memory"] = format_size(data["ray"]["object_store_memory"])
    text: str = yaml.safe_dump(data, sort_keys=False)
    return text

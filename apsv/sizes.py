"""Sizes as a configuration writes them (512MiB, 8 MiB, 1G, 4096) and as messages print them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Octets from an int or a string such as '512MiB', '8 MiB', '1.5GiB', '64k', '4096'."""
    if isinstance(value, bool):  # YAML `yes`/`true` is not a size
        raise PydanticCustomError(
            "size", "expected a size such as 512MiB or a number of bytes, not {value}", {"value": repr(value)}
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if n.is_integer():
                return int(n)
    raise PydanticCustomError(
        "size",
        "{value} is not a size (a number of bytes, or a number with B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
        {"value": repr(value)},
    )


Size = Annotated[int, BeforeValidator(parse_size)]


def format_size(n: int) -> str:
    for unit, k in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)

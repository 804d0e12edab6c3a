"""Errors shared by APSV's codecs and configuration loaders."""

from __future__ import annotations

from typing import Any


def field_path(loc: tuple[Any, ...]) -> str:
    """A validation error's location as an operator writes it: `protocols[1].allocation.cpu`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


class DecodeError(ValueError):
    """Bad bytes in a container format (offload frame, MRT record, capture file, snapshot).

    The message says what was wrong and where (byte offset), so a bad input can be found.
    """

    def __init__(self, what: str, offset: int | None = None) -> None:
        self.what = what
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{what}{where}")

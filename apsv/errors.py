"""Errors shared by APSV's codecs and configuration loaders."""

from __future__ import annotations


class DecodeError(ValueError):
    """Bad bytes in a container format (offload frame, MRT record, capture file, snapshot).

    The message says what was wrong and where (byte offset), so a bad input can be found.
    """

    def __init__(self, what: str, offset: int | None = None) -> None:
        self.what = what
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{what}{where}")

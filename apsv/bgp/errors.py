"""Typed BGP protocol errors, each carrying the RFC 7606 / RFC 4271 action it requires.

A decoder never raises anything else for bad input: either a message comes out (possibly
marked treat-as-withdraw, or with attributes discarded, and the problems listed), or a
`BgpError` whose `action` says what the session must do and whose `code`/`subcode`/`data`
are the exact NOTIFICATION to send (RFC 4271 §6).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from apsv.bgp.constants import ERR_UPDATE, error_name


class Action(enum.Enum):
    """What RFC 7606 §2 says to do with an erroneous UPDATE (or RFC 4271 for other messages)."""

    NONE = "none"
    ATTRIBUTE_DISCARD = "attribute-discard"  # drop the attribute, keep the route
    TREAT_AS_WITHDRAW = "treat-as-withdraw"  # the UPDATE's NLRI become withdrawals
    SESSION_RESET = "session-reset"  # send NOTIFICATION, close the connection

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {
    Action.NONE: 0,
    Action.ATTRIBUTE_DISCARD: 1,
    Action.TREAT_AS_WITHDRAW: 2,
    Action.SESSION_RESET: 3,
}


class BgpError(Exception):
    """A protocol error that ends the session with a NOTIFICATION (code, subcode, data)."""

    action = Action.SESSION_RESET

    def __init__(self, code: int, subcode: int, data: bytes = b"", reason: str = "") -> None:
        self.code = code
        self.subcode = subcode
        self.data = bytes(data)
        self.reason = reason or error_name(code, subcode)
        super().__init__(f"{error_name(code, subcode)} ({code}/{subcode}): {self.reason}")


def update_error(subcode: int, data: bytes, reason: str) -> BgpError:
    """An UPDATE Message Error (RFC 4271 §6.3) that resets the session."""
    return BgpError(ERR_UPDATE, subcode, data, reason)


@dataclass(frozen=True, slots=True)
class AttributeProblem:
    """One malformed attribute found in an UPDATE that did not require a session reset.

    `code`/`subcode`/`data` are what RFC 4271 would have sent, kept for logs and counters.
    """

    action: Action
    type_code: int
    reason: str
    code: int = 3
    subcode: int = 0
    data: bytes = b""

    def describe(self) -> str:
        return f"{self.action.value}: attribute {self.type_code}: {self.reason}"

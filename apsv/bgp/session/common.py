"""What the parts of a BGP session share: its constants and the family type."""

from __future__ import annotations

from apsv.bgp import constants as C
from apsv.bgp.fsm import Event

Family = tuple[int, int]
LARGE_HOLD_TIME = 240.0  # RFC 4271 §8.2.2: "a large value", suggested 4 minutes
BFD_FLAP_WINDOW_S = 600.0  # BFD downs within this long damp re-establishment (RFC 5882 §3.2)
BFD_FLAPS_KEPT = 16
# Counter names built once, not per message
FSM_EVENT_COUNTERS: dict[Event, str] = {ev: f"fsm_event_{int(ev)}" for ev in Event}
MESSAGES_IN_COUNTERS: dict[int, str] = {t: f"messages_in_{name}" for t, name in C.MESSAGE_NAMES.items()}

"""One BGP-4 session as a sans-I/O state machine.

`BgpSession` turns what the runtime tells it (the transport came up or went down, bytes
arrived, time passed) into what must happen (bytes to send, a transport to open or close,
state changes, best-path changes for the virtual router's FIB). The FSM rows come from
`apsv.bgp.fsm.TRANSITIONS`; this module performs their actions. Time is always passed in.

`BgpSession` (core.py) holds the state, takes the runtime's inputs and runs the FSM; it hands
the rest to functions of the session: actions.py (the FSM's actions, one table from action to
handler), receive.py (messages in, OPEN checked), updates.py (UPDATEs checked, imported, routes
deleted), restart.py (graceful restart, long-lived stale), adj_rib_out.py (what is announced),
route_maps.py (policy), bfd_client.py (BFD as the failure detector), inspection.py (what the
virtual router and the runtime read of it) and persist.py (snapshot and restore); common.py
holds their constants.
"""

from apsv.bgp.session.core import BgpSession

__all__ = ["BgpSession"]

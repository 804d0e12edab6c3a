"""The Intelligent Multiplexer (IM): the control plane of the offload path - no frame passes through it.

Like Ray Serve's controller, or a router's route processor programming its line cards: it
decides, the clients and instances forward.

* **Session table.** Every session has a record: the client that owns it, the instance that
  holds it and the route's epoch, raised on every move. New sessions go to the less loaded of two
  sampled instances (`apsv/scaling/placement.py`: power of two choices on live load).
* **Routes out.** A client learns its sessions' routes when it opens them and, whenever one
  changes, from its long poll (`watch`); an instance refuses frames sent by an outdated route
  (fencing, `host/fencing.py`) and says where the session went, so a client never needs the
  multiplexer on the way of a frame.
* **Moves** (rebalancing, drains): the source instance hands the sessions straight to the target
  (`StackInstance.hand_over`), between two batches; the multiplexer only picks who moves where and
  publishes the new routes.
* **Recovery.** Session state never sits here: each client holds its sessions' last snapshots
  and the frames since (`custody.py`). When an instance dies, its sessions are placed on the
  others as waiting (`expect_sessions`) and their clients restore them there; with no instance
  of the protocol left, they wait, unplaced, for the VPSM's replacement.
* **Tenants** (`tenancy.py`): a client registered for a tenant opens and reclaims only that
  tenant's sessions; per-tenant quotas bound the sessions open and the clients' buffers, and
  give each client the message rate it keeps to.
* **Surviving its own death.** Ray restarts it; it reads its plan (the instances) from Ray's KV
  store and rebuilds the session table from the instances themselves. Meanwhile every session
  flows on the routes its client holds; opening one waits (bounded) until it is back. A client
  whose sessions it no longer knows (their instance died while it was down) reclaims them.

The actor is one class, `Multiplexer` (actor.py: state, session table, opening and placing),
made of parts: clients.py (registration, the long poll, the client lease), moves.py, recovery.py
and inspection.py; records.py holds the records they share, base.py what each part may use.
"""

from apsv.runtime.multiplexer.actor import MAX_CONCURRENCY, Multiplexer, create_multiplexer
from apsv.runtime.multiplexer.clients import CLIENT_LEASE_S

__all__ = ["CLIENT_LEASE_S", "MAX_CONCURRENCY", "Multiplexer", "create_multiplexer"]

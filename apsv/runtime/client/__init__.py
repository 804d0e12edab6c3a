"""The client side of the offload path: a router in the caller's process, as in a Ray Serve handle.

`OffloadClient` is what an agent (or the replay driver) uses. The multiplexer - the control
plane - places its sessions and tells it where each one is (a route: instance and epoch, kept
current by a long poll, `routefeed.py`); from then on the client sends every batch straight to
the instances that hold its frames' sessions - one transfer per instance per batch, no central
actor on the way (`links.py`: a descriptor over a Unix socket into shared memory on the same
node, a direct Ray call through the object store across nodes).

It numbers each session's frames, writes them once into a buffer of its pool (read in place by
the instances), keeps a copy of every batch in custody (`custody.py`) until a snapshot from the
instance covers it, and hands back output frames once each, in order (`delivery.py`).

Fencing: a frame carries its route's epoch; an instance refuses frames for a session it does not
hold at that epoch (moved, restored elsewhere, waiting for its restore, or an earlier frame
missing) and says what it knows. The client then re-sends the session's frames from the first
refused one, from custody, by the route it now has - and where the route is not known, or the
session's instance died, it asks the multiplexer (`locate`) and restores the session from its
snapshot. Instances apply a session's frames strictly in sequence, so each is applied exactly
once, in order, across moves, drains, kills and restarts.

`OffloadClient` is one class (core.py: state, calls to the multiplexer, sending, waiting), made
of parts: replies.py (reading the links, refusals, re-sends) and routes.py (each session's
route and link, the route feed, relocation, load reports); base.py declares what each part may
use.
"""

from apsv.runtime.client.base import ClientStats
from apsv.runtime.client.core import OffloadClient

__all__ = ["ClientStats", "OffloadClient"]

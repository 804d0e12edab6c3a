"""The VPSM (virtual protocol stack manager): the control loop over the stack instances.

Each interval it reads every instance's load and resource use, writes a telemetry row per
instance, asks the protocol's scaling policy (a pure function, `apsv.scaling.policy`) how many
instances it wants, and makes it so:

* up: instantiate instances with a resource allocation (CPU, memory, buffer quota), wait until
  they are ready (the start latency is measured), register them with the multiplexer;
* down: pick the least-used instance, drain it - every live session moved elsewhere by
  snapshot, restore and reroute - then destroy it (deregister, stop the actor or container).

Session moves (drains, and the rebalancing after instances join or leave) run in a mover task
per protocol, not in the control step: a hand-over waits for the batch its source is applying,
and a drain or rebalance of many sessions takes many - time the loop needs to keep observing and
deciding, most of all when instances are overloaded. The mover runs its protocol's moves one job at a time, so
no session is moved by two jobs at once; operators' calls (`scale_to`, `drain`) wait for it.

It is a named, detached actor: it outlives the job that started it, and anyone can find it.
Ray restarts it if its process dies: it keeps its control state in Ray's KV store
(`apsv.runtime.persist`) - the instances it manages (detached actors, found again by name), its
policies' state and load history - and takes up the loop where it was. Meanwhile the instances
keep serving: nothing on the data path waits for the VPSM.

The actor is one class, `VPSM` (actor.py: state, persistence, lifecycle, the control step), made
of parts: instances.py (start, drain, destroy; the mover), observe.py (instance loads, telemetry,
forecasts) and inspection.py (status); plan.py holds what it runs per protocol, metrics.py its
Ray metrics, base.py what each part may use.
"""

from apsv.runtime.vpsm.actor import VPSM, VPSM_NAME, create_vpsm
from apsv.runtime.vpsm.inspection import cluster_figures
from apsv.runtime.vpsm.observe import FORECAST_STALE_STEPS
from apsv.runtime.vpsm.plan import Managed, ProtocolPlan

__all__ = ["FORECAST_STALE_STEPS", "VPSM", "VPSM_NAME", "Managed", "ProtocolPlan", "cluster_figures", "create_vpsm"]

"""Who may speak for a client on the data path: a credential per client, checked by instances.

The multiplexer names every client (`register_client`) and hands it a credential, the HMAC of
its name under the deployment's key. A client opens each data-plane connection (or makes each
cross-node call) with both; an instance checks the pair and from then on applies frames only to
the sessions that client owns. A client cannot claim another's name without its credential: tenants
stay apart at the instances, where their frames go.

The key is made once per deployment and kept in Ray's internal key-value store (the GCS), so a
restarted multiplexer issues the same credentials and instances started later can check them.
Every process holding the cluster's Ray token is inside the trust boundary: it could read the
key, as it could call any actor.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

KEY_BYTES = 32


def credential(key: bytes, client: str) -> bytes:
    return hmac.new(key, client.encode(), hashlib.sha256).digest()


def verify(key: bytes, client: str, cred: bytes) -> bool:
    return bool(client) and hmac.compare_digest(credential(key, client), cred)


def deployment_key(deployment: str) -> bytes:
    """The key of `deployment` ("namespace/multiplexer name") from Ray's internal KV, made on
    first use (Ray must be connected). It goes with the deployment's other keys
    (`apsv.runtime.persist.forget`)."""
    from ray.experimental import internal_kv

    name = f"apsv/{deployment}/client-key".encode()
    key: Any = internal_kv._internal_kv_get(name)
    if key is None:
        internal_kv._internal_kv_put(name, secrets.token_bytes(KEY_BYTES), overwrite=False)
        key = internal_kv._internal_kv_get(name)  # whoever wrote first won
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise RuntimeError(f"the client key of deployment {deployment!r} in Ray's KV is malformed")
    return key

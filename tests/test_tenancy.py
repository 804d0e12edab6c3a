"""Tenants: a client opens only its tenant's sessions, and each tenant's quotas hold (counted)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import ray

from apsv.frame import ProtocolId
from apsv.runtime.buffer_pool import BufferPool
from apsv.runtime.tenancy import TenantQuota, TenantQuotas, TokenBucket, client_name, tenant_of
from apsv.runtime.vpsm import ProtocolPlan

ECHO = int(ProtocolId.ECHO)


def test_a_client_name_carries_its_tenant() -> None:
    assert tenant_of(client_name(7)) == 7
    assert tenant_of(client_name(None)) is None
    assert tenant_of("x.7") is None and tenant_of("") is None
    assert client_name(7) != client_name(7)


def test_quotas_by_tenant_and_their_dict_form() -> None:
    q = TenantQuotas(TenantQuota(max_sessions=3), ((9, TenantQuota(max_messages_per_s=50.0)),))
    assert q.of(1).max_sessions == 3 and q.of(9).max_sessions is None and q.of(9).max_messages_per_s == 50
    assert q.of(None) == TenantQuota()  # an unbound client: no quota
    assert TenantQuotas.from_dict(q.to_dict()) == q and TenantQuotas.from_dict(None) == TenantQuotas()
    with pytest.raises(ValueError, match="max_sessions must be positive"):
        TenantQuota(max_sessions=0)


def test_token_bucket_holds_to_its_rate() -> None:
    b = TokenBucket(10.0)
    sent = 0
    while b.allows(0.0):
        b.take(0.0)
        sent += 1
    assert sent == 10 and b.held_back == 1  # one second's burst
    assert b.wait_s(0.0) == pytest.approx(0.1)
    assert not b.allows(0.05) and b.allows(0.1)
    b.take(0.1)
    steady = 0
    for t in range(1, 101):  # a sender trying every 10 ms for a second gets the rate, no more
        if b.allows(0.1 + t * 0.01):
            b.take(0.1 + t * 0.01)
            steady += 1
    assert steady == 10


@pytest.mark.ray
def test_multiplexer_binds_clients_to_their_tenant_and_holds_its_quotas(deployment: Any) -> None:
    from apsv.runtime.client import OffloadClient

    quotas = TenantQuotas(
        TenantQuota(max_sessions=3),
        ((9, TenantQuota(max_buffer_bytes=3 * (64 << 10), max_messages_per_s=50.0)),),
    )
    dep = deployment([ProtocolPlan("echo", min_instances=1, max_instances=1, policy="fixed")], tenants=quotas)
    im = dep.multiplexer
    a = OffloadClient(im, tenant=7)
    assert tenant_of(a.client_id) == 7
    placed = a.open_sessions([((7, 1, ECHO, s), "echo", {}, False) for s in range(1, 5)])
    errors = {k: v for k, v in placed.items() if v.startswith("error")}
    assert list(errors.values()) == ["error: tenant 7 is at its quota of 3 sessions"]
    # another tenant's session: refused, whatever its quota
    other = (8, 1, ECHO, 1)
    refused = a.open_sessions([(other, "echo", {}, False)])[other]
    assert refused.startswith("error: session (8, 1, 255, 1) is of tenant 8, not 7")
    # nor by reclaiming it (the path a client takes after a multiplexer restart)
    answer = ray.get(im.reclaim.remote(a.client_id, a.credential, [(other, "echo", 1)]))
    assert answer["routes"][other] is None
    # nor under another tenant's name: the credential signs the name
    with pytest.raises(PermissionError, match="credential refused"):
        ray.get(im.open_sessions.remote("8." + a.client_id.split(".")[1], a.credential, [(other, "echo", {}, 0)]))
    stats = ray.get(im.stats.remote())
    assert (stats["tenant_refusals"], stats["quota_refusals"]) == (2, 1)
    assert stats["tenant_sessions"] == {"7": 3}
    # a closed session frees its place in the quota
    a.close_sessions([(7, 1, ECHO, 1)])
    assert not a.open_sessions([((7, 1, ECHO, 4), "echo", {}, False)])[(7, 1, ECHO, 4)].startswith("error")
    # the operator's tools register without a tenant: any tenant's session, no quota
    op = OffloadClient(im)
    assert not op.open_sessions([(other, "echo", {}, False)])[other].startswith("error")
    op.close()
    a.close()

    # buffers: tenant 9's clients hold at most 3 x 64 KiB of pools together
    def pool() -> BufferPool:
        return BufferPool(slots=2, slot_bytes=64 << 10, shared=False)

    b = OffloadClient(im, pool(), tenant=9, transport="object_store")
    with pytest.raises(PermissionError, match="over its quota of 196608"):
        OffloadClient(im, pool(), tenant=9, transport="object_store")
    # messages: 50 a second, one second's burst; the client holds back the rest
    key = (9, 1, ECHO, 1)
    b.open_sessions([(key, "echo", {}, False)])
    sent = 0
    while b.can_send(8, key) and sent < 1000:
        b.send(key, b"12345678")
        sent += 1
    assert 50 <= sent < 60 and b.stats.rate_waits >= 1 and b.needs_polling()
    time.sleep(0.1)
    assert b.can_send(8, key)
    b.drain()
    b.close()
    assert ray.get(im.stats.remote())["quota_refusals"] == 2

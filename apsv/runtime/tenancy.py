"""Tenants: which client may open which sessions, and how much each tenant may use.

A client registers for one tenant (an agent for its configuration's `tenant`). The tenant is
part of the client's name, and the name is what the client's credential signs
(`credentials.credential`), so the binding needs no state of its own: it survives a
multiplexer restart and cannot be changed without the deployment's key. The multiplexer opens
and reclaims only that tenant's sessions for the client. A client registered without a tenant
(the operator's tools: replay, benchmarks, the demo) may open any tenant's sessions; it is
inside the same trust boundary as the Ray cluster (docs/security.md).

Quotas, per tenant (a default, and overrides for named tenants), each `None` for no limit:
- `max_sessions`: sessions open at once (the multiplexer refuses the rest);
- `max_buffer_bytes`: the buffer pools of the tenant's clients together (the multiplexer refuses
  a registration past it);
- `max_messages_per_s`: frames a client of the tenant sends into the cluster, as a token bucket
  of one second's burst (the client holds back the rest: an agent stops reading the session's
  socket, so TCP pushes back on the peer).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

_SEP = "."


@dataclass(frozen=True)
class TenantQuota:
    max_sessions: int | None = None
    max_buffer_bytes: int | None = None
    max_messages_per_s: float | None = None

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if v is not None and v <= 0:
                raise ValueError(f"tenant quota {name} must be positive (or null for no limit), not {v}")


@dataclass(frozen=True)
class TenantQuotas:
    default: TenantQuota = TenantQuota()
    tenants: tuple[tuple[int, TenantQuota], ...] = ()

    def of(self, tenant: int | None) -> TenantQuota:
        """The quota of `tenant` (None: an unbound client, which no quota limits)."""
        if tenant is None:
            return TenantQuota()
        return dict(self.tenants).get(tenant, self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"default": asdict(self.default), "tenants": {str(t): asdict(q) for t, q in self.tenants}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TenantQuotas:
        if not d:
            return cls()
        return cls(
            TenantQuota(**d.get("default", {})),
            tuple(sorted((int(t), TenantQuota(**q)) for t, q in d.get("tenants", {}).items())),
        )


def client_name(tenant: int | None) -> str:
    """A new client's name; it carries the tenant the client is registered for."""
    return uuid.uuid4().hex if tenant is None else f"{int(tenant)}{_SEP}{uuid.uuid4().hex}"


def tenant_of(client: str) -> int | None:
    """The tenant a client name was made for (None: an unbound client)."""
    head, sep, _ = client.partition(_SEP)
    return int(head) if sep and head.isdigit() else None


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `rate` held (one second's burst). The clock is passed in."""

    rate: float
    tokens: float = 0.0
    at: float = 0.0
    held_back: int = 0  # times `allows` said no

    def __post_init__(self) -> None:
        self.tokens = self.rate

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def allows(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            return True
        self.held_back += 1
        return False

    def take(self, now: float, n: int = 1) -> None:
        self._refill(now)
        self.tokens -= n

    def wait_s(self, now: float) -> float:
        """Seconds until the next token (0 when one is there)."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate)

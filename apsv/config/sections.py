"""The configuration's sections: one pydantic model per section, every field typed, bounded
and documented (docs/configuration.md); unknown fields refused."""

from __future__ import annotations

import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from apsv.capacity import Demand, fit_warnings
from apsv.sizes import Size

if typing.TYPE_CHECKING:  # the runtime (and Ray) are imported only when plans are built
    from apsv.runtime.instance import Allocation
    from apsv.runtime.roles import Roles
    from apsv.runtime.tenancy import TenantQuota, TenantQuotas
    from apsv.runtime.vpsm import ProtocolPlan

ENV_PREFIX = "APSV__"
CONFIG_ENV = "APSV_CONFIG"
DEFAULTS_SOURCE = "(defaults)"

# p99 message-latency objectives by protocol (a BFD detection budget is tens of milliseconds).
DEFAULT_SLO_MS = {"bgp": 100.0, "bfd": 10.0}
FALLBACK_SLO_MS = 100.0

# `ray start` refuses a port of its own in the range it leaves to workers (--min/max-worker-port).
RAY_WORKER_PORTS = (10002, 19999)
# A local head's stable ports (outside Ray's worker range and Linux's ephemeral range)
DEFAULT_METRICS_EXPORT_PORT = 28080
DEFAULT_CLIENT_SERVER_PORT = 28001
DEFAULT_DASHBOARD_AGENT_PORT = 28052

# Unix socket paths (<temp_dir>/session_<date>_<pid>/sockets/raylet) are limited to 107 octets.
MAX_TEMP_DIR_LEN = 48


class ConfigError(ValueError):
    """A configuration APSV refuses. Each entry of `problems` names the file (or environment
    variable), the field path and the reason; the message is those lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the APSV configuration:\n  " + "\n  ".join(self.problems)
        super().__init__(msg)


Port = Annotated[int, Field(ge=1024, le=65535)]


def _ip_or_localhost(v: str) -> str:
    if v == "localhost":
        return v
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise PydanticCustomError("address", "{v} is not an IP address (or localhost)", {"v": repr(v)}) from None


# ------------------------------------------------------------------------------------------------
# The sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RaySection(_Section):
    """The Ray cluster: join one (`address`) or have `apsv up` start a local head."""

    address: str | None = None
    port: Port | None = None  # the local head's GCS port; null: a free one
    num_cpus: Annotated[int, Field(ge=1, le=4096)] | None = None  # null: Ray counts the cores
    object_store_memory: Annotated[Size, Field(ge=75 << 20)] | None = None  # Ray's minimum is 75 MiB
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    temp_dir: str | None = None  # null: a new /tmp/apsv-ray-XXXXXXXX
    # The local head's node address. Loopback keeps every listener Ray can bind on 127.0.0.1
    # (a single-node cluster); another address admits worker nodes and binds all interfaces.
    node_ip_address: Annotated[str, BeforeValidator(_ip_or_localhost)] = "127.0.0.1"
    include_dashboard: bool = True
    dashboard_host: Annotated[str, BeforeValidator(_ip_or_localhost)] = "127.0.0.1"
    dashboard_port: Port = 8265
    # Stable ports, so that a Prometheus configuration and firewall rules outlive an `apsv down`
    # and `up`: the node's metrics endpoint, Ray's client server and the dashboard agent's HTTP
    # port (job submission). null: a free port, different on every `up`.
    metrics_export_port: Port | None = DEFAULT_METRICS_EXPORT_PORT
    client_server_port: Port | None = DEFAULT_CLIENT_SERVER_PORT
    dashboard_agent_port: Port | None = DEFAULT_DASHBOARD_AGENT_PORT
    namespace: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = "apsv"
    auth_token_path: str | None = None  # null: local head: <state dir>/auth_token; remote: Ray's lookup

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise PydanticCustomError("address", "empty: use null to start a local head, or auto / host:port", {})
        return v

    @field_validator("port", "dashboard_port", "metrics_export_port", "client_server_port", "dashboard_agent_port")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        if v is not None and RAY_WORKER_PORTS[0] <= v <= RAY_WORKER_PORTS[1]:
            raise PydanticCustomError(
                "port",
                "{v} is in the range Ray gives its workers ({lo}-{hi}): choose another",
                {"v": v, "lo": RAY_WORKER_PORTS[0], "hi": RAY_WORKER_PORTS[1]},
            )
        return v

    @field_validator("temp_dir")
    @classmethod
    def _temp_dir(cls, v: str | None) -> str | None:
        if v is None:
            return v
        p = os.path.expanduser(v)
        if not os.path.isabs(p):
            raise PydanticCustomError("path", "{v}: must be an absolute path", {"v": repr(v)})
        if len(p) > MAX_TEMP_DIR_LEN:
            raise PydanticCustomError(
                "path",
                "{v} is longer than {n} characters (Ray's Unix socket paths under it are length-limited)",
                {"v": repr(v), "n": MAX_TEMP_DIR_LEN},
            )
        return p


class AllocationSection(_Section):
    """What each instance of the protocol gets (`apsv.runtime.instance.Allocation`)."""

    cpu: Annotated[float, Field(gt=0, le=256)] = 0.5
    memory: Annotated[Size, Field(ge=16 << 20)] = 512 << 20
    buffer_quota: Annotated[Size, Field(ge=64 << 10)] = 8 << 20
    max_sessions: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    # docker backend: an unanswered call past this ends the instance (its sessions move)
    call_deadline_s: Annotated[float, Field(ge=1, le=3600)] = 30.0

    def allocation(self) -> Allocation:
        from apsv.runtime.instance import Allocation

        return Allocation(
            cpu=self.cpu,
            memory_bytes=self.memory,
            buffer_quota_bytes=self.buffer_quota,
            max_sessions=self.max_sessions,
            call_deadline_s=self.call_deadline_s,
        )


class ProtocolSection(_Section):
    """One protocol's stack instances: where they run, how many, how they scale."""

    protocol: str
    backend: Literal["process", "docker"] = "process"
    min_instances: Annotated[int, Field(ge=1, le=1024)] = 1
    max_instances: Annotated[int, Field(ge=1, le=1024)] = 8
    policy: str = "reactive"
    policy_config: dict[str, Any] = Field(default_factory=dict)
    capacity_per_instance: Annotated[float, Field(gt=0)] = 20_000.0
    slo_ms: Annotated[float, Field(gt=0)] | None = None  # null: the protocol's default (BGP 100, BFD 10)
    season: Annotated[int, Field(ge=1, le=100_000)] = 60
    allocation: AllocationSection = Field(default_factory=AllocationSection)

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        from apsv.stacks.interface import REGISTRY

        known = REGISTRY.names()
        if v not in known:
            raise PydanticCustomError(
                "protocol",
                "unknown protocol {v} (registered stacks: {known})",
                {"v": repr(v), "known": ", ".join(known)},
            )
        return v

    @field_validator("max_instances")
    @classmethod
    def _max(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("min_instances")  # absent when min_instances itself was refused
        if lo is not None and v < lo:
            raise PydanticCustomError(
                "bounds", "must be >= min_instances ({lo})", {"lo": lo, "related": "min_instances"}
            )
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        from apsv.scaling.policy import POLICIES

        if v not in POLICIES:
            raise PydanticCustomError(
                "policy",
                "unknown scaling policy {v} (known: {known})",
                {"v": repr(v), "known": ", ".join(sorted(POLICIES))},
            )
        return v

    @field_validator("policy_config")
    @classmethod
    def _policy_config(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if info.data.get("policy") == "ray_serve":  # Ray's AutoscalingConfig says what it takes
            from apsv.scaling.ray_serve import autoscaling_config

            try:
                autoscaling_config(v, 1, 1)
            except ValueError as e:
                raise PydanticCustomError("policy_config", "{why}", {"why": str(e)}) from None
        policy = info.data.get("policy")
        if policy is not None and policy != "ray_serve":  # each policy's settings say what it takes
            from apsv.scaling import settings
            from apsv.scaling.predictive import check_config

            try:
                check_config(v) if policy == "predictive" else settings.check(policy, v)
            except (TypeError, ValueError) as e:
                raise PydanticCustomError("policy_config", "{why}", {"why": str(e)}) from None
        return v

    @model_validator(mode="after")
    def _slo(self) -> ProtocolSection:
        if self.slo_ms is None:
            self.slo_ms = DEFAULT_SLO_MS.get(self.protocol, FALLBACK_SLO_MS)
        return self

    def plan(self) -> ProtocolPlan:
        from apsv.runtime.vpsm import ProtocolPlan

        return ProtocolPlan(
            protocol=self.protocol,
            backend=self.backend,
            min_instances=self.min_instances,
            max_instances=self.max_instances,
            allocation=self.allocation.allocation(),
            policy=self.policy,
            policy_config=dict(self.policy_config),
            capacity_per_instance=self.capacity_per_instance,
            slo_ms=float(self.slo_ms if self.slo_ms is not None else FALLBACK_SLO_MS),
            season=self.season,
        )


class PlacementSection(_Section):
    """Which nodes take which actors: the Ray custom resource of each role (apsv.runtime.roles).
    null: that role's actors go to any node."""

    control_plane: str | None = "control_plane"  # the multiplexer and the VPSM
    stack_host: str | None = "stack_host"  # stack instances (spread over these nodes)
    vrouter_host: str | None = "vrouter_host"  # agents run as actors

    def roles(self) -> Roles:
        from apsv.runtime.roles import Roles

        return Roles(self.control_plane, self.stack_host, self.vrouter_host)


class VpsmSection(_Section):
    """The control loop."""

    interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    telemetry_dir: str | None = None  # null: <state dir>/telemetry
    telemetry_retention_hours: Annotated[int, Field(ge=1)] | None = 168  # hour partitions kept; null: all


class MultiplexerSection(_Section):
    """The Intelligent Multiplexer."""

    # A client with no route watch out this long is taken for gone and its sessions are closed.
    client_lease_s: Annotated[float, Field(ge=5, le=86400)] = 60.0


class TenantQuotaSection(_Section):
    """What one tenant may use (apsv.runtime.tenancy); null: no limit."""

    max_sessions: Annotated[int, Field(ge=1)] | None = None
    max_buffer_bytes: Annotated[Size, Field(ge=4096)] | None = None  # its agents' buffer pools together
    max_messages_per_s: Annotated[float, Field(gt=0)] | None = None  # per agent, into the cluster

    def quota(self) -> TenantQuota:
        from apsv.runtime.tenancy import TenantQuota

        return TenantQuota(self.max_sessions, self.max_buffer_bytes, self.max_messages_per_s)


class TenantsSection(_Section):
    """Per-tenant quotas: `default` for every tenant, `quotas` for named ones (by tenant id)."""

    default: TenantQuotaSection = Field(default_factory=TenantQuotaSection)
    quotas: dict[Annotated[int, Field(ge=1, le=0xFFFFFFFF)], TenantQuotaSection] = Field(default_factory=dict)

    def tenant_quotas(self) -> TenantQuotas:
        from apsv.runtime.tenancy import TenantQuotas

        return TenantQuotas(self.default.quota(), tuple(sorted((t, q.quota()) for t, q in self.quotas.items())))


_VERSION = re.compile(r"^(current|v\d{4,})$")


class ForecasterSection(_Section):
    """The Traffic Prediction Engine as a Ray Serve application (apsv.forecast.serving)."""

    enabled: bool = False
    app_name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = "tpe"
    route_prefix: str | None = "/forecast"  # HTTP route; null: reachable by handle only
    # ModelRegistry root (jobs/retrain.py); a relative path is under the state dir
    # ($APSV_STATE_DIR, default ~/.apsv); null: seasonal naive
    registry: str | None = None
    version: str = "current"  # the registry's promoted version, or a pinned one (v0003)
    num_replicas: Annotated[int, Field(ge=1, le=64)] = 1
    num_cpus: Annotated[float, Field(ge=0, le=64)] = 1.0
    recent_windows: Annotated[int, Field(ge=0, le=64)] | None = None  # backcast calibration windows
    http_host: Annotated[str, BeforeValidator(_ip_or_localhost)] = "127.0.0.1"
    http_port: Port = 8000

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION.match(v):
            raise PydanticCustomError("version", "{v}: expected current or a version such as v0003", {"v": repr(v)})
        return v

    @field_validator("route_prefix")
    @classmethod
    def _route(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise PydanticCustomError("route", "{v}: must start with /", {"v": repr(v)})
        return v

    def registry_path(self, state_dir: Path) -> Path | None:
        if not self.registry:
            return None
        return state_dir / Path(os.path.expanduser(self.registry))  # (an absolute path stays as it is)

    def user_config(self, state_dir: Path) -> dict[str, Any]:
        """The Serve deployment's user_config (what ForecastCore.reconfigure reads)."""
        registry = self.registry_path(state_dir)
        cfg: dict[str, Any] = {"registry": str(registry) if registry else None}
        cfg["version"] = self.version
        if self.recent_windows is not None:
            cfg["recent_windows"] = self.recent_windows
        return cfg


def _default_protocols() -> list[ProtocolSection]:
    return [ProtocolSection(protocol="bgp")]


class ApsvConfig(_Section):
    """The whole configuration. `load_config` builds it; `plans()` is what the VPSM runs."""

    ray: RaySection = Field(default_factory=RaySection)
    protocols: Annotated[list[ProtocolSection], Field(min_length=1)] = Field(default_factory=_default_protocols)
    vpsm: VpsmSection = Field(default_factory=VpsmSection)
    multiplexer: MultiplexerSection = Field(default_factory=MultiplexerSection)
    placement: PlacementSection = Field(default_factory=PlacementSection)
    forecaster: ForecasterSection = Field(default_factory=ForecasterSection)
    tenants: TenantsSection = Field(default_factory=TenantsSection)

    _source: str = PrivateAttr(default=DEFAULTS_SOURCE)

    @property
    def source(self) -> str:
        """The file it was read from, or '(defaults)'."""
        return self._source

    def plans(self) -> list[ProtocolPlan]:
        return [p.plan() for p in self.protocols]

    def telemetry_root(self, state_dir: Path) -> Path:
        return Path(os.path.expanduser(self.vpsm.telemetry_dir)) if self.vpsm.telemetry_dir else state_dir / "telemetry"

    def demands(self, at: str = "max") -> list[Demand]:
        """What the deployment asks of the cluster with every protocol at its `max` (or `min`)
        instances, the forecaster's replicas included (the control plane asks for no CPU)."""
        out = [
            Demand(
                f"{p.protocol} instances",
                p.max_instances if at == "max" else p.min_instances,
                {"CPU": p.allocation.cpu, "memory": float(p.allocation.memory)},
            )
            for p in self.protocols
        ]
        if self.forecaster.enabled and self.forecaster.num_cpus > 0:
            out.append(Demand("the forecaster", self.forecaster.num_replicas, {"CPU": self.forecaster.num_cpus}))
        return out

    def local_head_resources(self) -> dict[str, float]:
        """What a local head `apsv up` starts offers (before Ray measures it): its CPUs, the
        host's memory less the object store, the configured custom resources."""
        import psutil

        mem = psutil.virtual_memory().total
        store = self.ray.object_store_memory if self.ray.object_store_memory is not None else int(mem * 0.3)
        return {
            "CPU": float(self.ray.num_cpus or os.cpu_count() or 1),
            "memory": float(max(0, mem - store)),
            **{k: float(v) for k, v in self.ray.resources.items()},
        }

    def fit_warnings(self, capacity: Mapping[str, float] | None = None, where: str = "") -> list[dict[str, str]]:
        """`capacity.fit_warnings` for this configuration at its max_instances: against
        `capacity`, else the local head it would start (none for a joined cluster: its
        resources are known only once connected)."""
        if capacity is None:
            if self.ray.address is not None:
                return []
            capacity, where = self.local_head_resources(), "the local head"
        return fit_warnings(self.demands("max"), capacity, where or "the cluster")

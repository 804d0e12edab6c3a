"""APSV's one configuration file (YAML): the Ray cluster, the protocols' stack instances, the VPSM
and the forecaster. Every field is documented in docs/configuration.md.

```yaml
ray:
  address: null              # null: `apsv up` starts a local head (loopback, token auth on)
  namespace: apsv
protocols:
  - protocol: bgp
    backend: process
    min_instances: 1
    max_instances: 4
    policy: reactive
    allocation: {cpu: 0.5, memory: 512MiB, buffer_quota: 8MiB, max_sessions: 10000}
vpsm:
  interval_s: 1.0
forecaster:
  enabled: false
```

`load_config` checks everything and refuses a configuration with one line per problem, each
naming the file (or the environment variable), the field's path and the reason:
``apsv.yaml: protocols[1].max_instances: must be >= min_instances (2)``. Unknown fields are
refused by name, so a misspelling never silently falls back to a default.

Environment variables override the file: ``APSV__<SECTION>__<FIELD>=value`` (a path of
double-underscore separated names or list indices, e.g. ``APSV__PROTOCOLS__0__MAX_INSTANCES=4``),
the value read as a YAML scalar (``null``, ``4``, ``0.5``, ``auto``, ``[1, 2]``).
``APSV_CONFIG`` names the file when none is given.

Modules: sections.py (the models, one per section) and loading.py (reading, overrides, errors).
"""

from apsv.config.loading import dump_config, load_config, parse_config, yaml_sections
from apsv.config.sections import (
    CONFIG_ENV,
    DEFAULT_CLIENT_SERVER_PORT,
    DEFAULT_DASHBOARD_AGENT_PORT,
    DEFAULT_METRICS_EXPORT_PORT,
    DEFAULT_SLO_MS,
    DEFAULTS_SOURCE,
    ENV_PREFIX,
    FALLBACK_SLO_MS,
    MAX_TEMP_DIR_LEN,
    RAY_WORKER_PORTS,
    AllocationSection,
    ApsvConfig,
    ConfigError,
    ForecasterSection,
    MultiplexerSection,
    PlacementSection,
    Port,
    ProtocolSection,
    RaySection,
    TenantQuotaSection,
    TenantsSection,
    VpsmSection,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULTS_SOURCE",
    "DEFAULT_CLIENT_SERVER_PORT",
    "DEFAULT_DASHBOARD_AGENT_PORT",
    "DEFAULT_METRICS_EXPORT_PORT",
    "DEFAULT_SLO_MS",
    "ENV_PREFIX",
    "FALLBACK_SLO_MS",
    "MAX_TEMP_DIR_LEN",
    "RAY_WORKER_PORTS",
    "AllocationSection",
    "ApsvConfig",
    "ConfigError",
    "ForecasterSection",
    "MultiplexerSection",
    "PlacementSection",
    "Port",
    "ProtocolSection",
    "RaySection",
    "TenantQuotaSection",
    "TenantsSection",
    "VpsmSection",
    "dump_config",
    "load_config",
    "parse_config",
    "yaml_sections",
]

"""The control loop's Ray metrics."""

from __future__ import annotations

from collections.abc import Mapping


class VpsmMetrics:
    """The control loop's Ray metrics (on the Prometheus endpoint with Ray's `ray_` prefix)."""

    def __init__(self, protocols: list[str]) -> None:
        from ray.util import metrics

        from apsv.runtime.metrics import start_at_zero

        self.n = metrics.Gauge(
            "apsv_instances",
            "Stack instances per protocol: running, pending (asked of Ray, not started) and draining",
            tag_keys=("protocol", "state"),
        )
        self.desired = metrics.Gauge(
            "apsv_instances_desired", "Stack instances the scaling policy wants per protocol", tag_keys=("protocol",)
        )
        self.load = metrics.Gauge(
            "apsv_protocol_load_msgs_per_s", "Messages/s per protocol, as the VPSM measures it", tag_keys=("protocol",)
        )
        self.p99 = metrics.Gauge(
            "apsv_protocol_latency_p99_ms",
            "p99 message latency per protocol over the last step",
            tag_keys=("protocol",),
        )
        self.forecast = metrics.Gauge(
            "apsv_forecast_msgs_per_s",
            "The forecast the policy reads: the next step's load per protocol and quantile",
            tag_keys=("protocol", "quantile"),
        )
        self.actions = metrics.Counter(
            "apsv_scale_actions_total", "Instances started (up) and drained (down)", tag_keys=("protocol", "direction")
        )
        self.trust = metrics.Gauge(
            "apsv_forecast_trust",
            "How far the predictive policy's last decision leaned on the forecast (0 reacts only, 1 fully proactive)",
            tag_keys=("protocol",),
        )
        self.tables = metrics.Gauge(
            "apsv_table_backlog_messages",
            "Messages of the tables peers that reset are expected to re-send (the leading indicator of a reset storm)",
            tag_keys=("protocol",),
        )
        self.forecaster_up = metrics.Gauge(
            "apsv_forecaster_available",
            "1 while the VPSM's forecasts come from the forecaster; 0 when it does not answer and the "
            "predictive policy reacts to the live load alone",
        )
        for p in protocols:  # "0 scale actions", not "no data", before the first one
            for direction in ("up", "down"):
                start_at_zero(self.actions, {"protocol": p, "direction": direction})

    def protocol(
        self,
        protocol: str,
        load: float,
        p99: float | None,
        forecast: Mapping[str, tuple[float, ...]] | None,
        tables: float = 0.0,
        trust: float | None = None,
    ) -> None:
        tags = {"protocol": protocol}
        self.load.set(load, tags)
        if trust is not None:
            self.trust.set(trust, tags)
        self.tables.set(tables, tags)
        if p99 is not None:
            self.p99.set(p99, tags)
        for q, values in (forecast or {}).items():
            if values:
                self.forecast.set(float(values[0]), {"protocol": protocol, "quantile": q})

    def forecaster(self, available: bool) -> None:
        self.forecaster_up.set(1.0 if available else 0.0)

    def instances(self, protocol: str, counts: Mapping[str, int], desired: int) -> None:
        for state, n in counts.items():
            self.n.set(float(n), {"protocol": protocol, "state": state})
        self.desired.set(float(desired), {"protocol": protocol})

    def action(self, protocol: str, direction: str, n: int) -> None:
        self.actions.inc(n, {"protocol": protocol, "direction": direction})

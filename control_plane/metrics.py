"""The control plane's Prometheus metrics (served on the HTTP port's `/metrics`).

One registry per control plane, so tests and embedded control planes never share counters.
Labels are the short xDS type names (`Listener`, `RouteConfiguration`, `Cluster`,
`ClusterLoadAssignment`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.connected_proxies = Gauge(
            "outrigger_xds_connected_proxies",
            "ADS streams currently open",
            registry=self.registry,
        )
        self.pushes = Counter(
            "outrigger_xds_pushes",
            "DiscoveryResponses sent, by type",
            ["type"],
            registry=self.registry,
        )
        self.push_latency = Histogram(
            "outrigger_xds_push_ack_seconds",
            "Time from sending a DiscoveryResponse to its ACK, by type",
            ["type"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.nacks = Counter(
            "outrigger_xds_nacks",
            "DiscoveryRequests that rejected a response (error_detail set), by type",
            ["type"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "outrigger_config_reloads",
            "Mesh configuration changes published as a new snapshot",
            registry=self.registry,
        )
        self.invalid_config_reloads = Counter(
            "outrigger_config_invalid_reloads",
            "Mesh configuration changes refused (the last good snapshot stays)",
            registry=self.registry,
        )

        self.invalid_annotations = Gauge(
            "outrigger_invalid_annotations_current",
            "Problems the source currently works around (invalid outrigger.dev/ annotations, a "
            "service in both the mesh file and the cluster), by the kind of object they are on",
            ["kind"],
            registry=self.registry,
        )
        self.invalid_annotations_seen = Counter(
            "outrigger_invalid_annotations",
            "Problems the source worked around, counted when each first appeared",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Telemetry: traces (`tracing`, `propagation`); metrics live in `sidecar.metrics`."""

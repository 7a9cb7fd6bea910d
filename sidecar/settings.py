"""`outrigger sidecar`'s settings: flags, a sidecar.yaml, and the defaults (Istio's ports).

Flags win over the file; the file's keys take dashes or underscores. A bad value is a
`SettingsError` naming the key and the form expected.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.address import split_host_port
from mesh.injection import InjectionError, LogLevel, read_log_level, read_sampling
from mesh.model import parse_duration

DEFAULTS: dict[str, str] = {
    "outbound": "127.0.0.1:15001",
    "inbound": "127.0.0.1:15006",
    "app": "127.0.0.1:8080",
    "admin": "127.0.0.1:15000",
    "drain_timeout": "20s",
    "initial_fetch_timeout": "10s",
    "namespace": "default",
    "log_level": "info",
    "detect_timeout": "100ms",
    "tcp_idle_timeout": "1h",
    "stream_idle_timeout": "5m",
}
SETTING_KEYS = (
    "mesh",
    "control_plane",
    "service",
    "namespace",
    "node_id",
    "outbound",
    "inbound",
    "app",
    "admin",
    "drain_timeout",
    "snapshot_cache",
    "access_log",
    "initial_fetch_timeout",
    "otlp_endpoint",
    "health",
    "metrics",
    "log_level",
    "trace_sampling",
    "detect_timeout",
    "tcp_idle_timeout",
    "stream_idle_timeout",
)


class SettingsError(ValueError):
    """A sidecar flag or sidecar.yaml key with a bad value; the message says which and why."""


def parse_address(key: str, value: str) -> tuple[str, int]:
    host, port = split_host_port(value) or ("", None)
    if not host or port is None:
        raise SettingsError(f"{key}: expected HOST:PORT (e.g. 127.0.0.1:15001), got {value!r}")
    return host, port


def parse_url(key: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise SettingsError(f"{key}: expected a URL like http://127.0.0.1:4317, got {value!r}")
    return value


def parse_seconds(key: str, value: str) -> float:
    seconds = parse_duration(value)
    if seconds is None:
        raise SettingsError(f"{key}: expected a duration like 250ms, 20s or 1m, got {value!r}")
    return seconds


def parse_optional_address(key: str, value: object) -> tuple[str, int] | None:
    """HOST:PORT, or None when not given (the listener is off)."""
    if value is None or value == "":
        return None
    return parse_address(key, str(value))


def parse_sampling(key: str, value: object) -> float | None:
    """A fraction 0..1 (mesh.injection's reader: the injector passes what it accepted)."""
    if value is None or value == "":
        return None
    try:
        return read_sampling(key, value)
    except InjectionError as exc:
        raise SettingsError(str(exc)) from None


def parse_log_level(key: str, value: object) -> LogLevel:
    try:
        return read_log_level(key, value)
    except InjectionError as exc:
        raise SettingsError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    service: str
    namespace: str
    node_id: str
    mesh: Path | None
    control_plane: str | None
    outbound: tuple[str, int]
    inbound: tuple[str, int]
    app: tuple[str, int]
    admin: tuple[str, int]
    drain_timeout: float
    snapshot_cache: Path | None
    access_log: bool
    initial_fetch_timeout: float = 10.0  # then the embedded default; 0: wait forever
    otlp_endpoint: str | None = None  # traces; else OTEL_EXPORTER_OTLP_* or the mesh file's
    health: tuple[str, int] | None = None  # /healthz/ready for kubelet probes (pod: 0.0.0.0:15021)
    metrics: tuple[str, int] | None = None  # /stats/prometheus for scrapes (pod: 0.0.0.0:15090)
    log_level: LogLevel = "info"
    trace_sampling: float | None = None  # overrides the xDS value when given
    detect_timeout: float = 0.1  # a redirected client silent this long is TCP
    tcp_idle_timeout: float = 3600.0  # passed-through TCP with no bytes either way (Envoy's 1h)
    # An HTTP/2 stream, a tunnel after a 101, or an upstream exchange with no bytes either way
    # (Envoy's stream_idle_timeout and its default); 0: off
    stream_idle_timeout: float = 300.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SidecarSettings:
        values: dict[str, Any] = {}
        if args.config:
            try:
                doc = yaml.safe_load(Path(args.config).read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise SettingsError(f"{args.config}: cannot read: {exc}") from None
            if not isinstance(doc, dict):
                raise SettingsError(f"{args.config}: expected a mapping of settings")
            for key, value in doc.items():
                norm = str(key).replace("-", "_")
                if norm not in SETTING_KEYS:
                    raise SettingsError(
                        f"{args.config}: unknown key {key!r}; allowed: {', '.join(SETTING_KEYS)}"
                    )
                values[norm] = value
        for key in SETTING_KEYS:
            flag = getattr(args, key, None)
            if flag is not None:
                values[key] = flag  # flags win over the file
        for key, value in DEFAULTS.items():
            values.setdefault(key, value)
        service = str(values.get("service") or "")
        if not service:
            raise SettingsError(
                "service: required (--service NAME): the service this sidecar fronts"
            )
        if values.get("mesh") and values.get("control_plane"):
            raise SettingsError(
                "mesh and control_plane: give one (standalone or managed), not both"
            )
        node_id = str(values.get("node_id") or f"{service}~{socket.gethostname()}~{os.getpid()}")
        return cls(
            service=service,
            namespace=str(values["namespace"]),
            node_id=node_id,
            mesh=Path(values["mesh"]) if values.get("mesh") else None,
            control_plane=str(values["control_plane"]) if values.get("control_plane") else None,
            outbound=parse_address("outbound", str(values["outbound"])),
            inbound=parse_address("inbound", str(values["inbound"])),
            app=parse_address("app", str(values["app"])),
            admin=parse_address("admin", str(values["admin"])),
            drain_timeout=parse_seconds("drain_timeout", str(values["drain_timeout"])),
            snapshot_cache=Path(values["snapshot_cache"]) if values.get("snapshot_cache") else None,
            access_log=bool(values.get("access_log")),
            initial_fetch_timeout=parse_seconds(
                "initial_fetch_timeout", str(values["initial_fetch_timeout"])
            ),
            otlp_endpoint=parse_url("otlp_endpoint", values.get("otlp_endpoint")),
            health=parse_optional_address("health", values.get("health")),
            metrics=parse_optional_address("metrics", values.get("metrics")),
            log_level=parse_log_level("log_level", values["log_level"]),
            trace_sampling=parse_sampling("trace_sampling", values.get("trace_sampling")),
            detect_timeout=parse_seconds("detect_timeout", str(values["detect_timeout"])),
            tcp_idle_timeout=parse_seconds("tcp_idle_timeout", str(values["tcp_idle_timeout"])),
            stream_idle_timeout=parse_seconds(
                "stream_idle_timeout", str(values["stream_idle_timeout"])
            ),
        )

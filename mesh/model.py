"""The mesh file: services, their endpoints and their policy, validated into frozen objects.

The file format is ARCHITECTURE.md's "Mesh file". Parsing is strict: unknown keys, wrong types and
out-of-range values are refused with a `MeshError` naming the file, the service, the field path
and the allowed form, e.g.::

    mesh.yaml: service "payments": policy.retries.attempts: must be a whole number >= 0, got "two"

Durations are strings like "250ms", "1.5s", "2s", "1m", "1h" (a bare number is refused: the unit
must be explicit).

Defaults (Envoy's and Istio's, so an SRE's intuition carries over):

- `namespace` "default", `port` 80.
- `policy.timeout`: none (no total timeout). `policy.connect_timeout`: 1s.
- `policy.retries`: none. When the block is present, `attempts` is required (as in Istio's
  HTTPRetry); `retry_on` defaults to connect-failure, reset and 503; `per_try_timeout` to none
  (the total timeout bounds every attempt); `backoff` to base 25ms, max 10 x base (Envoy);
  `budget` to none (when present: percent 20, min_concurrency 3, Envoy's retry budget defaults);
  `non_idempotent` to false (POST/PATCH are retried only with an Idempotency-Key header).
- `policy.circuit_breaker`: no per-endpoint breaker unless `consecutive_failures` is set;
  `open_for` 30s (Envoy's base_ejection_time); `max_ejection_percent` 10 (Envoy's and Istio's
  default; at least one endpoint may always be ejected); `max_requests` and `max_pending` 1024
  (Envoy's circuit breaker thresholds).
- `policy.load_balancer`: round_robin.
- `outbound_policy`: allow_any (Istio's ALLOW_ANY).
- `tracing.sampling`: 0.01; `tracing.otlp_endpoint`: none (OTEL_* variables apply).

Service names are unique across the mesh (callers address a service by its bare name), and the
name "outbound" is reserved for the sidecars' own listener and route configuration.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TypeAlias, cast

import yaml

from mesh.address import join_host_port, split_host_port

LoadBalancer: TypeAlias = Literal["round_robin", "least_request", "random"]
OutboundPolicyName: TypeAlias = Literal["allow_any", "registry_only"]

LOAD_BALANCERS: Final[tuple[LoadBalancer, ...]] = ("round_robin", "least_request", "random")
OUTBOUND_POLICIES: Final[tuple[OutboundPolicyName, ...]] = ("allow_any", "registry_only")
RETRY_CONDITIONS: Final[tuple[str, ...]] = (
    "connect-failure",
    "reset",
    "gateway-error",
    "5xx",
    "retriable-4xx",
)
RESERVED_NAMES: Final[frozenset[str]] = frozenset({"outbound"})

_DURATION = re.compile(r"(?P<value>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h)")
_UNIT_SECONDS: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*",
    re.IGNORECASE,
)
_DURATION_FORM = 'a duration like "250ms", "1.5s", "2s" or "1m"'
_DNS_FORM = "a DNS label (lower-case letters, digits and '-', at most 63, e.g. \"payments\")"


class MeshError(ValueError):
    """A mesh file that cannot be used; the message names the file, service, field and form."""


@dataclass(frozen=True, slots=True)
class Tracing:
    sampling: float = 0.01  # fraction of new traces sampled, 0..1
    otlp_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.025  # seconds
    max: float = 0.250


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: float = 20.0  # retries in flight as a share of requests in flight
    min_concurrency: int = 3  # retries always allowed in flight regardless of the percentage


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int  # retries after the first try
    retry_on: tuple[str, ...] = ("connect-failure", "reset")  # sorted members of RETRY_CONDITIONS
    status_codes: tuple[int, ...] = (503,)  # sorted
    per_try_timeout: float | None = None
    backoff: Backoff = field(default_factory=Backoff)
    budget: RetryBudget | None = None
    non_idempotent: bool = False


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    consecutive_failures: int | None = None  # None: no per-endpoint breaker (outlier detection)
    open_for: float = 30.0
    max_ejection_percent: int = 10
    max_requests: int = 1024
    max_pending: int = 1024


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float | None = None
    connect_timeout: float = 1.0
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    load_balancer: LoadBalancer = "round_robin"


@dataclass(frozen=True, slots=True)
class MeshEndpoint:
    host: str  # an IP literal (IPv6 without brackets) or a host name
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class MeshService:
    name: str
    namespace: str = "default"
    port: int = 80
    endpoints: tuple[MeshEndpoint, ...] = ()
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True, slots=True)
class Mesh:
    services: tuple[MeshService, ...] = ()  # in file order
    outbound_policy: OutboundPolicyName = "allow_any"
    tracing: Tracing = field(default_factory=Tracing)
    source: str = "<mesh>"


# -- error reporting ---------------------------------------------------------------------------

_MISSING: Final = object()


def _show(value: object) -> str:
    """A value as the user wrote it (YAML/JSON spelling), shortened."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class _Where:
    source: str
    service: str | None = None  # 'service "payments"' or 'services[2]'

    def fail(self, path: str, problem: str, got: object = _MISSING) -> NoReturn:
        parts = [self.source]
        if self.service is not None:
            parts.append(self.service)
        if path:
            parts.append(path)
        message = ": ".join(parts) + ": " + problem
        if got is not _MISSING:
            message += f", got {_show(got)}"
        raise MeshError(message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- typed readers -----------------------------------------------------------------------------


def _mapping(where: _Where, path: str, value: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        where.fail(path, f"must be a mapping with keys {', '.join(allowed)}", value)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or key not in allowed:
            where.fail(_join(path, str(key)), f"unknown key; allowed keys are {', '.join(allowed)}")
        out[key] = item
    return out


def _whole(
    where: _Where, path: str, value: object, minimum: int, maximum: int | None = None
) -> int:
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if in_range and maximum is not None:
        in_range = cast(int, value) <= maximum
    if not in_range:
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        where.fail(path, f"must be a whole number {bound}", value)
    return cast(int, value)


def _number(where: _Where, path: str, value: object, low: float, high: float, form: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        where.fail(path, f"must be {form}", value)
    return float(value)


def parse_duration(value: object) -> float | None:
    """Seconds for "250ms", "1.5s", "2s", "1m", "1h"; None when the text is not of that form."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    return float(match["value"]) * _UNIT_SECONDS[match["unit"]]


def _duration(where: _Where, path: str, value: object) -> float:
    """A strictly positive duration in seconds."""
    seconds = parse_duration(value)
    if seconds is None:
        where.fail(path, f"must be {_DURATION_FORM}", value)
    if seconds <= 0:
        where.fail(path, "must be a duration greater than zero", value)
    # Round to whole nanoseconds so xDS Durations (seconds + nanos) carry it exactly.
    return round(seconds, 9)


def _bool(where: _Where, path: str, value: object) -> bool:
    if not isinstance(value, bool):
        where.fail(path, "must be true or false", value)
    return value


def _choice(where: _Where, path: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        where.fail(path, f"must be one of {', '.join(allowed)}", value)
    return value


def _dns_label(where: _Where, path: str, value: object) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        where.fail(path, f"must be {_DNS_FORM}", value)
    return value


def _endpoint(where: _Where, path: str, value: object) -> MeshEndpoint:
    form = 'must be "host:port" (an IP address or host name, port 1-65535, e.g. "10.0.0.7:8080")'
    if not isinstance(value, str):
        where.fail(path, form, value)
    host, port = split_host_port(value) or ("", None)
    if port is None or port < 1:
        where.fail(path, form, value)
    if value.startswith("["):  # [IPv6]:port
        try:
            ok = ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
    else:
        ok = bool(_HOSTNAME.fullmatch(host))
    if not ok:
        where.fail(path, form, value)
    return MeshEndpoint(host=host.lower(), port=port)


# -- sections ----------------------------------------------------------------------------------

_TOP_KEYS = ("tracing", "outbound_policy", "services")
_TRACING_KEYS = ("sampling", "otlp_endpoint")
_SERVICE_KEYS = ("name", "namespace", "port", "endpoints", "policy")
_POLICY_KEYS = ("timeout", "connect_timeout", "retries", "circuit_breaker", "load_balancer")
_RETRY_KEYS = ("attempts", "per_try_timeout", "retry_on", "backoff", "budget", "non_idempotent")
_BACKOFF_KEYS = ("base", "max")
_BUDGET_KEYS = ("percent", "min_concurrency")
_BREAKER_KEYS = (
    "consecutive_failures",
    "open_for",
    "max_ejection_percent",
    "max_requests",
    "max_pending",
)


def _tracing(where: _Where, value: object) -> Tracing:
    raw = _mapping(where, "tracing", value, _TRACING_KEYS)
    sampling = Tracing().sampling
    if "sampling" in raw:
        sampling = _number(
            where, "tracing.sampling", raw["sampling"], 0.0, 1.0, "a fraction from 0 to 1"
        )
    endpoint = raw.get("otlp_endpoint")
    if endpoint is not None and (
        not isinstance(endpoint, str) or not re.fullmatch(r"https?://\S+", endpoint)
    ):
        where.fail("tracing.otlp_endpoint", 'must be a URL like "http://127.0.0.1:4317"', endpoint)
    return Tracing(sampling=sampling, otlp_endpoint=endpoint)


def _retry_on(where: _Where, path: str, value: object) -> tuple[tuple[str, ...], tuple[int, ...]]:
    form = (
        f"must be a list of {', '.join(RETRY_CONDITIONS)} or 3-digit HTTP status codes "
        '(e.g. [connect-failure, "503"])'
    )
    if not isinstance(value, list) or not value:
        where.fail(path, form, value)
    conditions: set[str] = set()
    codes: set[int] = set()
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and item in RETRY_CONDITIONS:
            conditions.add(item)
        elif isinstance(item, str) and re.fullmatch(r"[1-5][0-9][0-9]", item):
            codes.add(int(item))
        elif isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            codes.add(item)
        else:
            where.fail(item_path, form, item)
    return tuple(sorted(conditions)), tuple(sorted(codes))


_DEFAULT_RETRIES: Final = Retries(attempts=0)


def _retries(where: _Where, path: str, value: object) -> Retries:
    raw = _mapping(where, path, value, _RETRY_KEYS)
    if "attempts" not in raw:
        where.fail(_join(path, "attempts"), "is required: retries after the first try, e.g. 2")
    attempts = _whole(where, _join(path, "attempts"), raw["attempts"], 0)
    retry_on, status_codes = _DEFAULT_RETRIES.retry_on, _DEFAULT_RETRIES.status_codes
    if "retry_on" in raw:
        retry_on, status_codes = _retry_on(where, _join(path, "retry_on"), raw["retry_on"])
    per_try = None
    if "per_try_timeout" in raw:
        per_try = _duration(where, _join(path, "per_try_timeout"), raw["per_try_timeout"])
    backoff = Backoff()
    if "backoff" in raw:
        bpath = _join(path, "backoff")
        braw = _mapping(where, bpath, raw["backoff"], _BACKOFF_KEYS)
        base = _duration(where, f"{bpath}.base", braw["base"]) if "base" in braw else Backoff().base
        # Envoy's default max_interval is 10 x base_interval.
        top = _duration(where, f"{bpath}.max", braw["max"]) if "max" in braw else 10 * base
        if top < base:
            where.fail(f"{bpath}.max", "must not be shorter than backoff.base", braw.get("max"))
        backoff = Backoff(base=base, max=round(top, 9))
    budget = None
    if "budget" in raw:
        bpath = _join(path, "budget")
        braw = _mapping(where, bpath, raw["budget"], _BUDGET_KEYS)
        percent = RetryBudget().percent
        if "percent" in braw:
            percent = _number(
                where, f"{bpath}.percent", braw["percent"], 0.0, 100.0, "a percentage from 0 to 100"
            )
        concurrency = RetryBudget().min_concurrency
        if "min_concurrency" in braw:
            concurrency = _whole(where, f"{bpath}.min_concurrency", braw["min_concurrency"], 0)
        budget = RetryBudget(percent=percent, min_concurrency=concurrency)
    non_idempotent = False
    if "non_idempotent" in raw:
        non_idempotent = _bool(where, _join(path, "non_idempotent"), raw["non_idempotent"])
    return Retries(
        attempts=attempts,
        retry_on=retry_on,
        status_codes=status_codes,
        per_try_timeout=per_try,
        backoff=backoff,
        budget=budget,
        non_idempotent=non_idempotent,
    )


def _breaker(where: _Where, path: str, value: object) -> CircuitBreaker:
    raw = _mapping(where, path, value, _BREAKER_KEYS)
    defaults = CircuitBreaker()
    consecutive = None
    if "consecutive_failures" in raw:
        p = _join(path, "consecutive_failures")
        consecutive = _whole(where, p, raw["consecutive_failures"], 1)
    open_for = defaults.open_for
    if "open_for" in raw:
        open_for = _duration(where, _join(path, "open_for"), raw["open_for"])
    ejection = defaults.max_ejection_percent
    if "max_ejection_percent" in raw:
        p = _join(path, "max_ejection_percent")
        ejection = _whole(where, p, raw["max_ejection_percent"], 0, 100)
    max_requests = defaults.max_requests
    if "max_requests" in raw:
        max_requests = _whole(where, _join(path, "max_requests"), raw["max_requests"], 1)
    max_pending = defaults.max_pending
    if "max_pending" in raw:
        max_pending = _whole(where, _join(path, "max_pending"), raw["max_pending"], 1)
    return CircuitBreaker(
        consecutive_failures=consecutive,
        open_for=open_for,
        max_ejection_percent=ejection,
        max_requests=max_requests,
        max_pending=max_pending,
    )


def _policy(where: _Where, value: object) -> Policy:
    raw = _mapping(where, "policy", value, _POLICY_KEYS)
    timeout = None
    if "timeout" in raw:
        timeout = _duration(where, "policy.timeout", raw["timeout"])
    connect_timeout = Policy().connect_timeout
    if "connect_timeout" in raw:
        connect_timeout = _duration(where, "policy.connect_timeout", raw["connect_timeout"])
    retries = None
    if "retries" in raw:
        retries = _retries(where, "policy.retries", raw["retries"])
    breaker = CircuitBreaker()
    if "circuit_breaker" in raw:
        breaker = _breaker(where, "policy.circuit_breaker", raw["circuit_breaker"])
    lb: LoadBalancer = "round_robin"
    if "load_balancer" in raw:
        lb = cast(
            LoadBalancer,
            _choice(where, "policy.load_balancer", raw["load_balancer"], LOAD_BALANCERS),
        )
    return Policy(
        timeout=timeout,
        connect_timeout=connect_timeout,
        retries=retries,
        circuit_breaker=breaker,
        load_balancer=lb,
    )


def _service(source: str, index: int, value: object) -> MeshService:
    where = _Where(source, f"services[{index}]")
    if not isinstance(value, Mapping):
        where.fail("", f"must be a mapping with keys {', '.join(_SERVICE_KEYS)}", value)
    if "name" not in value:
        where.fail("name", f"is required: {_DNS_FORM}")
    name = _dns_label(where, "name", value["name"])
    if name in RESERVED_NAMES:
        where.fail("name", f"{name!r} is reserved for the sidecar's own listener", name)
    where = _Where(source, f'service "{name}"')
    raw = _mapping(where, "", value, _SERVICE_KEYS)
    namespace = "default"
    if "namespace" in raw:
        namespace = _dns_label(where, "namespace", raw["namespace"])
    port = 80
    if "port" in raw:
        port = _whole(where, "port", raw["port"], 1, 65535)
    if "endpoints" not in raw:
        where.fail("endpoints", 'is required: a list of "host:port" (may be empty)')
    endpoints_raw = raw["endpoints"]
    if not isinstance(endpoints_raw, list):
        where.fail("endpoints", 'must be a list of "host:port"', endpoints_raw)
    endpoints: list[MeshEndpoint] = []
    for i, item in enumerate(endpoints_raw):
        endpoint = _endpoint(where, f"endpoints[{i}]", item)
        if endpoint in endpoints:
            where.fail(f"endpoints[{i}]", "is listed twice", item)
        endpoints.append(endpoint)
    policy = _policy(where, raw["policy"]) if "policy" in raw else Policy()
    return MeshService(
        name=name, namespace=namespace, port=port, endpoints=tuple(endpoints), policy=policy
    )


# -- entry points ------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_mesh(text_or_dict: str | Mapping[str, Any], source: str) -> Mesh:
    """Validate a mesh given as YAML text or an already-loaded mapping.

    `source` names the file in error messages. Raises MeshError.
    """
    where = _Where(source)
    data: object = text_or_dict
    if isinstance(text_or_dict, str):
        try:
            data = yaml.load(text_or_dict, Loader=_StrictLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            raise MeshError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        where.fail("", "is empty; expected a mapping with keys " + ", ".join(_TOP_KEYS))
    raw = _mapping(where, "", data, _TOP_KEYS)
    tracing = _tracing(where, raw["tracing"]) if "tracing" in raw else Tracing()
    outbound: OutboundPolicyName = "allow_any"
    if "outbound_policy" in raw:
        outbound = cast(
            OutboundPolicyName,
            _choice(where, "outbound_policy", raw["outbound_policy"], OUTBOUND_POLICIES),
        )
    services_raw = raw.get("services", [])
    if not isinstance(services_raw, list):
        where.fail("services", "must be a list of services", services_raw)
    services: list[MeshService] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(services_raw):
        service = _service(source, i, item)
        if service.name in seen:
            _Where(source, f'service "{service.name}"').fail(
                "name",
                f"is defined twice (services[{seen[service.name]}] and services[{i}]); "
                "service names must be unique across namespaces",
            )
        seen[service.name] = i
        services.append(service)
    return Mesh(services=tuple(services), outbound_policy=outbound, tracing=tracing, source=source)


def load_mesh(path: str | Path) -> Mesh:
    """Read and validate a mesh file. Raises MeshError (also for an unreadable file)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshError(f"{source}: cannot read the mesh file: {exc}") from None
    return parse_mesh(text, source)

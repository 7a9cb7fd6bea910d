"""The mesh file: services, their endpoints and their policy, validated into frozen objects.

The file format is in README.md, "Mesh file". Parsing is strict: unknown keys, wrong types and
out-of-range values are refused with a `MeshError` naming the file, the service, the field path
and the allowed form, e.g.::

    mesh.yaml: service "payments": policy.retries.attempts: must be a whole number >= 0, got "two"

Policy values are checked by `mesh.policy`, the validator the Kubernetes annotations use too, so
the part after the field's name is the same wherever a value was written. Durations are strings
like "250ms", "1.5s", "2s", "1m", "1h" (a bare number is refused: the unit must be explicit).

`defaults:` holds policy for every service, key by key: a service's own `policy:` wins for the
keys it sets, `defaults:` supplies the others, the built-in defaults (see `mesh.policy`) the
rest. Each service records where each value came from (`MeshService.origins`: service, mesh,
built-in; the Kubernetes source adds namespace).

Other defaults: `namespace` "default", `port` 80, `outbound_policy` allow_any (Istio's
ALLOW_ANY), `tracing.sampling` 0.01, `tracing.otlp_endpoint` none (OTEL_* variables apply).

Names follow Kubernetes: a service is unique by name and namespace (the same name may be used in
two namespaces), and the name "outbound" is reserved for the sidecars' own listener and route
configuration. `addresses:` are a service's virtual IPs (a Kubernetes ClusterIP): a request sent
to one of them, on the service's port, reaches the service, and so does any TCP connection an
intercepted app opens to one of them. `calls:` names the services it calls (`name` in its own
namespace, or `name.namespace`), for `outrigger analyze`.

`protocol:` declares what the service's port speaks: `http`, `http2`, `grpc`, `tcp` or `tls`
(`Protocol`); `http2` and `grpc` are HTTP whose endpoints are reached over HTTP/2 (h2c).
Absent, an intercepted connection's first bytes decide
(HTTP/1.x takes the HTTP path, anything else is TCP). Declared `tcp` skips that detection (so a
protocol where the server speaks first never waits for the detection window); `tls` is passed
through as TCP with its ClientHello read for the server name; `http` is always parsed as HTTP.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn, TypeAlias, TypeVar, cast

import yaml

from mesh.address import join_host_port, parse_endpoint
from mesh.injection import Injection, InjectionError, parse_injection
from mesh.policy import (
    BY_PATH,
    LOAD_BALANCERS,
    RETRY_CONDITIONS,
    SETTINGS,
    Backoff,
    CircuitBreaker,
    FieldError,
    LoadBalancer,
    Origin,
    Origins,
    Policy,
    PolicyValues,
    Retries,
    RetryBudget,
    backoff_problem,
    build_policy,
    check_choice,
    check_number,
    check_whole,
    format_duration,
    origins_of,
    parse_duration,
)

__all__ = [
    "LOAD_BALANCERS",
    "OUTBOUND_POLICIES",
    "PROTOCOLS",
    "RESERVED_NAMES",
    "RETRY_CONDITIONS",
    "Backoff",
    "CircuitBreaker",
    "LoadBalancer",
    "Mesh",
    "MeshEndpoint",
    "MeshError",
    "MeshService",
    "Policy",
    "Protocol",
    "Retries",
    "RetryBudget",
    "Tracing",
    "load_mesh",
    "parse_duration",
    "parse_mesh",
]

OutboundPolicyName: TypeAlias = Literal["allow_any", "registry_only"]

OUTBOUND_POLICIES: Final[tuple[OutboundPolicyName, ...]] = ("allow_any", "registry_only")
RESERVED_NAMES: Final[frozenset[str]] = frozenset({"outbound"})

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS_FORM = "a DNS label (lower-case letters, digits and '-', at most 63, e.g. \"payments\")"
_CALL_FORM = 'a service name, "name" or "name.namespace" (e.g. "payments.shop")'


class MeshError(ValueError):
    """A mesh file that cannot be used; the message names the file, service, field and form."""


class Protocol(StrEnum):
    """What a service's port is declared to speak (None where it is not: the bytes decide)."""

    HTTP = "http"
    HTTP2 = "http2"  # HTTP/2 over cleartext (h2c, prior knowledge) to the service
    GRPC = "grpc"  # gRPC: HTTP/2 as http2, with the gRPC-aware errors
    TCP = "tcp"
    TLS = "tls"

    @property
    def http(self) -> bool:
        """An HTTP protocol: its requests take the routes and policies."""
        return self in (Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC)

    @property
    def http2(self) -> bool:
        """The service speaks HTTP/2 to the sidecar (its Cluster's HTTP/2 protocol options)."""
        return self in (Protocol.HTTP2, Protocol.GRPC)


PROTOCOLS: Final[tuple[str, ...]] = tuple(protocol.value for protocol in Protocol)


@dataclass(frozen=True, slots=True)
class Tracing:
    sampling: float = 0.01  # fraction of new traces sampled, 0..1
    otlp_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class MeshEndpoint:
    host: str  # an IP literal (IPv6 without brackets) or a host name
    port: int
    hostname: str | None = None  # a headless Service's per-pod DNS label (StatefulSet pods)

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class MeshService:
    name: str
    namespace: str = "default"
    port: int = 80
    endpoints: tuple[MeshEndpoint, ...] = ()
    policy: Policy = field(default_factory=Policy)
    addresses: tuple[str, ...] = ()  # virtual IPs (a Kubernetes ClusterIP), canonical form
    calls: tuple[str, ...] = ()  # services it calls ("name" or "name.namespace"), for analyze
    # This is the service's only port, so its bare names answer without ":port" too.
    sole_port: bool = True
    # Headless (a Kubernetes Service with clusterIP None): requests keep their original
    # destination (a pod the caller chose) and get the service's policy, without balancing.
    headless: bool = False
    # What the port speaks when declared (`protocol:`, a port's appProtocol or name); None:
    # detected per connection from the first bytes.
    protocol: Protocol | None = None
    origins: Origins = field(default_factory=lambda: origins_of({}))

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def origin(self, key: str) -> Origin:
        return dict(self.origins)[key]


@dataclass(frozen=True, slots=True)
class Mesh:
    services: tuple[MeshService, ...] = ()  # in file order
    outbound_policy: OutboundPolicyName = "allow_any"
    tracing: Tracing = field(default_factory=Tracing)
    source: str = "<mesh>"
    injection: Injection = field(default_factory=Injection)  # mesh/injection.py
    # `defaults:`, checked, by setting key (mesh.policy); under every service's own settings
    defaults: PolicyValues = field(default_factory=lambda: MappingProxyType({}))


# -- error reporting ---------------------------------------------------------------------------

_MISSING: Final = object()


def show_value(value: object) -> str:
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
            message += f", got {show_value(got)}"
        raise MeshError(message)

    def checked(self, path: str, check: Any, value: object) -> Any:
        """`check(value)`, a FieldError from it reported at `path`."""
        try:
            return check(value)
        except FieldError as exc:
            if exc.index is not None:
                path = f"{path}[{exc.index}]"
            raise MeshError(
                ": ".join([self.source, *([self.service] if self.service else []), path])
                + ": "
                + exc.message(show_value)
            ) from None


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


def _dns_label(where: _Where, path: str, value: object) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        where.fail(path, f"must be {_DNS_FORM}", value)
    return value


def _list(where: _Where, path: str, value: object, form: str) -> list[Any]:
    if not isinstance(value, list):
        where.fail(path, f"must be a list of {form}", value)
    return value


_T = TypeVar("_T")


def _distinct(
    where: _Where,
    path: str,
    value: object,
    form: str,
    read: Callable[[_Where, str, object], _T],
) -> tuple[_T, ...]:
    """A list whose items `read` checks, each at most once."""
    found: list[_T] = []
    for i, item in enumerate(_list(where, path, value, form)):
        checked = read(where, f"{path}[{i}]", item)
        if checked in found:
            where.fail(f"{path}[{i}]", "is listed twice", item)
        found.append(checked)
    return tuple(found)


def _endpoint(where: _Where, path: str, value: object) -> MeshEndpoint:
    form = 'must be "host:port" (an IP address or host name, port 1-65535, e.g. "10.0.0.7:8080")'
    parsed = parse_endpoint(value) if isinstance(value, str) else None
    if parsed is None:
        where.fail(path, form, value)
    host, port = parsed
    return MeshEndpoint(host=host.lower(), port=port)


def _address(where: _Where, path: str, value: object) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        where.fail(path, 'must be an IP address (e.g. "10.96.0.12")', value)


def parse_call(value: object) -> str | None:
    """A `calls` entry ("name" or "name.namespace"), or None when it is not of that form."""
    if not isinstance(value, str):
        return None
    parts = value.split(".")
    if len(parts) > 2 or not all(_DNS_LABEL.fullmatch(part) for part in parts):
        return None
    return value


# -- sections ----------------------------------------------------------------------------------

_TOP_KEYS = ("tracing", "outbound_policy", "defaults", "services", "injection")
_TRACING_KEYS = ("sampling", "otlp_endpoint")
_SERVICE_KEYS = (
    "name",
    "namespace",
    "port",
    "protocol",
    "endpoints",
    "addresses",
    "calls",
    "policy",
)


def _policy_tree() -> dict[str, Any]:
    """The nested keys of a `policy:` block, in SETTINGS order: {key: subtree | None}."""
    tree: dict[str, Any] = {}
    for setting in SETTINGS:
        node = tree
        for part in setting.path[:-1]:
            node = node.setdefault(part, {})
        node[setting.path[-1]] = None
    return tree


_POLICY_TREE: Final = _policy_tree()


def _tracing(where: _Where, value: object) -> Tracing:
    raw = _mapping(where, "tracing", value, _TRACING_KEYS)
    sampling = Tracing().sampling
    if "sampling" in raw:
        sampling = where.checked(
            "tracing.sampling",
            lambda v: check_number(v, 0.0, 1.0, "a fraction from 0 to 1"),
            raw["sampling"],
        )
    endpoint = raw.get("otlp_endpoint")
    if endpoint is not None and (
        not isinstance(endpoint, str) or not re.fullmatch(r"https?://\S+", endpoint)
    ):
        where.fail("tracing.otlp_endpoint", 'must be a URL like "http://127.0.0.1:4317"', endpoint)
    return Tracing(sampling=sampling, otlp_endpoint=endpoint)


@dataclass(slots=True)
class _PolicyBlock:
    """A `policy:` or `defaults:` block: its checked values and where each was written."""

    values: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)  # setting key -> path in the file
    retries_path: str | None = None  # where a `retries:` block was written, if one was


def _policy_block(where: _Where, path: str, value: object) -> _PolicyBlock:
    block = _PolicyBlock()

    def walk(node_path: str, parts: tuple[str, ...], tree: dict[str, Any], raw: object) -> None:
        items = _mapping(where, node_path, raw, tuple(tree))
        for key, item in items.items():
            item_path = _join(node_path, key)
            if (*parts, key) == ("retries",):
                block.retries_path = item_path
            subtree = tree[key]
            if subtree is not None:
                walk(item_path, (*parts, key), subtree, item)
                continue
            setting = BY_PATH[(*parts, key)]
            block.values[setting.key] = where.checked(item_path, setting.check, item)
            block.paths[setting.key] = item_path

    walk(path, (), _POLICY_TREE, value)
    return block


def _check_backoff(where: _Where, own: _PolicyBlock, merged: dict[str, Any]) -> None:
    """Refuse a backoff whose max is shorter than its base, at the key this block wrote."""
    found = backoff_problem(
        merged, "retry-backoff-max" if "retry-backoff-max" in own.paths else "retry-backoff-base"
    )
    if found is not None:
        key, problem = found
        where.fail(own.paths[key], problem, format_duration(merged[key]))


def _defaults(where: _Where, value: object) -> PolicyValues:
    block = _policy_block(where, "defaults", value)
    _check_backoff(where, block, block.values)
    return MappingProxyType(dict(block.values))


def _service_policy(where: _Where, value: object, defaults: PolicyValues) -> tuple[Policy, Origins]:
    block = _policy_block(where, "policy", value) if value is not None else _PolicyBlock()
    merged = {**defaults, **block.values}
    if block.retries_path is not None and "retry-attempts" not in merged:
        where.fail(
            _join(block.retries_path, "attempts"),
            "is required: retries after the first try, e.g. 2",
        )
    _check_backoff(where, block, merged)
    levels: dict[str, Origin] = {key: "mesh" for key in defaults}
    levels.update((key, "service") for key in block.values)
    return build_policy(merged), origins_of(levels)


def _service(source: str, index: int, value: object, defaults: PolicyValues) -> MeshService:
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
        port = where.checked("port", lambda v: check_whole(v, 1, 65535), raw["port"])
    protocol = None
    if "protocol" in raw:
        protocol = Protocol(
            where.checked("protocol", lambda v: check_choice(v, PROTOCOLS), raw["protocol"])
        )
    if "endpoints" not in raw:
        where.fail("endpoints", 'is required: a list of "host:port" (may be empty)')
    endpoints = _distinct(where, "endpoints", raw["endpoints"], '"host:port"', _endpoint)
    addresses = _distinct(where, "addresses", raw.get("addresses", []), "IP addresses", _address)
    calls: list[str] = []
    for i, item in enumerate(_list(where, "calls", raw.get("calls", []), "service names")):
        call = parse_call(item)
        if call is None:
            where.fail(f"calls[{i}]", f"must be {_CALL_FORM}", item)
        calls.append(call)
    policy, origins = _service_policy(where, raw.get("policy"), defaults)
    return MeshService(
        name=name,
        namespace=namespace,
        port=port,
        endpoints=endpoints,
        policy=policy,
        addresses=addresses,
        calls=tuple(calls),
        protocol=protocol,
        origins=origins,
    )


def _unique(source: str, services: list[MeshService]) -> None:
    """Names are unique per namespace; a virtual address and port reach one service."""
    seen: dict[tuple[str, str], int] = {}
    owners: dict[tuple[str, int], MeshService] = {}
    for i, service in enumerate(services):
        where = _Where(source, f'service "{service.name}"')
        key = (service.name, service.namespace)
        if key in seen:
            where.fail(
                "name",
                f"is defined twice in namespace {service.namespace!r} (services[{seen[key]}] and "
                f"services[{i}]); a name may be reused only in another namespace",
            )
        seen[key] = i
        for address in service.addresses:
            other = owners.setdefault((address, service.port), service)
            if other is not service:
                where.fail(
                    "addresses",
                    f"{address}:{service.port} is already service "
                    f'"{other.name}.{other.namespace}"\'s address',
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
            where.checked(
                "outbound_policy",
                lambda v: check_choice(v, OUTBOUND_POLICIES),
                raw["outbound_policy"],
            ),
        )
    defaults = _defaults(where, raw["defaults"]) if "defaults" in raw else MappingProxyType({})
    services_raw = raw.get("services", [])
    if not isinstance(services_raw, list):
        where.fail("services", "must be a list of services", services_raw)
    services = [_service(source, i, item, defaults) for i, item in enumerate(services_raw)]
    _unique(source, services)
    try:
        injection = parse_injection(raw["injection"]) if "injection" in raw else Injection()
    except InjectionError as exc:
        raise MeshError(f"{source}: {exc}") from None
    return Mesh(
        services=tuple(services),
        outbound_policy=outbound,
        tracing=tracing,
        source=source,
        injection=injection,
        defaults=defaults,
    )


def load_mesh(path: str | Path) -> Mesh:
    """Read and validate a mesh file. Raises MeshError (also for an unreadable file)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshError(f"{source}: cannot read the mesh file: {exc}") from None
    return parse_mesh(text, source)

"""The mesh file's `injection:` section, and the value forms the injector's pod annotations share.

What the sidecar injector (the `/inject` webhook and `outrigger inject`) adds to a pod comes from
here: the image, whether the proxy is a native sidecar, the control plane's address, and the
defaults a pod's `outrigger.dev/*` annotations override (proxy resources, log level, trace
sampling, interception exclusions). One reader per value form serves both the mesh file and the
annotations, so `cpu: lots` in the file and `outrigger.dev/proxy-cpu: lots` on a pod are refused
with the same words. Every error is an `InjectionError` whose message starts with the key it is
about, e.g.::

    injection.proxy_cpu: must be a Kubernetes quantity greater than zero, like "100m", "0.5"
    or "2", got "lots"

(`mesh.model` prefixes the file name.) The section, with its defaults. The per-pod keys are the
pod annotations' names with `_` for `-` (`proxy_cpu` is `outrigger.dev/proxy-cpu`)::

    injection:
      image: outrigger:<this package's version>   # outrigger-init and outrigger-proxy
      image_pull_policy: IfNotPresent              # Always | IfNotPresent | Never
      native_sidecar: true      # false: a plain container, app held by a postStart `outrigger wait`
      control_plane: outrigger.outrigger-system.svc:15010   # the proxies' xDS address
      control_plane_namespace: outrigger-system    # never injected (nor kube-system, kube-public)
      proxy_log_level: info                        # debug | info | warning | error
      trace_sampling: null      # 0..1 overrides the xDS value; null: tracing.sampling applies
      proxy_cpu: 100m                              # requests (Istio's defaults)
      proxy_memory: 128Mi
      proxy_cpu_limit: null                        # limits; null or left out: none
      proxy_memory_limit: null
      ports: {admin: 15000, outbound: 15001, inbound: 15006, health: 15021, metrics: 15090}
      interception:
        exclude_inbound_ports: []                  # the sidecar's own ports are always excluded
        exclude_outbound_ports: []
        include_outbound_cidrs: ["*"]              # "*": every destination
        exclude_outbound_cidrs: []

A request may not exceed its limit (the API server would refuse the pod). The proxy's ports are
Istio's numbers; they must differ from each other.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import metadata
from typing import Any, Final, Literal, TypeAlias, cast

from mesh.address import parse_endpoint

LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
PullPolicy: TypeAlias = Literal["Always", "IfNotPresent", "Never"]

LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")
PULL_POLICIES: Final[tuple[PullPolicy, ...]] = ("Always", "IfNotPresent", "Never")


def _package_version() -> str:
    try:
        return metadata.version("outrigger")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


VERSION: Final = _package_version()
# Workload kinds and where their pod template is ( () : the object is the pod ), for the tools
# that read manifests (`outrigger inject`, `outrigger analyze`).
POD_TEMPLATES: Final[dict[str, tuple[str, ...]]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
DEFAULT_IMAGE: Final = f"outrigger:{VERSION}"

# Kubernetes' quantity grammar (k8s.io/apimachinery resource.Quantity), without a sign.
_QUANTITY = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[eE][-+]?[0-9]+|m|k|M|G|T|P|E)?"
)
_BINARY: Final = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL: Final = {"m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_FRACTION = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")

QUANTITY_FORM: Final = 'a Kubernetes quantity greater than zero, like "100m", "0.5" or "2"'
MEMORY_FORM: Final = 'a Kubernetes quantity greater than zero, like "128Mi" or "1Gi"'
PORTS_FORM: Final = 'ports from 1 to 65535, comma-separated in an annotation (e.g. "3306,6379")'
CIDRS_FORM: Final = (
    'IPv4 or IPv6 CIDRs, comma-separated in an annotation (e.g. "10.0.0.0/8,fd00::/8")'
)
SAMPLING_FORM: Final = 'a fraction from 0 to 1, like "0.01" (1%) or "1" (every new trace)'


class InjectionError(ValueError):
    """An injection setting that cannot be used; the message starts with its key."""


@dataclass(frozen=True, slots=True)
class Resources:
    """The proxy's requests and limits as Kubernetes quantities; a limit of None is no limit."""

    cpu: str = "100m"
    memory: str = "128Mi"
    cpu_limit: str | None = None
    memory_limit: str | None = None


@dataclass(frozen=True, slots=True)
class Ports:
    """The proxy's ports in the pod."""

    admin: int = 15000  # 127.0.0.1 only
    outbound: int = 15001  # redirect target of the app's connections
    inbound: int = 15006  # redirect target of connections to the pod
    health: int = 15021  # /healthz/ready on the pod IP, for the kubelet
    metrics: int = 15090  # /stats/prometheus on the pod IP

    def all(self) -> tuple[int, ...]:
        return (self.admin, self.outbound, self.inbound, self.health, self.metrics)


@dataclass(frozen=True, slots=True)
class Interception:
    """Which traffic `outrigger iptables` leaves alone, on top of the sidecar's own ports."""

    exclude_inbound_ports: tuple[int, ...] = ()  # sorted, unique
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[str, ...] | None = None  # None: every destination ("*")
    exclude_outbound_cidrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Injection:
    image: str = DEFAULT_IMAGE
    image_pull_policy: PullPolicy = "IfNotPresent"
    native_sidecar: bool = True
    control_plane: str = "outrigger.outrigger-system.svc:15010"
    control_plane_namespace: str = "outrigger-system"
    proxy_log_level: LogLevel = "info"
    trace_sampling: float | None = None  # None: the xDS value (the mesh's tracing.sampling)
    resources: Resources = field(default_factory=Resources)  # proxy_cpu ... proxy_memory_limit
    ports: Ports = field(default_factory=Ports)
    interception: Interception = field(default_factory=Interception)


# -- value readers, shared by the mesh file and the pod annotations ----------------------------


def show(value: object) -> str:
    """A value as the user wrote it (JSON spelling), shortened for a message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(key: str, form: str, got: object) -> InjectionError:
    return InjectionError(f"{key}: must be {form}, got {show(got)}")


def _items(key: str, value: object, form: str) -> list[object]:
    """A YAML list, or an annotation's comma-separated text ("" is empty)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")] if value.strip() else []
    if isinstance(value, list):
        return value
    raise fail(key, form, value)


def read_ports(key: str, value: object) -> tuple[int, ...]:
    ports: set[int] = set()
    for item in _items(key, value, PORTS_FORM):
        if isinstance(item, str) and item.isascii() and item.isdigit():
            item = int(item)
        if not isinstance(item, int) or isinstance(item, bool) or not 1 <= item <= 65535:
            raise fail(key, PORTS_FORM, value)
        ports.add(item)
    return tuple(sorted(ports))


def read_cidrs(key: str, value: object) -> tuple[str, ...]:
    """Normalised networks, in the order given; a bare address is a /32 or /128."""
    networks: list[str] = []
    for item in _items(key, value, CIDRS_FORM):
        if not isinstance(item, str):
            raise fail(key, CIDRS_FORM, value)
        try:
            network = str(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise fail(key, CIDRS_FORM, item) from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def read_include_cidrs(key: str, value: object) -> tuple[str, ...] | None:
    """Like read_cidrs, and "*" alone (every destination) is None."""
    items = _items(key, value, CIDRS_FORM)
    if "*" not in items:
        return read_cidrs(key, value)
    if len(items) != 1:
        raise InjectionError(
            f'{key}: "*" means every destination and stands alone, got {show(value)}'
        )
    return None


def quantity_value(text: str) -> Decimal:
    """The amount a quantity text stands for (it must match the grammar)."""
    match = _QUANTITY.fullmatch(text)
    assert match is not None
    number, suffix = Decimal(match["number"]), match["suffix"] or ""
    if suffix in _BINARY:
        return number * Decimal(1024) ** _BINARY[suffix]
    if suffix[:1] in "eE" and suffix:
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_DECIMAL[suffix])


def read_quantity(key: str, value: object, form: str = QUANTITY_FORM) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # YAML `cpu: 2` or `cpu: 0.5`
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value) or quantity_value(value) <= 0:
        raise fail(key, form, value)
    return value


def read_memory(key: str, value: object) -> str:
    return read_quantity(key, value, MEMORY_FORM)


def lower_quantity(first: str, second: str | None) -> str:
    """The smaller of two quantities (the first when the second is None)."""
    if second is not None and quantity_value(second) < quantity_value(first):
        return second
    return first


def read_sampling(key: str, value: object) -> float:
    if isinstance(value, str) and _FRACTION.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise fail(key, SAMPLING_FORM, value)
    return float(value)


def read_log_level(key: str, value: object) -> LogLevel:
    if value not in LOG_LEVELS:
        raise fail(key, "one of " + ", ".join(LOG_LEVELS), value)
    return value


def read_bool(key: str, value: object) -> bool:
    """A YAML boolean, or an annotation's "true" / "false"."""
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise fail(key, 'true or false (quoted in an annotation: "false")', value)


def check_limits(resources: Resources, keys: Mapping[str, str]) -> None:
    """A request above its limit is refused; `keys` names each field as the user wrote it."""
    for name, request, limit in (
        ("cpu", resources.cpu, resources.cpu_limit),
        ("memory", resources.memory, resources.memory_limit),
    ):
        if limit is not None and quantity_value(request) > quantity_value(limit):
            raise InjectionError(
                f"{keys[name]}: the request ({request}) must not exceed the limit "
                f"{keys[name + '_limit']} ({limit})"
            )


# -- the section --------------------------------------------------------------------------------

_KEYS = (
    "image",
    "image_pull_policy",
    "native_sidecar",
    "control_plane",
    "control_plane_namespace",
    "proxy_log_level",
    "trace_sampling",
    "proxy_cpu",
    "proxy_memory",
    "proxy_cpu_limit",
    "proxy_memory_limit",
    "ports",
    "interception",
)
_PORT_KEYS = ("admin", "outbound", "inbound", "health", "metrics")
_INTERCEPTION_KEYS = (
    "exclude_inbound_ports",
    "exclude_outbound_ports",
    "include_outbound_cidrs",
    "exclude_outbound_cidrs",
)


def _mapping(key: str, value: object, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(key, "a mapping with keys " + ", ".join(allowed), value)
    for name in value:
        if name not in allowed:
            raise InjectionError(
                f"{key}.{name}: unknown key; allowed keys are {', '.join(allowed)}"
            )
    return dict(value)


def _address(key: str, value: object) -> str:
    form = 'HOST:PORT, e.g. "outrigger.outrigger-system.svc:15010"'
    if not isinstance(value, str) or parse_endpoint(value) is None:
        raise fail(key, form, value)
    return value


def _image(key: str, value: object) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise fail(key, 'an image reference, e.g. "registry.example/outrigger:0.1.0"', value)
    return value


def _resources(raw: Mapping[str, Any]) -> Resources:
    defaults = Resources()

    def limit(key: str, reader: Callable[[str, object], str]) -> str | None:
        value = raw.get(key)
        return None if value is None else reader(f"injection.{key}", value)

    resources = Resources(
        cpu=read_quantity("injection.proxy_cpu", raw.get("proxy_cpu", defaults.cpu)),
        memory=read_memory("injection.proxy_memory", raw.get("proxy_memory", defaults.memory)),
        cpu_limit=limit("proxy_cpu_limit", read_quantity),
        memory_limit=limit("proxy_memory_limit", read_memory),
    )
    check_limits(
        resources,
        {
            "cpu": "injection.proxy_cpu",
            "memory": "injection.proxy_memory",
            "cpu_limit": "injection.proxy_cpu_limit",
            "memory_limit": "injection.proxy_memory_limit",
        },
    )
    return resources


def _ports(key: str, value: object) -> Ports:
    raw = _mapping(key, value, _PORT_KEYS)
    form = "a port number from 1 to 65535"
    numbers: dict[str, int] = {}
    for name in _PORT_KEYS:
        number = raw.get(name, getattr(Ports(), name))
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise fail(f"{key}.{name}", form, number)
        for other, taken in numbers.items():
            if taken == number:
                raise InjectionError(f"{key}.{name}: {number} is already {key}.{other}")
        numbers[name] = number
    return Ports(**numbers)


def _interception(key: str, value: object) -> Interception:
    raw = _mapping(key, value, _INTERCEPTION_KEYS)
    return Interception(
        exclude_inbound_ports=read_ports(
            f"{key}.exclude_inbound_ports", raw.get("exclude_inbound_ports", [])
        ),
        exclude_outbound_ports=read_ports(
            f"{key}.exclude_outbound_ports", raw.get("exclude_outbound_ports", [])
        ),
        include_outbound_cidrs=read_include_cidrs(
            f"{key}.include_outbound_cidrs", raw.get("include_outbound_cidrs", ["*"])
        ),
        exclude_outbound_cidrs=read_cidrs(
            f"{key}.exclude_outbound_cidrs", raw.get("exclude_outbound_cidrs", [])
        ),
    )


def parse_injection(value: object) -> Injection:
    """The `injection:` section, validated. Raises InjectionError naming the key."""
    raw = _mapping("injection", value, _KEYS)
    defaults = Injection()
    namespace = raw.get("control_plane_namespace", defaults.control_plane_namespace)
    if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
        form = 'a namespace name, e.g. "outrigger-system"'
        raise fail("injection.control_plane_namespace", form, namespace)
    pull = raw.get("image_pull_policy", defaults.image_pull_policy)
    if pull not in PULL_POLICIES:
        raise fail("injection.image_pull_policy", "one of " + ", ".join(PULL_POLICIES), pull)
    sampling = raw.get("trace_sampling")
    return Injection(
        image=_image("injection.image", raw.get("image", defaults.image)),
        image_pull_policy=cast(PullPolicy, pull),
        native_sidecar=read_bool(
            "injection.native_sidecar", raw.get("native_sidecar", defaults.native_sidecar)
        ),
        control_plane=_address(
            "injection.control_plane", raw.get("control_plane", defaults.control_plane)
        ),
        control_plane_namespace=namespace,
        proxy_log_level=read_log_level(
            "injection.proxy_log_level", raw.get("proxy_log_level", defaults.proxy_log_level)
        ),
        trace_sampling=(
            None if sampling is None else read_sampling("injection.trace_sampling", sampling)
        ),
        resources=_resources(raw),
        ports=_ports("injection.ports", raw.get("ports", {})),
        interception=_interception("injection.interception", raw.get("interception", {})),
    )

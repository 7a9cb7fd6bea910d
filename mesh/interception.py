"""Interception settings: which of a pod's TCP connections its rules send to the sidecar.

One home for the values that `outrigger iptables` takes as flags and that the injector reads
from pod annotations (`outrigger.dev/exclude-outbound-ports`, `exclude-inbound-ports`,
`include-outbound-cidrs`, `exclude-outbound-cidrs`) and the mesh file's `injection:` defaults:
both accept the same forms and refuse the rest with the same words, naming the key (a flag or
an annotation) and the form it takes.

Forms:

- a port list is comma-separated ports 1-65535 (`3306,6379`); empty means none. Duplicates
  collapse and order does not matter: the same set gives the same rules.
- a CIDR list is comma-separated networks (`10.0.0.0/8,fd00::/8`); a bare address is one host
  (/32 or /128); empty means none. A network with host bits set (`10.0.0.1/8`) is refused
  rather than guessed at. `include-outbound-cidrs` also takes `*`, every destination (its
  default); an empty include list redirects no outbound traffic at all, as in Istio.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, TypeAlias

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_UID: Final = 1337  # the sidecar's user: its own traffic is never redirected
OUTBOUND_PORT: Final = 15001  # where the app's outbound connections are redirected
INBOUND_PORT: Final = 15006  # where connections to the pod are redirected
ADMIN_PORT: Final = 15000
HEALTH_PORT: Final = 15021
METRICS_PORT: Final = 15090
# The sidecar's own ports: never redirected on the way in (the injector passes them).
SIDECAR_PORTS: Final = (ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, HEALTH_PORT, METRICS_PORT)

_PORT = re.compile(r"[0-9]{1,5}")
_UID = re.compile(r"[0-9]{1,10}")
PORTS_FORM: Final = "comma-separated ports 1-65535, e.g. 3306,6379 (empty: none)"
CIDRS_FORM: Final = "comma-separated networks, e.g. 10.0.0.0/8,fd00::/8 (empty: none)"
INCLUDE_FORM: Final = "* (every destination) or " + CIDRS_FORM


class InterceptionError(ValueError):
    """A value that is not in its form; the message names the key and the form."""


def parse_port(key: str, value: str) -> int:
    text = value.strip(" ")
    if _PORT.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise InterceptionError(f"{key}: {value!r} is not a port; the form is a number 1-65535")
    return int(text)


def parse_uid(key: str, value: str) -> int:
    text = value.strip(" ")
    if _UID.fullmatch(text) is None or int(text) > 2**32 - 2:
        raise InterceptionError(
            f"{key}: {value!r} is not a user id; the form is a number, e.g. {PROXY_UID}"
        )
    return int(text)


def parse_ports(key: str, value: str) -> tuple[int, ...]:
    """A port list, sorted, without duplicates."""
    ports: set[int] = set()
    for item in _items(value):
        if _PORT.fullmatch(item) is None or not 1 <= int(item) <= 65535:
            raise InterceptionError(
                f"{key}: {item!r} in {value!r} is not a port; the form is {PORTS_FORM}"
            )
        ports.add(int(item))
    return tuple(sorted(ports))


def parse_cidrs(key: str, value: str, form: str = CIDRS_FORM) -> tuple[Network, ...]:
    """A CIDR list: IPv4 networks first, then IPv6, each sorted, without duplicates."""
    networks: set[Network] = set()
    for item in _items(value):
        try:
            networks.add(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            hint = ""
            if "host bits set" in str(exc):
                network = ipaddress.ip_network(item, strict=False)
                hint = f" (host bits set: did you mean {network}?)"
            raise InterceptionError(
                f"{key}: {item!r} in {value!r} is not a network{hint}; the form is {form}"
            ) from None
    return _sorted(networks)


def parse_include_cidrs(key: str, value: str) -> tuple[Network, ...] | None:
    """`*` (None: every destination) or a CIDR list."""
    if value.strip(" ") == "*":
        return None
    if "*" in value:
        raise InterceptionError(
            f"{key}: {value!r} mixes * with networks; the form is {INCLUDE_FORM}"
        )
    return parse_cidrs(key, value, INCLUDE_FORM)


def format_ports(ports: tuple[int, ...]) -> str:
    return ",".join(str(port) for port in ports)


def format_cidrs(networks: tuple[Network, ...] | None) -> str:
    return "*" if networks is None else ",".join(str(network) for network in networks)


@dataclass(frozen=True, slots=True)
class Interception:
    """What a pod's rules redirect. Defaults: everything, but the sidecar's own traffic."""

    proxy_uid: int = PROXY_UID
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[Network, ...] | None = None  # None: every destination
    exclude_outbound_cidrs: tuple[Network, ...] = ()

    def args(self) -> list[str]:
        """The `outrigger iptables` flags that install exactly these settings."""
        return [
            "--proxy-uid",
            str(self.proxy_uid),
            "--outbound-port",
            str(self.outbound_port),
            "--inbound-port",
            str(self.inbound_port),
            "--exclude-inbound-ports",
            format_ports(self.exclude_inbound_ports),
            "--exclude-outbound-ports",
            format_ports(self.exclude_outbound_ports),
            "--include-outbound-cidrs",
            format_cidrs(self.include_outbound_cidrs),
            "--exclude-outbound-cidrs",
            format_cidrs(self.exclude_outbound_cidrs),
        ]


def _items(value: str) -> list[str]:
    """The comma-separated items of a list value; spaces around items are allowed."""
    if not value.strip(" "):
        return []
    return [item.strip(" ") for item in value.split(",")]


def _sorted(networks: set[Network]) -> tuple[Network, ...]:
    v4 = sorted(n for n in networks if isinstance(n, ipaddress.IPv4Network))
    v6 = sorted(n for n in networks if isinstance(n, ipaddress.IPv6Network))
    return (*v4, *v6)

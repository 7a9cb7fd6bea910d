"""HOST:PORT, read and written the same way everywhere: listen addresses (sidecar settings, the
control plane's flags), the mesh file's endpoints, and request authorities the sidecar passes
through.

`split_host_port` only splits: `host:port`, `[IPv6]:port`, and either without a port. Whether a
port is required, which hosts are allowed and what an empty host means is the caller's rule (the
control plane binds an empty host as 0.0.0.0; an authority without a port means port 80).
`parse_endpoint` is the strict form the mesh file's endpoints and the injection's control-plane
address take: a DNS name, an IPv4 address or a bracketed IPv6 address, and a port from 1.
"""

from __future__ import annotations

import ipaddress
import re

MAX_PORT = 65535
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*",
    re.IGNORECASE,
)


def split_host_port(text: str) -> tuple[str, int | None] | None:
    """(host, port or None) of `host[:port]` or `[IPv6][:port]`; None when not of that form.

    The host comes without brackets and may be empty (`:15010`). Without brackets the port is
    after the last colon, so `::1:80` is host `::1`, port 80. A port is ASCII digits, 0-65535;
    `host:` (an empty port) is not of the form.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            return None
        if not rest:
            return host, None
        if rest[0] != ":":
            return None
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            return text, None
    if not port.isascii() or not port.isdigit() or int(port) > MAX_PORT:
        return None
    return host, int(port)


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """(host, port) of `name:port`, `IPv4:port` or `[IPv6]:port` with a port from 1 to 65535;
    None when the text is anything else (an IPv6 address must be in brackets)."""
    host, port = split_host_port(text) or ("", None)
    if port is None or port < 1:
        return None
    if text.startswith("["):
        try:
            ok = ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
    else:
        ok = _HOST_NAME.fullmatch(host) is not None
    return (host, port) if ok else None


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

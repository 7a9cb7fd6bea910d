"""Where a redirected connection was going: its original destination.

The interception rules REDIRECT a connection to the sidecar's listener; conntrack keeps the
destination the app asked for. The kernel hands it back through getsockopt: `SO_ORIGINAL_DST`
(80) at level SOL_IP for IPv4, `IP6T_SO_ORIGINAL_DST` (also 80) at level SOL_IPV6 for IPv6, as a
sockaddr_in / sockaddr_in6. An IPv6 listener that also accepts IPv4 (a v4-mapped peer) holds an
IPv4 conntrack entry, so it is asked at SOL_IP as well.

A connection that was not redirected has either no conntrack entry (the call fails, ENOENT) or
an original destination equal to the listener's own address: both give None, which a listener
takes as "this connection was made to me directly".
"""

from __future__ import annotations

import socket
import sys
from typing import Any, Final, Protocol

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IP: Final = 0
SOL_IPV6: Final = 41
_SOCKADDR_IN: Final = 16
_SOCKADDR_IN6: Final = 28
_V4_MAPPED: Final = "::ffff:"


class SocketLike(Protocol):
    """What is asked of the socket: a socket.socket, or an asyncio transport's "socket"."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def getsockname(self) -> Any: ...


def decode_sockaddr(raw: bytes) -> tuple[str, int] | None:
    """(host, port) of a sockaddr_in or sockaddr_in6 as the kernel writes it; None otherwise."""
    if len(raw) < 2:
        return None
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return unmapped(socket.inet_ntop(socket.AF_INET6, raw[8:24])), port
    return None


def original_destination(sock: SocketLike) -> tuple[str, int] | None:
    """The redirected connection's original (host, port); None when it was not redirected."""
    if sock.family == socket.AF_INET:
        asks = [(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)]
    elif sock.family == socket.AF_INET6:
        asks = [
            (SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6),
            (SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN),
        ]
    else:
        return None
    for level, option, size in asks:
        try:
            destination = decode_sockaddr(sock.getsockopt(level, option, size))
        except OSError:  # no conntrack entry, or not this family's
            continue
        if destination is None:
            continue
        host, port = sock.getsockname()[:2]
        if destination == (unmapped(host), port):
            return None  # made to the listener itself: not redirected
        return destination
    return None


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:10.0.0.1) as the IPv4 address it stands for."""
    if host.startswith(_V4_MAPPED) and "." in host:
        return host[len(_V4_MAPPED) :]
    return host

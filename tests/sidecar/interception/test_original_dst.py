"""Decoding the original destination; the redirect itself is shown in tests/e2e (netns)."""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

from sidecar.interception.original_dst import (
    IP6T_SO_ORIGINAL_DST,
    SO_ORIGINAL_DST,
    SOL_IP,
    SOL_IPV6,
    decode_sockaddr,
    original_destination,
)

ORDER = "<" if sys.byteorder == "little" else ">"


def sockaddr_in(host: str, port: int) -> bytes:
    return (
        struct.pack(ORDER + "H", socket.AF_INET)
        + struct.pack(">H", port)
        + socket.inet_pton(socket.AF_INET, host)
        + bytes(8)
    )


def sockaddr_in6(host: str, port: int) -> bytes:
    return (
        struct.pack(ORDER + "H", socket.AF_INET6)
        + struct.pack(">HI", port, 0)
        + socket.inet_pton(socket.AF_INET6, host)
        + struct.pack(ORDER + "I", 0)
    )


class KernelAnswer:
    """A socket whose getsockopt answers as the kernel does for the given levels."""

    def __init__(self, family: int, local: tuple[str, int], answers: dict[int, bytes]) -> None:
        self.family = family
        self.local = local
        self.answers = answers
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
        self.asked.append((level, optname, buflen))
        if level not in self.answers:
            raise FileNotFoundError(2, "No such file or directory")
        return self.answers[level][:buflen]

    def getsockname(self) -> Any:
        return self.local


def test_sockaddrs_decode_to_host_and_port() -> None:
    assert decode_sockaddr(sockaddr_in("10.96.0.10", 443)) == ("10.96.0.10", 443)
    assert decode_sockaddr(sockaddr_in6("fd00::2", 8080)) == ("fd00::2", 8080)
    assert decode_sockaddr(sockaddr_in6("::ffff:10.1.2.3", 80)) == ("10.1.2.3", 80)
    assert decode_sockaddr(b"") is None
    assert decode_sockaddr(b"\x00\x00" + bytes(14)) is None  # AF_UNSPEC


def test_a_redirected_ipv4_connection_gives_where_the_app_was_going() -> None:
    sock = KernelAnswer(socket.AF_INET, ("127.0.0.1", 15001), {SOL_IP: sockaddr_in("10.1.2.3", 80)})
    assert original_destination(sock) == ("10.1.2.3", 80)
    assert sock.asked == [(SOL_IP, SO_ORIGINAL_DST, 16)]


def test_a_redirected_ipv6_connection_is_asked_at_sol_ipv6() -> None:
    sock = KernelAnswer(
        socket.AF_INET6, ("::1", 15001, 0, 0), {SOL_IPV6: sockaddr_in6("fd00::2", 443)}
    )
    assert original_destination(sock) == ("fd00::2", 443)
    assert sock.asked[0] == (SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)


def test_an_ipv4_peer_of_a_dual_stack_listener_is_asked_at_sol_ip() -> None:
    local = ("::ffff:10.0.0.2", 15006, 0, 0)
    sock = KernelAnswer(socket.AF_INET6, local, {SOL_IP: sockaddr_in("10.0.0.2", 8080)})
    assert original_destination(sock) == ("10.0.0.2", 8080)


def test_a_connection_made_to_the_listener_itself_was_not_redirected() -> None:
    own = KernelAnswer(
        socket.AF_INET, ("10.0.0.2", 15006), {SOL_IP: sockaddr_in("10.0.0.2", 15006)}
    )
    assert original_destination(own) is None
    mapped = KernelAnswer(
        socket.AF_INET6, ("::ffff:10.0.0.2", 15006, 0, 0), {SOL_IP: sockaddr_in("10.0.0.2", 15006)}
    )
    assert original_destination(mapped) is None
    untracked = KernelAnswer(socket.AF_INET, ("127.0.0.1", 15001), {})
    assert original_destination(untracked) is None


def test_a_real_loopback_connection_without_rules_has_no_original_destination() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
        with client, accepted:
            assert original_destination(accepted) is None


def test_a_unix_socket_has_none() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert original_destination(left) is None

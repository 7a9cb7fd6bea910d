"""HOST:PORT as every part of the mesh reads it (settings, control plane, mesh file, authority)."""

from __future__ import annotations

import pytest

from mesh.address import join_host_port, parse_endpoint, split_host_port


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("127.0.0.1:15001", ("127.0.0.1", 15001)),
        ("payments", ("payments", None)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::1]", ("::1", None)),
        ("::1:8080", ("::1", 8080)),  # without brackets the port follows the last colon
        (":15010", ("", 15010)),  # the caller decides what an empty host means
        ("host:0", ("host", 0)),
    ],
)
def test_host_and_port_are_split(text: str, parts: tuple[str, int | None]) -> None:
    assert split_host_port(text) == parts


@pytest.mark.parametrize(
    "text", ["host:", "host:65536", "host:8o", "host:²", "[::1", "[::1]8080", "[::1]:"]
)
def test_a_port_that_is_not_0_to_65535_in_digits_is_refused(text: str) -> None:
    assert split_host_port(text) is None


def test_ipv6_hosts_are_written_in_brackets() -> None:
    assert join_host_port("::1", 15010) == "[::1]:15010"
    assert join_host_port("10.0.0.7", 80) == "10.0.0.7:80"


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("payments.default.svc:15010", ("payments.default.svc", 15010)),
        ("10.0.0.7:8080", ("10.0.0.7", 8080)),
        ("[fd00::7]:8080", ("fd00::7", 8080)),
        ("fd00::7:8080", None),  # an IPv6 endpoint needs its brackets
        ("[10.0.0.7]:8080", None),  # brackets hold IPv6 only
        ("payments:0", None),
        ("payments", None),
        ("pay_ments:80", None),
    ],
)
def test_an_endpoint_is_a_dns_name_or_ip_and_a_port_from_1(
    text: str, parts: tuple[str, int] | None
) -> None:
    assert parse_endpoint(text) == parts

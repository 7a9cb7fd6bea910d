from __future__ import annotations

import ipaddress

import pytest

from mesh.interception import (
    InterceptionError,
    parse_cidrs,
    parse_include_cidrs,
    parse_port,
    parse_ports,
    parse_uid,
)


def error_of(parse: object, key: str, value: str) -> str:
    assert callable(parse)
    with pytest.raises(InterceptionError) as caught:
        parse(key, value)
    return str(caught.value)


def test_port_lists_are_sorted_without_duplicates_and_empty_means_none() -> None:
    assert parse_ports("--exclude-inbound-ports", "15090, 15000,15021,15000") == (
        15000,
        15021,
        15090,
    )
    assert parse_ports("--exclude-inbound-ports", "") == ()
    assert parse_ports("--exclude-inbound-ports", "  ") == ()


@pytest.mark.parametrize("value", ["0", "65536", "http", "80,,90", "80,", "+80", "٣٣", "8 0"])
def test_a_bad_port_list_names_the_key_the_item_and_the_form(value: str) -> None:
    message = error_of(parse_ports, "outrigger.dev/exclude-outbound-ports", value)
    assert message.startswith("outrigger.dev/exclude-outbound-ports: ")
    assert repr(value) in message
    assert "comma-separated ports 1-65535" in message


def test_single_ports_and_uids_take_numbers_only() -> None:
    assert parse_port("--outbound-port", "15001") == 15001
    assert parse_uid("--proxy-uid", "1337") == 1337
    assert "--outbound-port: 'x' is not a port" in error_of(parse_port, "--outbound-port", "x")
    assert "--proxy-uid: '-1' is not a user id" in error_of(parse_uid, "--proxy-uid", "-1")


def test_cidr_lists_put_ipv4_first_and_take_bare_addresses_as_hosts() -> None:
    nets = parse_cidrs("--exclude-outbound-cidrs", "fd00::/8, 10.0.0.0/8,169.254.169.254")
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("169.254.169.254/32"),
        ipaddress.ip_network("fd00::/8"),
    )


def test_a_network_with_host_bits_is_refused_with_the_network_meant() -> None:
    message = error_of(parse_cidrs, "--exclude-outbound-cidrs", "10.1.2.3/8")
    assert "did you mean 10.0.0.0/8?" in message
    assert "comma-separated networks" in message


def test_include_takes_a_star_for_everything_and_empty_for_nothing() -> None:
    key = "--include-outbound-cidrs"
    assert parse_include_cidrs(key, "*") is None
    assert parse_include_cidrs(key, "") == ()
    assert parse_include_cidrs(key, "10.96.0.0/12") == (ipaddress.ip_network("10.96.0.0/12"),)
    message = error_of(parse_include_cidrs, key, "*,10.0.0.0/8")
    assert "mixes * with networks" in message
    assert "the form is * (every destination) or comma-separated networks" in error_of(
        parse_include_cidrs, key, "ten"
    )

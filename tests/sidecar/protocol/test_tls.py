"""The ClientHello reader: real hellos from Python's ssl module, built ones, and any bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.protocol.tls import (
    NEED_MORE,
    ClientHello,
    NeedMore,
    NotTls,
    parse_client_hello,
    sniff,
)
from tests.sidecar.protocol.tls_hellos import (
    built_hello,
    handshake_of,
    real_client_hello,
    records,
    vector,
)

# --- real ClientHellos -----------------------------------------------------------------------


def test_a_real_client_hello_gives_its_server_name_and_alpn() -> None:
    flight = real_client_hello("Payments.Default.svc.cluster.local", ("h2", "http/1.1"))
    assert sniff(flight) is True
    assert parse_client_hello(flight) == ClientHello(
        "payments.default.svc.cluster.local", ("h2", "http/1.1")
    )


def test_a_real_client_hello_without_sni_or_alpn_gives_none() -> None:
    assert parse_client_hello(real_client_hello(None)) == ClientHello(None, ())


def test_every_prefix_of_a_real_client_hello_needs_more() -> None:
    flight = real_client_hello("api.example.com", ("h2",))
    for end in range(len(flight)):
        assert parse_client_hello(flight[:end]) is NEED_MORE, end
    assert parse_client_hello(flight + b"\x17\x03\x03\x00\x05early") == ClientHello(
        "api.example.com", ("h2",)
    )


@given(st.lists(st.integers(1, 300), max_size=12))
def test_a_real_client_hello_split_over_many_records_reads_the_same(sizes: list[int]) -> None:
    flight = real_client_hello("api.example.com", ("http/1.1",))
    split = records(handshake_of(flight), sizes)
    assert parse_client_hello(split) == ClientHello("api.example.com", ("http/1.1",))


@given(st.data())
def test_a_real_client_hello_with_any_byte_changed_never_raises(data: st.DataObject) -> None:
    flight = bytearray(real_client_hello("api.example.com", ("h2",)))
    position = data.draw(st.integers(0, len(flight) - 1))
    flight[position] = data.draw(st.integers(0, 255).filter(lambda b: b != flight[position]))
    result = parse_client_hello(bytes(flight))
    assert isinstance(result, ClientHello | NeedMore | NotTls)


# --- built ClientHellos: every rule ----------------------------------------------------------

HOSTS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
PROTOCOLS = st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b.isascii()), max_size=4)


@given(st.one_of(st.none(), HOSTS), PROTOCOLS, st.lists(st.integers(1, 64), max_size=8))
def test_a_built_hello_in_any_records_reads_back_and_its_prefixes_need_more(
    host: str | None, alpn: list[bytes], sizes: list[int]
) -> None:
    message = built_hello(None if host is None else host.encode(), alpn)
    wire = records(message, sizes)
    expected = ClientHello(host, tuple(p.decode() for p in alpn))
    assert parse_client_hello(wire) == expected
    for end in range(0, len(wire), 7):
        assert parse_client_hello(wire[:end]) is NEED_MORE


def not_tls(wire: bytes) -> str:
    result = parse_client_hello(wire)
    assert isinstance(result, NotTls), result
    return result.reason


def test_what_is_not_a_client_hello_says_why() -> None:
    assert "not a TLS handshake record" in not_tls(b"GET / HTTP/1.1\r\n")
    assert "not TLS" in not_tls(b"\x16\x02\x00")  # SSL 2 / 3.0-ish versions
    assert "not a ClientHello" in not_tls(records(b"\x02" + built_hello(b"a", [])[1:], []))
    assert "handshake record of 0 bytes" in not_tls(b"\x16\x03\x01\x00\x00")
    assert "more than" in not_tls(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")
    two = records(built_hello(b"a", []), [10])
    interrupted = two[:15] + b"\x15" + two[16:]  # an alert record in the middle
    assert "another record type" in not_tls(interrupted)


def test_a_server_name_must_be_one_dns_host_name() -> None:
    assert "DNS host name" in not_tls(records(built_hello(b"bad name", []), []))
    assert "DNS host name" in not_tls(records(built_hello(b"a\x00b", []), []))
    assert "empty label" in not_tls(records(built_hello(b"example.com.", []), []))
    two_names = b"\x00" + vector(2, b"a.com") + b"\x00" + vector(2, b"b.com")
    ext = b"\x00\x00" + vector(2, vector(2, two_names))
    assert "more than one host_name" in not_tls(records(built_hello(None, [], (ext,)), []))


def test_an_extension_twice_or_a_length_that_lies_is_refused() -> None:
    alpn = b"\x00\x10" + vector(2, vector(2, vector(1, b"h2")))
    assert "twice" in not_tls(records(built_hello(b"a.com", [], (alpn, alpn)), []))
    message = bytearray(built_hello(b"a.com", [b"h2"]))
    message[-3] += 1  # the ALPN name claims one byte more than its list holds
    assert "announced" in not_tls(records(bytes(message), []))
    empty_alpn = b"\x00\x10" + vector(2, vector(2, b"\x00"))
    assert "empty ALPN" in not_tls(records(built_hello(None, [], (empty_alpn,)), []))


@given(st.binary(max_size=600))
def test_any_bytes_give_a_result_never_an_exception(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), ClientHello | NeedMore | NotTls)
    assert sniff(data) in (True, False, None)


@given(st.binary(max_size=300))
def test_any_bytes_after_a_tls_record_header_give_a_result(data: bytes) -> None:
    wire = b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data
    assert isinstance(parse_client_hello(wire), ClientHello | NeedMore | NotTls)


def test_sniff_decides_on_the_record_header_and_handshake_type() -> None:
    assert sniff(b"") is None
    assert sniff(b"\x16\x03") is None
    assert sniff(b"\x16\x03\x01\x02\x00\x01") is True
    assert sniff(b"\x16\x03\x01\x02\x00\x02") is False  # a ServerHello
    assert sniff(b"GET ") is False
    assert sniff(b"\x16\x04") is False

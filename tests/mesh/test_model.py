from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.model import (
    Backoff,
    CircuitBreaker,
    MeshEndpoint,
    MeshError,
    Policy,
    Protocol,
    RetryBudget,
    load_mesh,
    parse_mesh,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh.yaml"


def one_service(**fields: Any) -> dict[str, Any]:
    service: dict[str, Any] = {"name": "payments", "endpoints": ["127.0.0.1:9001"]}
    service.update(fields)
    return {"services": [service]}


def with_policy(**policy: Any) -> dict[str, Any]:
    return one_service(policy=policy)


def error_of(data: dict[str, Any] | str) -> str:
    with pytest.raises(MeshError) as caught:
        parse_mesh(data, "mesh.yaml")
    return str(caught.value)


def test_example_mesh_parses_with_every_policy() -> None:
    mesh = load_mesh(EXAMPLE)
    assert [s.name for s in mesh.services] == ["payments", "orders", "frontend"]
    assert mesh.outbound_policy == "allow_any"
    assert mesh.tracing.sampling == 0.01
    assert mesh.tracing.otlp_endpoint == "http://127.0.0.1:4317"
    payments = mesh.services[0]
    assert payments.endpoints == (MeshEndpoint("127.0.0.1", 9001), MeshEndpoint("127.0.0.1", 9002))
    policy = payments.policy
    assert policy.timeout == 2.0
    assert policy.connect_timeout == 1.0
    assert policy.load_balancer == "least_request"
    assert policy.retries is not None
    assert policy.retries.attempts == 2
    assert policy.retries.per_try_timeout == 0.5
    assert policy.retries.retry_on == ("connect-failure", "gateway-error", "reset")
    assert policy.retries.status_codes == (503,)
    assert policy.retries.backoff == Backoff(base=0.025, max=0.25)
    assert policy.retries.budget == RetryBudget(percent=20.0, min_concurrency=3)
    assert policy.retries.non_idempotent is False
    assert policy.circuit_breaker == CircuitBreaker(
        consecutive_failures=5,
        open_for=30.0,
        max_ejection_percent=50,
        max_requests=1024,
        max_pending=1024,
    )
    frontend = mesh.services[2]
    assert frontend.namespace == "web"
    assert frontend.policy == Policy()


def test_defaults_are_envoy_and_istio_like() -> None:
    mesh = parse_mesh(one_service(), "mesh.yaml")
    service = mesh.services[0]
    assert (service.namespace, service.port) == ("default", 80)
    assert service.policy.timeout is None
    assert service.policy.retries is None
    assert service.policy.connect_timeout == 1.0
    assert service.policy.load_balancer == "round_robin"
    assert service.policy.circuit_breaker.consecutive_failures is None
    assert service.policy.circuit_breaker.max_ejection_percent == 10
    assert mesh.outbound_policy == "allow_any"


def test_retries_block_defaults() -> None:
    retries = parse_mesh(with_policy(retries={"attempts": 1}), "m.yaml").services[0].policy.retries
    assert retries is not None
    assert retries.retry_on == ("connect-failure", "reset")
    assert retries.status_codes == (503,)
    assert retries.budget is None
    assert retries.per_try_timeout is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_mesh(with_policy(timeout=text), "m.yaml").services[0].policy.timeout == seconds


@pytest.mark.parametrize("bad", ["2", 2, "2 s", "-1s", "1.s", "0s", "2sec", "1m30s", True])
def test_bad_durations_name_the_field_and_form(bad: object) -> None:
    message = error_of(with_policy(timeout=bad))
    assert message.startswith('mesh.yaml: service "payments": policy.timeout: must be a duration')


def test_retry_attempts_message_matches_the_contract() -> None:
    assert error_of(with_policy(retries={"attempts": "two"})) == (
        'mesh.yaml: service "payments": policy.retries.attempts: '
        'must be a whole number >= 0, got "two"'
    )


def test_unknown_key_names_it_and_lists_the_allowed_ones() -> None:
    message = error_of(with_policy(retries={"attempts": 1, "attempt": 2}))
    assert message.startswith('mesh.yaml: service "payments": policy.retries.attempt: unknown key')
    assert "attempts, per_try_timeout, retry_on, backoff, budget, non_idempotent" in message


def test_unknown_top_level_key() -> None:
    message = error_of({"service": []})
    assert message.startswith("mesh.yaml: service: unknown key; allowed keys are tracing")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (one_service(name="Pay_ments"), "mesh.yaml: services[0]: name: must be a DNS label"),
        (one_service(name="outbound"), "mesh.yaml: services[0]: name: 'outbound' is reserved"),
        ({"services": [{"endpoints": []}]}, "mesh.yaml: services[0]: name: is required"),
        ({"services": ["payments"]}, "mesh.yaml: services[0]: must be a mapping"),
        (
            one_service(namespace="Default"),
            'mesh.yaml: service "payments": namespace: must be a DNS label',
        ),
        (
            one_service(port=0),
            'mesh.yaml: service "payments": port: must be a whole number from 1 to 65535, got 0',
        ),
        (
            one_service(port=70000),
            'mesh.yaml: service "payments": port: must be a whole number from 1 to 65535',
        ),
        (
            one_service(endpoints=["127.0.0.1"]),
            'mesh.yaml: service "payments": endpoints[0]: must be "host:port"',
        ),
        (
            one_service(endpoints=["127.0.0.1:0"]),
            'mesh.yaml: service "payments": endpoints[0]: must be "host:port"',
        ),
        (
            one_service(endpoints=["127.0.0.1:9001", "127.0.0.1:9001"]),
            'mesh.yaml: service "payments": endpoints[1]: is listed twice',
        ),
        (
            {"services": [{"name": "payments"}]},
            'mesh.yaml: service "payments": endpoints: is required',
        ),
        (
            with_policy(load_balancer="maglev"),
            'mesh.yaml: service "payments": policy.load_balancer: must be one of round_robin, '
            'least_request, random, got "maglev"',
        ),
        (
            with_policy(retries={"attempts": 1, "retry_on": ["connect-failure", "teapot"]}),
            'mesh.yaml: service "payments": policy.retries.retry_on[1]: must be one of '
            "connect-failure, reset, gateway-error, 5xx, retriable-4xx, cancelled, "
            "deadline-exceeded, internal, resource-exhausted, unavailable or a 3-digit HTTP "
            'status code (e.g. "503"), got "teapot"',
        ),
        (
            with_policy(retries={"attempts": 1, "retry_on": [99]}),
            'mesh.yaml: service "payments": policy.retries.retry_on[0]: must be one of',
        ),
        (
            with_policy(retries={"per_try_timeout": "1s"}),
            'mesh.yaml: service "payments": policy.retries.attempts: is required',
        ),
        (
            with_policy(retries={"attempts": 1, "budget": {"percent": 120}}),
            'mesh.yaml: service "payments": policy.retries.budget.percent: must be a percentage '
            "from 0 to 100, got 120",
        ),
        (
            with_policy(retries={"attempts": 1, "backoff": {"base": "1s", "max": "10ms"}}),
            'mesh.yaml: service "payments": policy.retries.backoff.max: must not be shorter',
        ),
        (
            with_policy(retries={"attempts": 1, "non_idempotent": "yes"}),
            'mesh.yaml: service "payments": policy.retries.non_idempotent: must be true or false',
        ),
        (
            with_policy(circuit_breaker={"max_ejection_percent": 101}),
            'mesh.yaml: service "payments": policy.circuit_breaker.max_ejection_percent: '
            "must be a whole number from 0 to 100, got 101",
        ),
        (
            with_policy(circuit_breaker={"consecutive_failures": 0}),
            'mesh.yaml: service "payments": policy.circuit_breaker.consecutive_failures: '
            "must be a whole number >= 1, got 0",
        ),
        (
            with_policy(circuit_breaker={"max_requests": True}),
            'mesh.yaml: service "payments": policy.circuit_breaker.max_requests: '
            "must be a whole number >= 1, got true",
        ),
        (
            {"outbound_policy": "deny"},
            "mesh.yaml: outbound_policy: must be one of allow_any, registry_only",
        ),
        (
            {"tracing": {"sampling": 1.5}},
            "mesh.yaml: tracing.sampling: must be a fraction from 0 to 1, got 1.5",
        ),
        (
            {"tracing": {"otlp_endpoint": "127.0.0.1:4317"}},
            "mesh.yaml: tracing.otlp_endpoint: must be a URL",
        ),
        ({"services": {"payments": {}}}, "mesh.yaml: services: must be a list of services"),
    ],
)
def test_every_error_names_file_service_and_field(data: dict[str, Any], expected: str) -> None:
    assert error_of(data).startswith(expected)


def test_retry_on_accepts_codes_as_strings_and_ints() -> None:
    data = with_policy(retries={"attempts": 1, "retry_on": ["5xx", "503", 504, "retriable-4xx"]})
    retries = parse_mesh(data, "m.yaml").services[0].policy.retries
    assert retries is not None
    assert retries.retry_on == ("5xx", "retriable-4xx")
    assert retries.status_codes == (503, 504)


def test_the_same_name_in_two_namespaces_is_two_services() -> None:
    data = {
        "services": [
            {"name": "payments", "endpoints": []},
            {"name": "payments", "namespace": "other", "endpoints": []},
        ]
    }
    mesh = parse_mesh(data, "mesh.yaml")
    assert [(s.name, s.namespace) for s in mesh.services] == [
        ("payments", "default"),
        ("payments", "other"),
    ]


def test_a_name_twice_in_one_namespace_is_refused() -> None:
    data = {
        "services": [
            {"name": "payments", "namespace": "shop", "endpoints": []},
            {"name": "payments", "namespace": "shop", "endpoints": []},
        ]
    }
    assert error_of(data).startswith(
        "mesh.yaml: service \"payments\": name: is defined twice in namespace 'shop' "
        "(services[0] and services[1])"
    )


def test_defaults_apply_key_by_key_under_each_services_own_policy() -> None:
    data = {
        "defaults": {"timeout": "3s", "retries": {"attempts": 1, "per_try_timeout": "1s"}},
        "services": [
            {"name": "payments", "endpoints": [], "policy": {"retries": {"attempts": 4}}},
            {"name": "orders", "endpoints": []},
        ],
    }
    payments, orders = parse_mesh(data, "mesh.yaml").services
    assert payments.policy.timeout == 3.0
    assert payments.policy.retries is not None
    assert (payments.policy.retries.attempts, payments.policy.retries.per_try_timeout) == (4, 1.0)
    assert orders.policy.retries is not None and orders.policy.retries.attempts == 1
    assert payments.origin("retry-attempts") == "service"
    assert payments.origin("timeout") == "mesh"
    assert payments.origin("load-balancer") == "built-in"
    assert orders.origin("retry-attempts") == "mesh"


def test_defaults_are_checked_like_a_policy() -> None:
    assert error_of({"defaults": {"timeout": "soon"}}).startswith(
        'mesh.yaml: defaults.timeout: must be a duration like "250ms"'
    )
    assert error_of({"defaults": {"retries": {"attempt": 1}}}).startswith(
        "mesh.yaml: defaults.retries.attempt: unknown key"
    )


def test_a_service_backoff_that_contradicts_the_defaults_is_refused() -> None:
    data = {
        "defaults": {"retries": {"backoff": {"max": "50ms"}}},
        "services": [
            {
                "name": "payments",
                "endpoints": [],
                "policy": {"retries": {"attempts": 1, "backoff": {"base": "100ms"}}},
            }
        ],
    }
    assert error_of(data) == (
        'mesh.yaml: service "payments": policy.retries.backoff.base: must not be longer than '
        'the backoff max (50ms), got "100ms"'
    )


def test_a_retries_block_may_leave_attempts_to_the_defaults() -> None:
    data = {
        "defaults": {"retries": {"attempts": 2}},
        "services": [
            {"name": "payments", "endpoints": [], "policy": {"retries": {"retry_on": ["5xx"]}}}
        ],
    }
    retries = parse_mesh(data, "m.yaml").services[0].policy.retries
    assert retries is not None and (retries.attempts, retries.retry_on) == (2, ("5xx",))


def test_addresses_and_calls() -> None:
    data = one_service(addresses=["10.96.0.12", "FD00::C"], calls=["orders", "ledger.finance"])
    service = parse_mesh(data, "m.yaml").services[0]
    assert service.addresses == ("10.96.0.12", "fd00::c")
    assert service.calls == ("orders", "ledger.finance")
    assert error_of(one_service(addresses=["10.96.0"])).startswith(
        'mesh.yaml: service "payments": addresses[0]: must be an IP address'
    )
    assert error_of(one_service(calls=["Orders"])).startswith(
        'mesh.yaml: service "payments": calls[0]: must be a service name'
    )


def test_protocol_is_declared_per_service_or_left_to_detection() -> None:
    assert parse_mesh(one_service(), "m.yaml").services[0].protocol is None
    for name in ("http", "http2", "grpc", "tcp", "tls"):
        service = parse_mesh(one_service(protocol=name), "m.yaml").services[0]
        assert service.protocol == Protocol(name)
    assert error_of(one_service(protocol="h2")) == (
        'mesh.yaml: service "payments": protocol: must be one of http, http2, grpc, tcp, tls, '
        'got "h2"'
    )


def test_one_virtual_address_and_port_reach_one_service() -> None:
    data = {
        "services": [
            {"name": "a", "endpoints": [], "addresses": ["10.96.0.1"]},
            {"name": "b", "endpoints": [], "addresses": ["10.96.0.1"]},
            {"name": "c", "port": 8080, "endpoints": [], "addresses": ["10.96.0.1"]},
        ]
    }
    assert error_of(data) == (
        'mesh.yaml: service "b": addresses: 10.96.0.1:80 is already service "a.default"\'s address'
    )


def test_duplicate_yaml_keys_are_refused() -> None:
    text = "services:\n  - name: a\n    name: b\n    endpoints: []\n"
    assert "duplicate key 'name'" in error_of(text)


def test_invalid_yaml_and_empty_file() -> None:
    assert error_of("services: [").startswith("mesh.yaml: not valid YAML")
    assert error_of("").startswith("mesh.yaml: is empty")


def test_ipv6_and_hostname_endpoints() -> None:
    data = one_service(endpoints=["[::1]:9001", "Payments-0.local:80"])
    endpoints = parse_mesh(data, "m.yaml").services[0].endpoints
    assert endpoints == (MeshEndpoint("::1", 9001), MeshEndpoint("payments-0.local", 80))
    assert str(endpoints[0]) == "[::1]:9001"


def test_load_mesh_names_an_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(MeshError, match=r"nope\.yaml: cannot read the mesh file"):
        load_mesh(missing)


def test_load_mesh_uses_the_path_in_messages(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("outbound_policy: nope\n")
    with pytest.raises(MeshError, match=rf"^{path}: outbound_policy: must be one of"):
        load_mesh(path)

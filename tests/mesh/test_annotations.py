"""Policy annotations: checked by the mesh file's validator, resolved level by level."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from mesh.annotations import CALLS, POLICY_KEYS, check, parse_calls, resolve
from mesh.model import MeshError, parse_mesh
from mesh.policy import SETTINGS, Policy, Setting, effective_values

NO_DEFAULTS: Any = MappingProxyType({})


def nested(setting: Setting, value: object) -> dict[str, Any]:
    """{"retries": {"attempts": value}} for retries.attempts."""
    out: Any = value
    for part in reversed(setting.path):
        out = {part: out}
    return dict(out)


def file_error(setting: Setting, value: object) -> str:
    data = {"services": [{"name": "payments", "endpoints": [], "policy": nested(setting, value)}]}
    with pytest.raises(MeshError) as caught:
        parse_mesh(data, "mesh.yaml")
    return str(caught.value)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_a_bad_value_reads_the_same_in_an_annotation_and_in_the_mesh_file(
    setting: Setting,
) -> None:
    key = f"outrigger.dev/{setting.key}"
    problems = check({key: "bogus"})
    assert [p.key for p in problems] == [key]
    annotation_says = problems[0].message.removeprefix(f"{key}: ")
    file_message = file_error(setting, setting.from_text("bogus"))
    file_says = re.split(rf"policy\.{setting.mesh_path}(?:\[0\])?: ", file_message, maxsplit=1)[1]
    assert annotation_says == file_says
    assert 'got "bogus"' in annotation_says


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_each_example_means_what_the_mesh_file_says(setting: Setting) -> None:
    annotations = {f"outrigger.dev/{setting.key}": setting.example}
    if setting.key != "retry-attempts":
        annotations["outrigger.dev/retry-attempts"] = "1"  # so retry settings take effect
    resolved = resolve(annotations, {}, NO_DEFAULTS)
    assert resolved.problems == ()
    policy_yaml: dict[str, Any] = {}
    for key, text in annotations.items():
        s = next(s for s in SETTINGS if f"outrigger.dev/{s.key}" == key)
        merge(policy_yaml, nested(s, s.from_text(text)))
    data = {"services": [{"name": "p", "endpoints": [], "policy": policy_yaml}]}
    assert resolved.policy == parse_mesh(data, "m.yaml").services[0].policy
    assert dict(resolved.origins)[setting.key] == "service"


def merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict):
            merge(into.setdefault(key, {}), value)
        else:
            into[key] = value


def test_service_beats_namespace_beats_mesh_beats_built_in() -> None:
    defaults = parse_mesh(
        {"defaults": {"timeout": "9s", "connect_timeout": "3s", "load_balancer": "random"}}, "m"
    ).defaults
    resolved = resolve(
        {"outrigger.dev/timeout": "1s"},
        {"outrigger.dev/timeout": "5s", "outrigger.dev/connect-timeout": "2s"},
        defaults,
    )
    assert resolved.policy.timeout == 1.0
    assert resolved.policy.connect_timeout == 2.0
    assert resolved.policy.load_balancer == "random"
    assert resolved.policy.circuit_breaker.max_requests == 1024
    origins = dict(resolved.origins)
    assert (origins["timeout"], origins["connect-timeout"]) == ("service", "namespace")
    assert (origins["load-balancer"], origins["max-requests"]) == ("mesh", "built-in")
    assert list(origins) == [s.key for s in SETTINGS]


def test_an_invalid_value_falls_back_for_its_key_only() -> None:
    resolved = resolve(
        {
            "outrigger.dev/timeout": "2 seconds",
            "outrigger.dev/retry-attempts": "3",
            "outrigger.dev/load-balancer": "least_request",
        },
        {"outrigger.dev/timeout": "5s"},
        NO_DEFAULTS,
    )
    assert resolved.policy.timeout == 5.0  # the namespace's
    assert resolved.policy.retries is not None and resolved.policy.retries.attempts == 3
    assert resolved.policy.load_balancer == "least_request"
    (problem,) = resolved.problems
    assert (problem.key, problem.value, problem.level) == (
        "outrigger.dev/timeout",
        "2 seconds",
        "service",
    )
    assert (problem.used, problem.used_from) == ("5s", "namespace")
    assert problem.describe() == (
        'outrigger.dev/timeout: must be a duration like "250ms", "1.5s", "2s" or "1m", '
        'got "2 seconds"; using 5s (namespace) instead'
    )


def test_an_invalid_namespace_value_falls_back_to_the_built_in() -> None:
    resolved = resolve({}, {"outrigger.dev/max-requests": "0"}, NO_DEFAULTS)
    assert resolved.policy == Policy()
    (problem,) = resolved.problems
    assert (problem.level, problem.used, problem.used_from) == ("namespace", "1024", "built-in")


def test_a_backoff_max_below_the_namespace_base_falls_back() -> None:
    resolved = resolve(
        {"outrigger.dev/retry-attempts": "1", "outrigger.dev/retry-backoff-max": "50ms"},
        {"outrigger.dev/retry-backoff-base": "100ms"},
        NO_DEFAULTS,
    )
    assert resolved.policy.retries is not None
    assert (resolved.policy.retries.backoff.base, resolved.policy.retries.backoff.max) == (0.1, 1.0)
    (problem,) = resolved.problems
    assert problem.key == "outrigger.dev/retry-backoff-max"
    assert problem.message == (
        "outrigger.dev/retry-backoff-max: must not be shorter than the backoff base (100ms), "
        'got "50ms"'
    )
    assert (problem.used, problem.used_from) == ("1s", "built-in")


def test_a_service_base_above_the_namespace_max_is_the_one_that_falls_back() -> None:
    resolved = resolve(
        {"outrigger.dev/retry-attempts": "1", "outrigger.dev/retry-backoff-base": "2s"},
        {"outrigger.dev/retry-backoff-max": "1s"},
        NO_DEFAULTS,
    )
    assert resolved.policy.retries is not None
    assert resolved.policy.retries.backoff.base == 0.025
    assert [p.key for p in resolved.problems] == ["outrigger.dev/retry-backoff-base"]


def test_check_finds_a_backoff_conflict_within_one_object() -> None:
    problems = check(
        {"outrigger.dev/retry-backoff-base": "1s", "outrigger.dev/retry-backoff-max": "100ms"}
    )
    assert [p.key for p in problems] == ["outrigger.dev/retry-backoff-max"]


def test_retry_on_is_comma_separated() -> None:
    resolved = resolve(
        {"outrigger.dev/retry-attempts": "2", "outrigger.dev/retry-on": "reset, 503,gateway-error"},
        {},
        NO_DEFAULTS,
    )
    assert resolved.policy.retries is not None
    assert resolved.policy.retries.retry_on == ("gateway-error", "reset")
    assert resolved.policy.retries.status_codes == (503,)
    (problem,) = check({"outrigger.dev/retry-on": "reset,teapot"})
    assert problem.message == (
        "outrigger.dev/retry-on: must be one of connect-failure, reset, gateway-error, 5xx, "
        "retriable-4xx, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable "
        'or a 3-digit HTTP status code (e.g. "503"), got "teapot"'
    )


def test_keys_read_elsewhere_are_not_policy_problems_and_typos_are() -> None:
    problems = check(
        {
            "outrigger.dev/inject": "enabled",
            "outrigger.dev/calls": "orders,payments.shop",
            "outrigger.dev/proxy-cpu": "100m",
            "outrigger.dev/timout": "2s",
            "example.com/timeout": "whatever",
        }
    )
    assert [p.message for p in problems] == [
        "outrigger.dev/timout: not a known annotation; did you mean outrigger.dev/timeout?"
    ]


def test_calls_lists_service_names() -> None:
    assert parse_calls("orders, payments.shop,orders") == (("orders", "payments.shop"), None)
    names, problem = parse_calls("orders,Payments!")
    assert names == ()
    assert problem is not None and problem.key == CALLS
    assert problem.message.startswith("outrigger.dev/calls: must be a comma-separated list")


def test_effective_values_read_back_as_the_same_policy() -> None:
    annotations = {
        "outrigger.dev/timeout": "1500ms",
        "outrigger.dev/retry-attempts": "2",
        "outrigger.dev/retry-budget-percent": "25.5",
        "outrigger.dev/breaker-consecutive-failures": "3",
        "outrigger.dev/max-pending": "7",
    }
    policy = resolve(annotations, {}, NO_DEFAULTS).policy
    shown = effective_values(policy)
    assert shown["timeout"] == "1500ms"
    again = {f"outrigger.dev/{k}": v for k, v in shown.items() if v != "none"}
    assert set(again) <= set(POLICY_KEYS)
    assert resolve(again, {}, NO_DEFAULTS).policy == policy


def test_the_readme_lists_every_annotation_with_its_form_default_and_example() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for s in SETTINGS:
        row = f'| `outrigger.dev/{s.key}` | {s.form} | {s.builtin} | `"{s.example}"` |'
        assert row in readme, s.key
        assert check({f"outrigger.dev/{s.key}": s.example}) == []

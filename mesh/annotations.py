"""`outrigger.dev/*` annotations on Services and Namespaces: the policy they set, checked.

A Service's annotations set its policy; a Namespace's set defaults for the Services in it. The
keys are the mesh file's policy settings flattened with dashes (`mesh.policy.SETTINGS`:
`outrigger.dev/timeout`, `outrigger.dev/retry-attempts`, ...) and their values are checked by the
same functions as the mesh file's, so a message reads the same wherever the value was written::

    outrigger.dev/retry-attempts: must be a whole number >= 0, got "two"

Entry points, all pure (no clock, no I/O), for the control plane, the validating webhook and
`outrigger analyze`:

- `read_annotations(metadata)`: an object's `outrigger.dev/` annotations as text, and a problem
  for each value that is not a string (the API server takes only strings: an unquoted `2` in
  YAML is refused there, so the webhook and `analyze` refuse it here with the fix).
- `check(annotations)`: every problem in one object's annotations: bad policy values, a
  backoff max shorter than its base, a malformed `outrigger.dev/calls`, and `outrigger.dev/`
  keys nobody knows (a typo would otherwise be ignored silently). Keys other parts of Outrigger
  read (injection, pod settings, `calls`) are known and not policy: not reported.
- `resolve(service, namespace, defaults)`: the effective policy, key by key: Service annotation,
  else Namespace annotation, else the mesh file's `defaults:`, else built-in. An invalid value
  falls back to the next level for its key only, so every other key still applies and the
  result depends only on the objects given (every control-plane replica computes the same).
  Each problem says which value was used instead and where it came from.

Values are annotation text: whole numbers in decimal, `true`/`false`, durations as in the mesh
file, lists comma-separated (`outrigger.dev/retry-on: "connect-failure,503"`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from mesh.model import parse_call, show_value
from mesh.policy import (
    ORIGINS,
    SETTINGS,
    FieldError,
    Origin,
    Origins,
    Policy,
    PolicyValues,
    backoff_problem,
    build_policy,
    effective_values,
    origins_of,
)

PREFIX: Final = "outrigger.dev/"
POLICY_KEYS: Final[tuple[str, ...]] = tuple(PREFIX + s.key for s in SETTINGS)
CALLS: Final = PREFIX + "calls"
# outrigger.dev/ keys read elsewhere: injection (label or annotation), its record, the pod
# settings the injector reads (control_plane.webhooks.inject), and the call graph
# `outrigger analyze` reads.
INJECT: Final = PREFIX + "inject"
STATUS: Final = PREFIX + "status"
NATIVE_SIDECAR: Final = PREFIX + "native-sidecar"
PROXY_CPU: Final = PREFIX + "proxy-cpu"
PROXY_MEMORY: Final = PREFIX + "proxy-memory"
PROXY_CPU_LIMIT: Final = PREFIX + "proxy-cpu-limit"
PROXY_MEMORY_LIMIT: Final = PREFIX + "proxy-memory-limit"
TRACE_SAMPLING: Final = PREFIX + "trace-sampling"
PROXY_LOG_LEVEL: Final = PREFIX + "proxy-log-level"
EXCLUDE_OUTBOUND_PORTS: Final = PREFIX + "exclude-outbound-ports"
EXCLUDE_INBOUND_PORTS: Final = PREFIX + "exclude-inbound-ports"
INCLUDE_OUTBOUND_CIDRS: Final = PREFIX + "include-outbound-cidrs"
EXCLUDE_OUTBOUND_CIDRS: Final = PREFIX + "exclude-outbound-cidrs"
# Every outrigger.dev/ key that means something on a pod (the injector warns of others); with
# the policy keys, every key that is known anywhere.
POD_KEYS: Final[frozenset[str]] = frozenset(
    (
        INJECT,
        STATUS,
        CALLS,
        NATIVE_SIDECAR,
        PROXY_CPU,
        PROXY_MEMORY,
        PROXY_CPU_LIMIT,
        PROXY_MEMORY_LIMIT,
        TRACE_SAMPLING,
        PROXY_LOG_LEVEL,
        EXCLUDE_OUTBOUND_PORTS,
        EXCLUDE_INBOUND_PORTS,
        INCLUDE_OUTBOUND_CIDRS,
        EXCLUDE_OUTBOUND_CIDRS,
    )
)
_CALLS_FORM: Final = 'a comma-separated list of service names, "name" or "name.namespace"'


@dataclass(frozen=True, slots=True)
class Problem:
    """One bad annotation: its key, its value, and a message naming the key and allowed form."""

    key: str  # the whole annotation key, e.g. "outrigger.dev/timeout"
    value: str
    message: str  # 'outrigger.dev/timeout: must be a duration like "250ms", ..., got "soon"'
    level: Origin | None = None  # resolve(): the object it is on (service or namespace)
    used: str | None = None  # resolve(): the value applied instead, e.g. "5s" ("none": unset)
    used_from: Origin | None = None  # resolve(): where that value came from

    def describe(self) -> str:
        """The message with the value used instead, for logs and Events."""
        if self.used is None:
            return self.message
        return f"{self.message}; using {self.used} ({self.used_from}) instead"


@dataclass(frozen=True, slots=True)
class Resolved:
    policy: Policy
    origins: Origins  # (setting key, origin) in SETTINGS order
    problems: tuple[Problem, ...]


def read_annotations(metadata: object) -> tuple[dict[str, str], list[Problem]]:
    """The `outrigger.dev/` annotations of an object's `metadata`, each as text, and the
    problems with their shape (a value that is not a string is kept as its YAML spelling)."""
    if not isinstance(metadata, Mapping):
        return {}, []
    annotations = metadata.get("annotations")
    if annotations is None:
        return {}, []
    if not isinstance(annotations, Mapping):
        message = (
            f"metadata.annotations: must be a mapping of strings, got {show_value(annotations)}"
        )
        return {}, [
            Problem(key="metadata.annotations", value=show_value(annotations), message=message)
        ]
    found: dict[str, str] = {}
    problems: list[Problem] = []
    for key, value in annotations.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        if isinstance(value, str):
            found[key] = value
            continue
        text = "" if value is None else show_value(value).strip('"')
        found[key] = text
        quote = f' (quote it in YAML: "{text}")' if text else ""
        message = f"{key}: must be a string{quote}, got {show_value(value)}"
        problems.append(Problem(key=key, value=text, message=message))
    return found, problems


def _problem(key: str, value: str, problem: str, got: object) -> Problem:
    return Problem(key=key, value=value, message=f"{key}: {problem}, got {show_value(got)}")


def _policy_values(annotations: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """The checked values the policy annotations set (by setting key), and the bad ones."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for setting in SETTINGS:
        key = PREFIX + setting.key
        text = annotations.get(key)
        if text is None:
            continue
        plain = setting.from_text(text)
        try:
            values[setting.key] = setting.check(plain)
        except FieldError as exc:
            problems.append(
                Problem(key=key, value=text, message=f"{key}: {exc.message(show_value)}")
            )
    return values, problems


def parse_calls(text: str) -> tuple[tuple[str, ...], Problem | None]:
    """The services an `outrigger.dev/calls` value names, or the problem with it."""
    names = [item.strip() for item in text.split(",")]
    bad = [name for name in names if parse_call(name) is None]
    if bad:
        return (), _problem(CALLS, text, f'must be {_CALLS_FORM} (e.g. "orders,payments")', text)
    return tuple(dict.fromkeys(names)), None


def is_known(key: str) -> bool:
    """An `outrigger.dev/` key some part of Outrigger reads (policy, injection, calls)."""
    return key in POD_KEYS or key in POLICY_KEYS


def closest_key(key: str) -> str | None:
    """The known `outrigger.dev/` key an unknown one was probably meant to be, if any."""
    close = difflib.get_close_matches(key, [*POLICY_KEYS, *sorted(POD_KEYS)], n=1)
    return close[0] if close else None


def _unknown(key: str, value: str) -> Problem:
    close = closest_key(key)
    hint = (
        f"did you mean {close}?"
        if close
        else "the policy keys are " + ", ".join(s.key for s in SETTINGS)
    )
    return Problem(key=key, value=value, message=f"{key}: not a known annotation; {hint}")


def _other_problems(annotations: Mapping[str, str]) -> list[Problem]:
    """Problems outside the policy keys: a malformed calls list, unknown outrigger.dev/ keys."""
    problems: list[Problem] = []
    if CALLS in annotations:
        _, calls_problem = parse_calls(annotations[CALLS])
        if calls_problem is not None:
            problems.append(calls_problem)
    for key, value in sorted(annotations.items()):
        if key.startswith(PREFIX) and not is_known(key):
            problems.append(_unknown(key, value))
    return problems


def check(annotations: Mapping[str, str]) -> list[Problem]:
    """Every problem in one object's `outrigger.dev/` annotations (empty: all good)."""
    values, problems = _policy_values(annotations)
    found = backoff_problem(values, "retry-backoff-max")
    if found is not None:
        key, problem = found
        full = PREFIX + key
        problems.append(_problem(full, annotations[full], problem, annotations[full]))
    return problems + _other_problems(annotations)


def _rank(origin: Origin) -> int:
    return ORIGINS.index(origin)


def resolve(
    service: Mapping[str, str], namespace: Mapping[str, str], defaults: PolicyValues
) -> Resolved:
    """The effective policy of a Service (see the module docstring for the precedence)."""
    service_values, service_problems = _policy_values(service)
    namespace_values, namespace_problems = _policy_values(namespace)
    # Per key, the values that apply, most specific first.
    stacks: dict[str, list[tuple[Origin, Any]]] = {}
    layers: tuple[tuple[Origin, PolicyValues], ...] = (
        ("service", service_values),
        ("namespace", namespace_values),
        ("mesh", defaults),
    )
    for origin, values in layers:
        for key, value in values.items():
            stacks.setdefault(key, []).append((origin, value))
    pending: list[tuple[Origin, Problem]] = [
        *(("service", p) for p in service_problems + _other_problems(service)),
        *(("namespace", p) for p in namespace_problems + _other_problems(namespace)),
    ]

    def top() -> dict[str, Any]:
        return {key: stack[0][1] for key, stack in stacks.items() if stack}

    def level(key: str) -> Origin:
        stack = stacks.get(key)
        return stack[0][0] if stack else "built-in"

    while True:
        base, top_ = level("retry-backoff-base"), level("retry-backoff-max")
        culprit = "retry-backoff-base" if _rank(base) < _rank(top_) else "retry-backoff-max"
        found = backoff_problem(top(), culprit)
        if found is None:
            break
        key, problem = found
        origin, value = stacks[key].pop(0)  # fall back one level, for this key only
        full = PREFIX + key
        source = service if origin == "service" else namespace
        text = source.get(full, show_value(value))
        pending.append((origin, _problem(full, text, problem, text)))

    merged = top()
    policy = build_policy(merged)
    origins = origins_of({key: level(key) for key in merged})
    effective = effective_values(policy)
    origin_of = dict(origins)
    problems: list[Problem] = []
    for origin, bad in pending:
        setting = bad.key[len(PREFIX) :]
        used = effective.get(setting)
        problems.append(
            Problem(
                key=bad.key,
                value=bad.value,
                message=bad.message,
                level=origin,
                used=used,
                used_from=origin_of.get(setting) if used is not None else None,
            )
        )
    return Resolved(policy=policy, origins=origins, problems=tuple(problems))

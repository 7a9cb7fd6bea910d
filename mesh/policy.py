"""Policy: the settings a service's traffic obeys, their one validator, and how levels combine.

Every policy setting is one `Setting` in `SETTINGS`: its key (the Kubernetes annotation name
after `outrigger.dev/`, e.g. `retry-attempts`), its place under a mesh file's `policy:` (e.g.
`retries.attempts`), and the one function that checks a value. The mesh file (`mesh.model`) and
the annotations (`mesh.annotations`) both call that function, so a bad value gets the same
message wherever it was written::

    mesh.yaml: service "payments": policy.retries.attempts: must be a whole number >= 0, got "two"
    outrigger.dev/retry-attempts: must be a whole number >= 0, got "two"

A policy is assembled key by key from levels (`Origin`): the service's own setting, its
namespace's, the mesh file's `defaults:`, then the built-in default. `build_policy` turns the
merged values into a `Policy`; `effective_values` gives each key's effective value back in its
annotation spelling (for `/config_dump`, `outrigger status` and Events).

Rules that span two keys:

- Retries happen only when `retry-attempts` is set at some level; the other `retry-*` keys shape
  them. A retry budget exists when either budget key is set (the other takes Envoy's default).
- `retry-backoff-max` defaults to 10 x `retry-backoff-base` (Envoy), and must not be shorter
  than it. When two levels disagree (a service's base above its namespace's max), the key set at
  the more specific level is the one in conflict (`backoff_problem`).

Built-in defaults (Envoy's and Istio's, so an SRE's intuition carries over): no total timeout,
connect timeout 1s, no retries (when on: connect-failure, reset and 503, backoff 25ms base),
no retry budget (when on: 20 percent, 3 concurrent), non-idempotent requests not retried, no
per-endpoint breaker (when on: open 30s, at most 10 percent ejected), max_requests and
max_pending 1024, round_robin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, cast

LoadBalancer: TypeAlias = Literal["round_robin", "least_request", "random"]
Origin: TypeAlias = Literal["service", "namespace", "mesh", "built-in"]

LOAD_BALANCERS: Final[tuple[LoadBalancer, ...]] = ("round_robin", "least_request", "random")
ORIGINS: Final[tuple[Origin, ...]] = ("service", "namespace", "mesh", "built-in")
RETRY_CONDITIONS: Final[tuple[str, ...]] = (
    "connect-failure",
    "reset",
    "gateway-error",
    "5xx",
    "retriable-4xx",
    # gRPC statuses (HTTP/2 services): a trailers-only answer with one of them is retried
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)

_DURATION = re.compile(r"(?P<value>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h)")
_UNIT_SECONDS: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_FORM: Final = 'a duration like "250ms", "1.5s", "2s" or "1m"'
_RETRY_ITEM_FORM: Final = (
    f'one of {", ".join(RETRY_CONDITIONS)} or a 3-digit HTTP status code (e.g. "503")'
)


# -- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.025  # seconds
    max: float = 0.250


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: float = 20.0  # retries in flight as a share of requests in flight
    min_concurrency: int = 3  # retries always allowed in flight regardless of the percentage


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int  # retries after the first try
    retry_on: tuple[str, ...] = ("connect-failure", "reset")  # sorted members of RETRY_CONDITIONS
    status_codes: tuple[int, ...] = (503,)  # sorted
    per_try_timeout: float | None = None
    backoff: Backoff = field(default_factory=Backoff)
    budget: RetryBudget | None = None
    non_idempotent: bool = False


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    consecutive_failures: int | None = None  # None: no per-endpoint breaker (outlier detection)
    open_for: float = 30.0
    max_ejection_percent: int = 10
    max_requests: int = 1024
    max_pending: int = 1024


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float | None = None
    connect_timeout: float = 1.0
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    load_balancer: LoadBalancer = "round_robin"


# -- value checks: the one validator ---------------------------------------------------------

_MISSING: Final = object()


class FieldError(ValueError):
    """A value that is not of its setting's form. `problem` reads after the field's name
    ("must be a whole number >= 0"); `got` is the value as written; `index` the list item."""

    def __init__(self, problem: str, got: object = _MISSING, index: int | None = None) -> None:
        self.problem = problem
        self.got = got
        self.index = index
        super().__init__(problem)

    def message(self, show: Callable[[object], str]) -> str:
        return self.problem if self.got is _MISSING else f"{self.problem}, got {show(self.got)}"


def parse_duration(value: object) -> float | None:
    """Seconds for "250ms", "1.5s", "2s", "1m", "1h"; None when the text is not of that form."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    return float(match["value"]) * _UNIT_SECONDS[match["unit"]]


def format_duration(seconds: float) -> str:
    """The shortest spelling `parse_duration` reads back: 0.25 -> "250ms", 2.0 -> "2s"."""
    millis = round(seconds * 1000, 6)
    if millis >= 1000 and millis % 1000 == 0:
        return f"{int(millis // 1000)}s"
    if millis == int(millis):
        return f"{int(millis)}ms"
    return f"{seconds:g}s"


def check_duration(value: object) -> float:
    """A strictly positive duration in seconds, rounded to whole nanoseconds (xDS Durations)."""
    seconds = parse_duration(value)
    if seconds is None:
        raise FieldError(f"must be {DURATION_FORM}", value)
    if seconds <= 0:
        raise FieldError("must be a duration greater than zero", value)
    return round(seconds, 9)


def check_whole(value: object, minimum: int, maximum: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = cast(int, value) <= maximum
    if not ok:
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise FieldError(f"must be a whole number {bound}", value)
    return cast(int, value)


def check_number(value: object, low: float, high: float, form: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise FieldError(f"must be {form}", value)
    return float(value)


def check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise FieldError("must be true or false", value)
    return value


def check_choice(value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise FieldError(f"must be one of {', '.join(allowed)}", value)
    return value


RetryOn: TypeAlias = tuple[tuple[str, ...], tuple[int, ...]]  # (conditions, status codes), sorted


def check_retry_on(value: object) -> RetryOn:
    """A non-empty list of retry conditions and status codes ("503" or 503)."""
    if not isinstance(value, list) or not value:
        raise FieldError(
            f"must be a non-empty list of {', '.join(RETRY_CONDITIONS)} or 3-digit HTTP status "
            "codes",
            value,
        )
    conditions: set[str] = set()
    codes: set[int] = set()
    for i, item in enumerate(value):
        if isinstance(item, str) and item in RETRY_CONDITIONS:
            conditions.add(item)
        elif isinstance(item, str) and re.fullmatch(r"[1-5][0-9][0-9]", item):
            codes.add(int(item))
        elif isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            codes.add(item)
        else:
            raise FieldError(f"must be {_RETRY_ITEM_FORM}", item, index=i)
    return tuple(sorted(conditions)), tuple(sorted(codes))


# -- annotation text -> the value the checks take ---------------------------------------------


def _text_whole(text: str) -> object:
    return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else text


def _text_number(text: str) -> object:
    return float(text) if re.fullmatch(r"-?[0-9]{1,18}(\.[0-9]{1,18})?", text) else text


def _text_bool(text: str) -> object:
    return {"true": True, "false": False}.get(text, text)


def _text_list(text: str) -> object:
    return [item.strip() for item in text.split(",")] if text.strip() else []


def _text_same(text: str) -> object:
    return text


# -- the table ---------------------------------------------------------------------------------


def _show_duration(value: object) -> str:
    return format_duration(cast(float, value))


def _show_plain(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _show_retry_on(value: object) -> str:
    conditions, codes = cast(RetryOn, value)
    return ",".join([*conditions, *map(str, codes)])


@dataclass(frozen=True, slots=True)
class Setting:
    """One policy setting: where it is written, how it is checked, what it is by default."""

    key: str  # annotation name after "outrigger.dev/"
    path: tuple[str, ...]  # under a mesh file's `policy:` (or `defaults:`)
    check: Callable[[object], object]  # plain (YAML) value -> parsed value; raises FieldError
    from_text: Callable[[str], object]  # annotation text -> the plain value `check` takes
    show: Callable[[object], str]  # parsed value -> annotation spelling
    form: str  # the allowed form, for the README and `outrigger analyze`
    builtin: str  # the built-in default, as shown
    example: str  # an annotation value

    @property
    def mesh_path(self) -> str:
        return ".".join(self.path)


def _duration_setting(key: str, path: tuple[str, ...], builtin: str, example: str) -> Setting:
    return Setting(key, path, check_duration, _text_same, _show_duration, DURATION_FORM,
                   builtin, example)  # fmt: skip


def _whole_setting(
    key: str,
    path: tuple[str, ...],
    minimum: int,
    maximum: int | None,
    builtin: str,
    example: str,
) -> Setting:
    form = f"a whole number >= {minimum}" if maximum is None else (
        f"a whole number from {minimum} to {maximum}"
    )  # fmt: skip
    return Setting(key, path, lambda v: check_whole(v, minimum, maximum), _text_whole,
                   _show_plain, form, builtin, example)  # fmt: skip


SETTINGS: Final[tuple[Setting, ...]] = (
    _duration_setting("timeout", ("timeout",), "none", "2s"),
    _duration_setting("connect-timeout", ("connect_timeout",), "1s", "500ms"),
    _whole_setting("retry-attempts", ("retries", "attempts"), 0, None, "none (no retries)", "2"),
    _duration_setting("per-try-timeout", ("retries", "per_try_timeout"), "none", "500ms"),
    Setting(
        "retry-on",
        ("retries", "retry_on"),
        check_retry_on,
        _text_list,
        _show_retry_on,
        f"comma-separated {', '.join(RETRY_CONDITIONS)} or 3-digit status codes",
        "connect-failure,reset,503",
        "connect-failure,503",
    ),
    _duration_setting("retry-backoff-base", ("retries", "backoff", "base"), "25ms", "50ms"),
    _duration_setting(
        "retry-backoff-max", ("retries", "backoff", "max"), "10 x retry-backoff-base", "1s"
    ),
    Setting(
        "retry-budget-percent",
        ("retries", "budget", "percent"),
        lambda v: check_number(v, 0.0, 100.0, "a percentage from 0 to 100"),
        _text_number,
        _show_plain,
        "a percentage from 0 to 100",
        "none (20 when a budget is set)",
        "20",
    ),
    _whole_setting(
        "retry-budget-min-concurrency",
        ("retries", "budget", "min_concurrency"),
        0,
        None,
        "none (3 when a budget is set)",
        "3",
    ),
    Setting(
        "retry-non-idempotent",
        ("retries", "non_idempotent"),
        check_bool,
        _text_bool,
        _show_plain,
        "true or false",
        "false",
        "true",
    ),
    _whole_setting(
        "breaker-consecutive-failures",
        ("circuit_breaker", "consecutive_failures"),
        1,
        None,
        "none (no per-endpoint breaker)",
        "5",
    ),
    _duration_setting("breaker-open-for", ("circuit_breaker", "open_for"), "30s", "30s"),
    _whole_setting(
        "breaker-max-ejection-percent",
        ("circuit_breaker", "max_ejection_percent"),
        0,
        100,
        "10",
        "50",
    ),
    _whole_setting("max-requests", ("circuit_breaker", "max_requests"), 1, None, "1024", "100"),
    _whole_setting("max-pending", ("circuit_breaker", "max_pending"), 1, None, "1024", "100"),
    Setting(
        "load-balancer",
        ("load_balancer",),
        lambda v: check_choice(v, LOAD_BALANCERS),
        _text_same,
        _show_plain,
        " | ".join(LOAD_BALANCERS),
        "round_robin",
        "least_request",
    ),
)
BY_KEY: Final[dict[str, Setting]] = {s.key: s for s in SETTINGS}
BY_PATH: Final[dict[tuple[str, ...], Setting]] = {s.path: s for s in SETTINGS}
RETRY_KEYS: Final = frozenset(s.key for s in SETTINGS if s.path[0] == "retries")

PolicyValues: TypeAlias = Mapping[str, Any]  # setting key -> checked value
Origins: TypeAlias = tuple[
    tuple[str, Origin], ...
]  # (setting key, where it came from), SETTINGS order


# -- combining ---------------------------------------------------------------------------------


def backoff_bounds(values: PolicyValues) -> tuple[float, float]:
    """(base, max) of the backoff `values` give, with the built-in defaults filled in."""
    base = cast(float, values.get("retry-backoff-base", Backoff().base))
    top = cast(float, values.get("retry-backoff-max", round(10 * base, 9)))
    return base, top


def backoff_problem(values: PolicyValues, more_specific: str) -> tuple[str, str] | None:
    """(key, problem) when the backoff's max is shorter than its base; None when consistent.

    The key in conflict is the one set at the more specific level (`more_specific`, the key
    whose level outranks the other's; on a tie, the max): it is the one that falls back.
    """
    base, top = backoff_bounds(values)
    if top >= base:
        return None
    if more_specific == "retry-backoff-base":
        return more_specific, f"must not be longer than the backoff max ({format_duration(top)})"
    return (
        "retry-backoff-max",
        f"must not be shorter than the backoff base ({format_duration(base)})",
    )


def build_policy(values: PolicyValues) -> Policy:
    """The Policy for checked, merged values (each key at most once; backoff consistent)."""
    retries = None
    if "retry-attempts" in values:
        default = Retries(attempts=0)
        retry_on, codes = values.get("retry-on", (default.retry_on, default.status_codes))
        base, top = backoff_bounds(values)
        budget = None
        if "retry-budget-percent" in values or "retry-budget-min-concurrency" in values:
            budget = RetryBudget(
                percent=values.get("retry-budget-percent", RetryBudget().percent),
                min_concurrency=values.get(
                    "retry-budget-min-concurrency", RetryBudget().min_concurrency
                ),
            )
        retries = Retries(
            attempts=values["retry-attempts"],
            retry_on=retry_on,
            status_codes=codes,
            per_try_timeout=values.get("per-try-timeout"),
            backoff=Backoff(base=base, max=top),
            budget=budget,
            non_idempotent=values.get("retry-non-idempotent", False),
        )
    breaker = CircuitBreaker()
    return Policy(
        timeout=values.get("timeout"),
        connect_timeout=values.get("connect-timeout", Policy().connect_timeout),
        retries=retries,
        circuit_breaker=CircuitBreaker(
            consecutive_failures=values.get("breaker-consecutive-failures"),
            open_for=values.get("breaker-open-for", breaker.open_for),
            max_ejection_percent=values.get(
                "breaker-max-ejection-percent", breaker.max_ejection_percent
            ),
            max_requests=values.get("max-requests", breaker.max_requests),
            max_pending=values.get("max-pending", breaker.max_pending),
        ),
        load_balancer=values.get("load-balancer", Policy().load_balancer),
    )


def effective_values(policy: Policy) -> dict[str, str]:
    """Each setting's effective value in its annotation spelling ("none" where unset)."""
    retries = policy.retries
    breaker = policy.circuit_breaker
    none = "none"

    def duration(seconds: float | None) -> str:
        return none if seconds is None else format_duration(seconds)

    out = {
        "timeout": duration(policy.timeout),
        "connect-timeout": duration(policy.connect_timeout),
        "retry-attempts": none,
        "per-try-timeout": none,
        "retry-on": none,
        "retry-backoff-base": none,
        "retry-backoff-max": none,
        "retry-budget-percent": none,
        "retry-budget-min-concurrency": none,
        "retry-non-idempotent": "false",
        "breaker-consecutive-failures": _show_plain(breaker.consecutive_failures)
        if breaker.consecutive_failures is not None
        else none,
        "breaker-open-for": duration(breaker.open_for),
        "breaker-max-ejection-percent": _show_plain(breaker.max_ejection_percent),
        "max-requests": _show_plain(breaker.max_requests),
        "max-pending": _show_plain(breaker.max_pending),
        "load-balancer": policy.load_balancer,
    }
    if retries is not None:
        out.update(
            {
                "retry-attempts": _show_plain(retries.attempts),
                "per-try-timeout": duration(retries.per_try_timeout),
                "retry-on": _show_retry_on((retries.retry_on, retries.status_codes)),
                "retry-backoff-base": duration(retries.backoff.base),
                "retry-backoff-max": duration(retries.backoff.max),
                "retry-non-idempotent": _show_plain(retries.non_idempotent),
            }
        )
        if retries.budget is not None:
            out["retry-budget-percent"] = _show_plain(retries.budget.percent)
            out["retry-budget-min-concurrency"] = _show_plain(retries.budget.min_concurrency)
    return {s.key: out[s.key] for s in SETTINGS}


def origins_of(levels: Mapping[str, Origin]) -> Origins:
    """Origins in SETTINGS order; a key no level set is built-in."""
    return tuple((s.key, levels.get(s.key, "built-in")) for s in SETTINGS)

import pytest

from sidecar.exchange import Response
from sidecar.flags import Flag, ProxyError
from sidecar.policy.classifier import FAILURE_FROM, SUCCESS_BELOW, TIMEOUT, Kind, classify
from tests.sidecar.policy.fakes import MemoryResponseBody


def response(status: int) -> Response:
    return Response(status, b"", [], MemoryResponseBody())


@pytest.mark.parametrize(
    ("status", "kind", "failure"),
    [
        (200, Kind.SUCCESS, False),
        (304, Kind.SUCCESS, False),
        (404, Kind.CLIENT_ERROR, False),
        (429, Kind.CLIENT_ERROR, False),
        (409, Kind.RETRIABLE_4XX, False),
        (500, Kind.SERVER_ERROR, True),
        (502, Kind.GATEWAY_ERROR, True),
        (503, Kind.GATEWAY_ERROR, True),
        (504, Kind.GATEWAY_ERROR, True),
        (599, Kind.SERVER_ERROR, True),
    ],
)
def test_upstream_status_is_classified_by_kind_and_breaker_failure(
    status: int, kind: Kind, failure: bool
) -> None:
    outcome = classify(response(status))
    assert (outcome.kind, outcome.status, outcome.breaker_failure) == (kind, status, failure)
    assert outcome.flag is None


@pytest.mark.parametrize(
    ("flag", "kind", "failure"),
    [
        (Flag.UPSTREAM_CONNECT_FAILURE, Kind.CONNECT_FAILURE, True),
        (Flag.UPSTREAM_RESET, Kind.RESET, True),
        (Flag.UPSTREAM_TIMEOUT, Kind.TIMEOUT, True),
        (Flag.UPSTREAM_PROTOCOL_ERROR, Kind.PROTOCOL_ERROR, True),
        (Flag.UPSTREAM_OVERFLOW, Kind.LOCAL, False),
        (Flag.NO_HEALTHY_UPSTREAM, Kind.LOCAL, False),
        (Flag.RETRIES_EXHAUSTED, Kind.LOCAL, False),
    ],
)
def test_errors_are_classified_by_flag(flag: Flag, kind: Kind, failure: bool) -> None:
    outcome = classify(ProxyError(flag, "x"))
    assert (outcome.kind, outcome.breaker_failure, outcome.flag) == (kind, failure, flag)


def test_local_503_is_not_an_upstream_503() -> None:
    overflow = classify(ProxyError(Flag.UPSTREAM_OVERFLOW, "full"))
    assert overflow.status == 503
    assert overflow.kind is not classify(response(503)).kind


def test_classifying_twice_returns_the_same_interned_outcome() -> None:
    assert classify(response(503)) is classify(response(503))
    err = ProxyError(Flag.UPSTREAM_RESET, "x")
    assert classify(err) is classify(ProxyError(Flag.UPSTREAM_RESET, "y"))


def test_cancelled_attempt_outcome_is_a_timeout_failure() -> None:
    assert TIMEOUT.kind is Kind.TIMEOUT and TIMEOUT.breaker_failure and TIMEOUT.status == 504


def test_the_status_rules_the_layers_read_without_classifying_are_classifys_own() -> None:
    # Retry passes a first answer below SUCCESS_BELOW on, and the breaker records nothing for
    # one below FAILURE_FROM, without calling classify: both must say what classify says.
    for status in range(100, 600):
        outcome = classify(response(status))
        assert outcome.success == (status < SUCCESS_BELOW), status
        assert outcome.breaker_failure == (status >= FAILURE_FROM), status

"""Which codec runs: the compiled one when it is built, the pure-Python reference on request."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from typing import Any

import pytest

from sidecar.protocol import implementation, request, response, serialize
from tests.sidecar.protocol.implementations import PYTHON, native

_METHODS = {
    "RequestParser": ["feed", "feed_eof", "take_upgrade_rest"],
    "ResponseParser": ["feed", "feed_eof", "take_upgrade_rest", "reset"],
}


def _parameters(function: Any) -> list[tuple[str, object]]:
    """Names and kinds (positional, keyword-only, ...): what a caller relies on."""
    signature = inspect.signature(function)
    return [(p.name, p.kind) for p in signature.parameters.values()]


def _choose(value: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with OUTRIGGER_CODEC=value: which parser does the transport get?"""
    code = (
        "from sidecar.protocol import implementation, request, response, serialize\n"
        "print(implementation.NAME, request.RequestParser.__module__,"
        " response.ResponseParser.__module__, serialize.request_head.__module__)\n"
    )
    env = {**os.environ, implementation.VARIABLE: value}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.skipif(
    os.environ.get(implementation.VARIABLE, "") == "python",
    reason="OUTRIGGER_CODEC=python chose the reference for this run",
)
def test_the_compiled_codec_is_built_and_what_the_transport_gets() -> None:
    compiled = native()
    assert implementation.NAME == "native"
    assert request.RequestParser is compiled.RequestParser
    assert response.ResponseParser is compiled.ResponseParser
    assert serialize.request_head is compiled.request_head
    assert serialize.response_head is compiled.response_head
    assert serialize.chunk is compiled.chunk


def test_outrigger_codec_chooses_the_implementation() -> None:
    python = _choose("python")
    assert python.stdout.split() == [
        "python",
        "sidecar.protocol.request",
        "sidecar.protocol.response",
        "sidecar.protocol.serialize",
    ], python.stderr
    compiled = _choose("native")
    assert compiled.stdout.split() == ["native", *["sidecar.protocol.native"] * 3], compiled.stderr


def test_an_unknown_outrigger_codec_names_the_variable_and_its_values() -> None:
    result = _choose("fast")
    assert result.returncode != 0
    assert "OUTRIGGER_CODEC must be 'native' or 'python' (or unset), got 'fast'" in result.stderr


def test_the_compiled_codec_takes_the_same_arguments_as_the_reference() -> None:
    compiled = native()
    for name, methods in _METHODS.items():
        for method in methods:
            expected = _parameters(getattr(getattr(PYTHON, name), method))
            assert _parameters(getattr(getattr(compiled, name), method)) == expected, method
    assert hasattr(compiled.ResponseParser, "reusable")  # a property on both
    for function in ("request_head", "response_head", "chunk"):
        expected = _parameters(getattr(PYTHON, function))
        assert _parameters(getattr(compiled, function)) == expected, function

"""The codec's two implementations: the compiled one (sidecar/protocol/native.pyx) and the
pure-Python reference, for tests that run on both or compare them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from sidecar.protocol import request, response, serialize


@dataclass(frozen=True)
class Codec:
    name: str
    RequestParser: Callable[..., Any]
    ResponseParser: Callable[..., Any]
    request_head: Callable[..., bytes]
    response_head: Callable[..., bytes]
    chunk: Callable[[bytes], bytes]


# The names a test module may import from sidecar.protocol that differ between the two.
NAMES = ("RequestParser", "ResponseParser", "request_head", "response_head", "chunk")

PYTHON = Codec(
    "python",
    request.PyRequestParser,
    response.PyResponseParser,
    serialize.py_request_head,
    serialize.py_response_head,
    serialize.py_chunk,
)


def native() -> Codec:
    """The compiled codec; a test that needs it fails (never skips) when it is not built."""
    try:
        module = importlib.import_module("sidecar.protocol.native")
    except ModuleNotFoundError:
        pytest.fail(
            "sidecar/protocol/native.pyx is not built: run `make install` "
            "(it needs build-essential and python3-dev)"
        )
    return Codec(
        "native",
        module.RequestParser,
        module.ResponseParser,
        module.request_head,
        module.response_head,
        module.chunk,
    )


def codec(name: str) -> Codec:
    return PYTHON if name == "python" else native()

"""Per-call cost of the HTTP/1.1 codec (not collected by pytest: the name lacks `test_`).

    .venv/bin/python tests/bench/codec.py [--repeat 15] [--number 5000]

Times each case on both implementations, the pure-Python reference and the compiled codec
(sidecar/protocol/native.pyx), and prints the best of `--repeat` timeit runs in microseconds per
call with their ratio. Best-of rather than mean, and process CPU time rather than wall time
(`--wall` to change): the question is what the code costs, not how busy the machine is.
`--package` times another copy of the codec (for example the previous version, put on
PYTHONPATH) with the same inputs; a copy without a compiled module gets the python column only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
import timeit
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

GET = b"GET /x?y=1 HTTP/1.1\r\nHost: payments:8080\r\nAccept: */*\r\nX-Trace: t1\r\n\r\n"
POST = (
    b"POST /orders HTTP/1.1\r\n"
    b"Host: orders:8080\r\n"
    b"Content-Type: application/json\r\n"
    b"Accept: application/json\r\n"
    b"User-Agent: client/1.0\r\n"
    b"Content-Length: 256\r\n"
    b"\r\n" + b"x" * 256
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: upstream\r\n"
    b"X-Request-Id: 0123456789abcdef\r\n"
    b"Content-Length: 1024\r\n"
    b"\r\n" + b"x" * 1024
)
CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n" + (b"100\r\n" + b"x" * 256 + b"\r\n") * 4 + b"0\r\n\r\n"
)
# What the transport writes: the headers of a parsed message plus the sidecar's own.
UPSTREAM_HEADERS = [
    (b"accept", b"*/*"),
    (b"x-trace", b"t1"),
    (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
    (b"x-forwarded-for", b"127.0.0.1"),
]
CLIENT_HEADERS = [
    (b"content-type", b"application/json"),
    (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"server", b"upstream"),
    (b"x-request-id", b"0123456789abcdef"),
]


def implementations(package: str) -> dict[str, Any]:
    """The reference and, when built, the compiled codec of `package`."""
    codec: Any = importlib.import_module(package)
    request = importlib.import_module(f"{package}.request")
    response = importlib.import_module(f"{package}.response")
    serialize = importlib.import_module(f"{package}.serialize")
    out: dict[str, Any] = {
        "python": SimpleNamespace(
            RequestParser=getattr(request, "PyRequestParser", codec.RequestParser),
            ResponseParser=getattr(response, "PyResponseParser", codec.ResponseParser),
            request_head=getattr(serialize, "py_request_head", serialize.request_head),
            response_head=getattr(serialize, "py_response_head", serialize.response_head),
            chunk=getattr(serialize, "py_chunk", serialize.chunk),
        )
    }
    with contextlib.suppress(ModuleNotFoundError):
        out["native"] = importlib.import_module(f"{package}.native")
    return out


def cases(codec: Any) -> dict[str, Callable[[], object]]:
    RequestParser = codec.RequestParser
    ResponseParser = codec.ResponseParser
    keep = RequestParser()  # one parser per connection, many keep-alive requests
    reused = ResponseParser(b"GET")
    reused.feed(RESPONSE)
    request_head = codec.request_head
    response_head = codec.response_head
    chunk = codec.chunk
    body = b"x" * 1024

    def request_feed() -> object:
        return keep.feed(GET)

    def request_post_feed() -> object:
        return keep.feed(POST)

    def request_construct_feed() -> object:
        return RequestParser().feed(GET)

    def response_construct() -> object:
        return ResponseParser(b"GET")

    def response_reset_feed() -> object:
        reused.reset(b"GET")
        return reused.feed(RESPONSE)

    def response_reset_feed_chunked() -> object:
        reused.reset(b"GET")
        return reused.feed(CHUNKED)

    def write_request_head() -> object:
        return request_head(
            b"GET",
            b"/x?y=1",
            b"payments:8080",
            UPSTREAM_HEADERS,
            content_length=None,
            chunked=False,
            parsed=True,
        )

    def write_request_head_checked() -> object:
        return request_head(
            b"GET",
            b"/x?y=1",
            b"payments:8080",
            UPSTREAM_HEADERS,
            content_length=None,
            chunked=False,
        )

    def write_response_head() -> object:
        return response_head(
            200,
            b"OK",
            CLIENT_HEADERS,
            content_length=1024,
            chunked=False,
            close=False,
            parsed=True,
        )

    def write_response_head_checked() -> object:
        return response_head(
            200, b"OK", CLIENT_HEADERS, content_length=1024, chunked=False, close=False
        )

    def write_chunk() -> object:
        return chunk(body)

    return {
        "RequestParser.feed (GET, 3 headers, same parser)": request_feed,
        "RequestParser.feed (POST, 5 headers, 256 B body, same parser)": request_post_feed,
        "RequestParser() + feed (GET, 3 headers)": request_construct_feed,
        "ResponseParser(b'GET')": response_construct,
        "ResponseParser.reset + feed (200, 5 headers, 1 KiB CL body)": response_reset_feed,
        "ResponseParser.reset + feed (200, 3 headers, 4 chunks of 256 B)": (
            response_reset_feed_chunked
        ),
        "request_head (4 headers, parsed=True as the transport writes it)": write_request_head,
        "request_head (4 headers, checked)": write_request_head_checked,
        "response_head (4 headers, parsed=True as the transport writes it)": write_response_head,
        "response_head (4 headers, checked)": write_response_head_checked,
        "chunk (1 KiB)": write_chunk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--number", type=int, default=5000)
    ap.add_argument("--wall", action="store_true", help="time wall clock, not process CPU")
    ap.add_argument("--package", default="sidecar.protocol")
    args = ap.parse_args()
    timer = time.perf_counter if args.wall else time.process_time
    codecs = implementations(args.package)
    columns = {name: cases(codec) for name, codec in codecs.items()}
    print("".join(f"{name:>9}" for name in columns) + "   ratio  case (us per call)")
    for case in columns["python"]:
        costs = []
        for per_case in columns.values():
            fn = per_case[case]
            fn()  # warm up, and fail loudly if the case is broken
            best = min(timeit.repeat(fn, timer=timer, repeat=args.repeat, number=args.number))
            costs.append(best / args.number * 1e6)
        ratio = f"{costs[0] / costs[-1]:6.1f}x" if len(costs) > 1 else ""
        print("".join(f"{cost:9.2f}" for cost in costs) + f" {ratio:>7}  {case}")


if __name__ == "__main__":
    main()

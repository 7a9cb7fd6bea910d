"""Per-call cost of the HTTP/1.1 parsers (not collected by pytest: the name lacks `test_`).

    .venv/bin/python tests/bench/codec.py [--repeat 15] [--number 5000]

Prints the best of `--repeat` timeit runs, in microseconds per call. Best-of rather than mean,
and process CPU time rather than wall time (`--wall` to change): the question is what the code
costs, not how busy the machine is. `--package` times another copy of the codec (for example the
previous version, put on PYTHONPATH) with the same inputs.
"""

from __future__ import annotations

import argparse
import importlib
import time
import timeit
from collections.abc import Callable
from typing import Any

GET = b"GET /x?y=1 HTTP/1.1\r\nHost: payments:8080\r\nAccept: */*\r\nX-Trace: t1\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: upstream\r\n"
    b"X-Request-Id: 0123456789abcdef\r\n"
    b"Content-Length: 1024\r\n"
    b"\r\n" + b"x" * 1024
)


def cases(package: str) -> dict[str, Callable[[], object]]:
    codec: Any = importlib.import_module(package)
    RequestParser = codec.RequestParser
    ResponseParser = codec.ResponseParser
    keep = RequestParser()  # one parser per connection, many keep-alive requests
    reused = ResponseParser(b"GET")

    def request_feed() -> object:
        return keep.feed(GET)

    def request_construct_feed() -> object:
        return RequestParser().feed(GET)

    def response_construct() -> object:
        return ResponseParser(b"GET")

    def response_construct_feed() -> object:
        return ResponseParser(b"GET").feed(RESPONSE)

    def response_reset_feed() -> object:
        reused.reset(b"GET")
        return reused.feed(RESPONSE)

    out: dict[str, Callable[[], object]] = {
        "RequestParser.feed (GET, 3 headers, same parser)": request_feed,
        "RequestParser() + feed (GET, 3 headers)": request_construct_feed,
        "ResponseParser(b'GET')": response_construct,
        "ResponseParser(b'GET') + feed (200, 5 headers, 1 KiB CL body)": response_construct_feed,
    }
    if hasattr(ResponseParser, "reset"):
        reused.feed(RESPONSE)
        out["ResponseParser.reset + feed (same response)"] = response_reset_feed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--number", type=int, default=5000)
    ap.add_argument("--wall", action="store_true", help="time wall clock, not process CPU")
    ap.add_argument("--package", default="sidecar.protocol")
    args = ap.parse_args()
    timer = time.perf_counter if args.wall else time.process_time
    for name, fn in cases(args.package).items():
        fn()  # warm up, and fail loudly if the case is broken
        best = min(timeit.repeat(fn, timer=timer, repeat=args.repeat, number=args.number))
        print(f"{best / args.number * 1e6:7.2f} us  {name}")


if __name__ == "__main__":
    main()

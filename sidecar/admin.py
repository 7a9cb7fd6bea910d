"""The admin listener (127.0.0.1:15000 by default), served by the same hardened HTTP server.

`/ready`, `/live`, `/stats/prometheus`, `/config_dump`, `/clusters`, `POST /drain`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from sidecar.exchange import Request, Response
from sidecar.protocol.events import RequestHead
from sidecar.transport.body import BytesBody
from sidecar.transport.server import REASONS, Decision

Page = Callable[[], Awaitable[tuple[int, bytes, bytes]]]


def _text(status: int, text: str) -> tuple[int, bytes, bytes]:
    return status, b"text/plain; charset=utf-8", text.encode()


def _json(doc: Any) -> tuple[int, bytes, bytes]:
    return 200, b"application/json", json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


class AdminSource(Protocol):
    """What the admin pages read from the sidecar, and the one thing they ask of it."""

    def not_ready_reason(self) -> str: ...

    def config_dump(self) -> dict[str, Any]: ...

    def clusters(self) -> dict[str, Any]: ...

    def request_drain(self, reason: str) -> None: ...


class Admin:
    def __init__(self, sidecar: AdminSource, registry: CollectorRegistry) -> None:
        self.sidecar = sidecar
        self.registry = registry

    def dispatch(self, head: RequestHead) -> Decision:
        return Decision(self.handle, None, "admin")

    async def handle(self, req: Request) -> Response:
        path = req.path.split(b"?", 1)[0]
        pages: dict[bytes, tuple[bytes, Page]] = {
            b"/ready": (b"GET", self._ready),
            b"/live": (b"GET", self._live),
            b"/stats/prometheus": (b"GET", self._prometheus),
            b"/config_dump": (b"GET", self._config_dump),
            b"/clusters": (b"GET", self._clusters),
            b"/drain": (b"POST", self._drain),
        }
        entry = pages.get(path)
        if entry is None:
            status, ctype, body = _text(
                404, "not found; try " + ", ".join(p.decode() for p in pages) + "\n"
            )
        elif req.method != entry[0] and not (entry[0] == b"GET" and req.method == b"HEAD"):
            status, ctype, body = _text(405, f"{path.decode()} takes {entry[0].decode()}\n")
        else:
            status, ctype, body = await entry[1]()
        return Response(
            status,
            REASONS.get(status, b""),
            [(b"content-type", ctype)],
            BytesBody(body),
            content_length=len(body),
        )

    async def _ready(self) -> tuple[int, bytes, bytes]:
        problem = self.sidecar.not_ready_reason()
        if problem:
            return _text(503, f"not ready: {problem}\n")
        return _text(200, "ready\n")

    async def _live(self) -> tuple[int, bytes, bytes]:
        return _text(200, "live\n")

    async def _prometheus(self) -> tuple[int, bytes, bytes]:
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)

    async def _config_dump(self) -> tuple[int, bytes, bytes]:
        return _json(self.sidecar.config_dump())

    async def _clusters(self) -> tuple[int, bytes, bytes]:
        return _json(self.sidecar.clusters())

    async def _drain(self) -> tuple[int, bytes, bytes]:
        self.sidecar.request_drain("POST /drain")
        return _text(200, "draining\n")

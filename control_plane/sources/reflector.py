"""List-then-watch of one Kubernetes collection (client-go's reflector), over the API client.

The protocol (Kubernetes API concepts, "Efficient detection of changes"):

1. List the collection in pages (`limit`, `continue`); the list's `metadata.resourceVersion` is
   the point in history the whole list shows. The store is replaced by exactly what was listed,
   so an object deleted while we were not watching is gone too.
2. Watch from that resourceVersion with `allowWatchBookmarks=true` and a server-side
   `timeoutSeconds` (jittered, as client-go does, so replicas do not reconnect in step). Each
   event line is ADDED, MODIFIED, DELETED (the store follows), BOOKMARK (only the
   resourceVersion moves on) or ERROR (a Status).
3. A watch that ends (the server's timeout, a broken connection, the API server restarted) is
   resumed from the last resourceVersion seen, so nothing is replayed and nothing is missed.
4. 410 Gone (as an HTTP status or an ERROR event: the resourceVersion is older than the server
   keeps) means history is lost: back to step 1.

Failures (connection refused, 5xx, 429, an RBAC refusal, a malformed line) are logged and
retried after a capped, jittered exponential backoff (`Backoff`), reset once a stream works
again; a watch that ends at once without an event also waits, so a misbehaving server never
makes a busy loop. A watch line longer than `MAX_LINE` is refused (objects are at most ~1.5 MiB
in etcd). Requests go through the API client's generated methods (`_preload_content=False`), so
paths, authentication and TLS are the client's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

log = logging.getLogger("outrigger.control_plane.kubernetes")

PAGE_SIZE: Final = 500
MAX_LINE: Final = 8 * 1024 * 1024
CONNECT_TIMEOUT: Final = 10.0
LIST_TIMEOUT: Final = 60.0
MIN_WATCH: Final = 1.0  # a watch that ends sooner without an event counts as a failure


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is too old; relist."""


class ApiFailure(Exception):
    """A request or stream that failed; the message says what the API answered."""


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter: min(cap, base * 2**n) * uniform(0.5, 1)."""

    base: float = 0.25
    cap: float = 30.0
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2.0**self.failures) * random.uniform(0.5, 1.0)
        self.failures = min(self.failures + 1, 30)
        return float(delay)

    def reset(self) -> None:
        self.failures = 0


Call = Callable[..., Awaitable[Any]]  # a generated list method, e.g. CoreV1Api.list_namespace
OnList = Callable[[list[Mapping[str, Any]]], None]
OnEvent = Callable[[str, Mapping[str, Any]], None]


@dataclass(slots=True)
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    expired: int = 0
    failures: int = 0
    last_error: str = ""


class Reflector:
    """Keeps a store in step with one collection: `on_list` for every (re)list, `on_event`
    for every ADDED/MODIFIED/DELETED; `synced` is set after the first list."""

    def __init__(
        self,
        name: str,
        call: Call,
        on_list: OnList,
        on_event: OnEvent,
        *,
        params: Mapping[str, Any] | None = None,
        backoff: Backoff | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name  # e.g. "services (all namespaces)"
        self.call = call
        self.on_list = on_list
        self.on_event = on_event
        self.params = dict(params or {})
        self.backoff = backoff if backoff is not None else Backoff()
        self.watch_timeout = watch_timeout
        self.on_restart = on_restart
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.stats = ReflectorStats()

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            try:
                if not self.resource_version:
                    await self._list()
                await self._watch()
            except WatchExpired:
                self.stats.expired += 1
                log.info("%s: resourceVersion %s expired (410 Gone): listing again",
                         self.name, self.resource_version)  # fmt: skip
                self.resource_version = ""
                self._restarted("expired")
            except (ApiFailure, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc) or type(exc).__name__
                delay = self.backoff.next_delay()
                log.warning("%s: %s; retrying in %.2fs", self.name, self.stats.last_error, delay)
                self._restarted("failure")
                await asyncio.sleep(delay)

    def _restarted(self, reason: str) -> None:
        if self.on_restart is not None:
            self.on_restart(reason)

    async def _list(self) -> None:
        items: list[Mapping[str, Any]] = []
        token = ""
        version = ""
        while True:
            params = dict(self.params, limit=PAGE_SIZE)
            if token:
                params["_continue"] = token
            body = await self._get(params, (CONNECT_TIMEOUT, LIST_TIMEOUT))
            page = json.loads(body)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            version = str(meta.get("resourceVersion") or "")
            token = str(meta.get("continue") or "")
            if not token:
                break
        if not version:
            raise ApiFailure("the list carried no metadata.resourceVersion")
        self.on_list(items)
        self.resource_version = version
        self.stats.lists += 1
        self.backoff.reset()
        self.synced.set()
        log.debug("%s: listed %d at resourceVersion %s", self.name, len(items), version)

    async def _get(self, params: Mapping[str, Any], timeout: tuple[float, float]) -> bytes:
        status, body = await api_call(self.call, timeout=timeout, **params)
        if status == 410:
            raise WatchExpired()
        if status != 200:
            raise ApiFailure(_api_error(status, body))
        return body

    async def _watch(self) -> None:
        low, high = self.watch_timeout
        server_timeout = random.randint(low, high)
        response = await self.call(
            **self.params,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=server_timeout,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, server_timeout + 30),
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = 0
        try:
            if response.status == 410:
                raise WatchExpired()
            if response.status != 200:
                raise ApiFailure(_api_error(response.status, await response.read()))
            self.stats.watches += 1
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                if b"\n" not in buffer:
                    if len(buffer) > MAX_LINE:
                        raise ApiFailure(f"a watch event longer than {MAX_LINE} bytes")
                    continue
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(line)
                        events += 1
                        if events == 1:
                            self.backoff.reset()
        finally:
            response.release()
        if events == 0 and loop.time() - started < MIN_WATCH:
            raise ApiFailure("the watch ended at once without an event")

    def _event(self, line: bytes) -> None:
        event = json.loads(line)
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            raise ApiFailure(f"a watch event without an object: {line[:200]!r}")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise WatchExpired()
            raise ApiFailure(f"watch ERROR {code} {obj.get('reason')}: {obj.get('message')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            self.stats.bookmarks += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.stats.events += 1
            self.on_event(kind, obj)
        else:
            raise ApiFailure(f"unknown watch event type {kind!r}")
        if version:
            self.resource_version = version


async def api_call(
    method: Call, *args: Any, timeout: tuple[float, float], **params: Any
) -> tuple[int, bytes]:
    """(status, body) of one request by a generated API method, whatever the status (the
    caller judges it). Raises aiohttp.ClientError, TimeoutError or OSError when no answer."""
    response = await method(*args, **params, _preload_content=False, _request_timeout=timeout)
    try:
        body: bytes = await response.read()
        return int(response.status), body
    finally:
        response.release()


def _api_error(status: int, body: bytes) -> str:
    """The API's Status message, with a hint for the refusals an operator must fix."""
    try:
        message = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    hint = {
        401: " (the credentials were refused: check the kubeconfig or service account token)",
        403: " (RBAC: the control plane's service account needs list and watch on services, "
        "endpointslices.discovery.k8s.io and namespaces)",
        404: " (this API is not served: Kubernetes 1.21 or newer is needed for "
        "discovery.k8s.io/v1 EndpointSlices)",
    }.get(status, "")
    return f"HTTP {status}: {message}{hint}"

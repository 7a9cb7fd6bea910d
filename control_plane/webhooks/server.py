"""The admission webhooks' HTTPS server (port 15017): AdmissionReview v1 by POST, a handler a path.

HTTP/1.1 is framed by h11 (sans-IO, maintained, already installed with httpx): keep-alive, chunked
bodies and malformed requests are its business, not hand-written parsing. TLS is the standard
library's, started on each accepted connection with the certificate current at that moment.
The API server keeps connections open and sends one review at a time on each.

A handler is a function from an `AdmissionRequest` to an `AdmissionResponse`; `add(path, handler)`
registers one (`/inject` now, `/validate` later). Answers:

- 200 and an AdmissionReview for every review with a readable uid; a malformed request inside it
  is not allowed, with code 400 and the reason;
- 400 (text): the body is not an AdmissionReview v1 or the HTTP is malformed; 404 no handler
  for the path; 405 not POST; 413 body over MAX_BODY; 415 not application/json;
- 500 (text): the handler raised (logged with its traceback): the API server then applies the
  webhook's failurePolicy, the cluster's choice.

Limits: MAX_BODY (4 MiB: the API server stores objects up to 1.5 MiB, and a review carries the
object and, on UPDATE, the old one), request head 16 KiB, TLS handshake within
HANDSHAKE_TIMEOUT, a whole request within REQUEST_TIMEOUT of its head, IDLE_TIMEOUT between
requests, MAX_CONNECTIONS at once. After an error answer the connection closes; a body
answered before it was read (413) is first read and dropped for up to LINGER_TIMEOUT, so the
client gets the answer rather than a reset.

Certificates: the certificate and key files are checked when a connection is accepted (one
stat each) and reloaded when either changed, so a rotated Secret takes effect without a
restart. A pair that does not load (a half-written rotation) is logged once and counted, and
the last good pair keeps serving. Or, with no files (`webhook.certificates: self`), the control
plane hands the pair over (`use_certificate`) whenever it makes or reads a new one; until the
first, connections are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h11
from prometheus_client import CollectorRegistry, Counter, Histogram

from control_plane.webhooks.review import (
    AdmissionRequest,
    AdmissionResponse,
    ReviewError,
    read_review,
    render_review,
)

log = logging.getLogger("outrigger.control_plane.webhooks")

Handler = Callable[[AdmissionRequest], AdmissionResponse]

MAX_BODY = 4 * 1024 * 1024
MAX_HEAD = 16 * 1024
HANDSHAKE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0  # the API server's default webhook timeout
# Longer than the 90 s a Go client (the API server) keeps an idle connection: the client closes
# first, so it never sends a review on a connection the server is closing.
IDLE_TIMEOUT = 120.0
MAX_CONNECTIONS = 256
READ_SIZE = 64 * 1024
LINGER_TIMEOUT = 2.0
LINGER_BYTES = 2 * MAX_BODY


class WebhookError(Exception):
    """The webhook server cannot start (certificate files, address)."""


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reviews = Counter(
            "outrigger_webhook_reviews",
            "Admission requests answered, by path and result "
            "(patched, allowed, denied, invalid, error)",
            ["path", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "outrigger_webhook_review_seconds",
            "Time from a review's last byte to its answer, by path",
            ["path"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.certificate_reloads = Counter(
            "outrigger_webhook_certificate_reloads",
            "Certificate or key file changes seen, by result "
            "(loaded; failed: the last good pair stays)",
            ["result"],
            registry=registry,
        )


Signature = tuple[tuple[int, int, int], tuple[int, int, int]] | None


class Certificates:
    """The serving certificate and key, reloaded when their files change."""

    def __init__(self, cert: Path, key: Path, metrics: WebhookMetrics) -> None:
        self.cert, self.key, self._metrics = cert, key, metrics
        self._signature = self._stat()
        try:
            self._context = self._load()
        except (OSError, ssl.SSLError) as exc:
            message = f"cannot load --webhook-cert {cert} / --webhook-key {key}: {exc}"
            raise WebhookError(message) from None

    def _stat(self) -> Signature:
        try:
            one, two = self.cert.stat(), self.key.stat()
        except OSError:
            return None
        return (one.st_ino, one.st_mtime_ns, one.st_size), (
            two.st_ino,
            two.st_mtime_ns,
            two.st_size,
        )

    def _load(self) -> ssl.SSLContext:
        return _server_context(self.cert, self.key)

    def context(self) -> ssl.SSLContext:
        """The current pair's context, after reloading it if the files changed."""
        signature = self._stat()
        if signature != self._signature:
            self._signature = signature  # a failed pair is retried only once it changes again
            try:
                self._context = self._load()
            except (OSError, ssl.SSLError) as exc:
                self._metrics.certificate_reloads.labels("failed").inc()
                log.error(
                    "webhook certificate %s / key %s changed but do not load (%s); "
                    "still serving the previous pair",
                    self.cert,
                    self.key,
                    exc,
                )
            else:
                self._metrics.certificate_reloads.labels("loaded").inc()
                log.info("webhook certificate %s reloaded", self.cert)
        return self._context


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert, key)
    return context


class HeldCertificate:
    """A pair handed over in memory. The ssl module loads chains from files only, so the pair
    is written to a private temporary directory, loaded, and removed at once."""

    def __init__(self, cert: bytes, key: bytes) -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="outrigger-webhook-") as tmp:
                cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
                cert_path.write_bytes(cert)
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(key)
                self._context = _server_context(cert_path, key_path)
        except (OSError, ssl.SSLError) as exc:
            raise WebhookError(
                f"the webhook certificate handed over does not load: {exc}"
            ) from None

    def context(self) -> ssl.SSLContext:
        return self._context


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    content_type: str
    body: bytes
    result: str  # the metrics label
    close: bool = False


def _text(status: int, message: str, result: str = "invalid") -> _Answer:
    return _Answer(status, "text/plain; charset=utf-8", message.encode() + b"\n", result, True)


def _result(response: AdmissionResponse) -> str:
    if not response.allowed:
        return "denied"
    return "patched" if response.patch else "allowed"


class WebhookServer:
    def __init__(
        self,
        cert: Path | None = None,
        key: Path | None = None,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Serve `cert` and `key` (files, reloaded when they change), or, without them, the
        pairs handed over with `use_certificate`."""
        self.metrics = WebhookMetrics(registry if registry is not None else CollectorRegistry())
        self.certificates: Certificates | HeldCertificate | None = None
        if cert is not None and key is not None:
            self.certificates = Certificates(cert, key, self.metrics)
        self.handlers: dict[str, Handler] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    def add(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    def use_certificate(self, cert: bytes, key: bytes) -> None:
        """Serve this PEM pair to new connections from now on. WebhookError (and counted) when
        it does not load; the pair served so far stays."""
        try:
            self.certificates = HeldCertificate(cert, key)
        except WebhookError:
            self.metrics.certificate_reloads.labels("failed").inc()
            raise
        self.metrics.certificate_reloads.labels("loaded").inc()

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._connection, host, port)
        except OSError as exc:
            raise WebhookError(f"cannot bind the webhook address {host}:{port}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    # -- one connection ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        if self.certificates is None:  # certificates=self, before the first pair
            writer.transport.abort()
            return
        self._connections.add(writer)
        try:
            await writer.start_tls(
                self.certificates.context(), ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            await self._serve(conn, reader, writer)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("webhook connection ended: %r", exc)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _serve(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests until the peer closes, an error answer, or a timeout."""
        while True:
            try:
                exchange = await self._exchange(conn, reader)
            except h11.RemoteProtocolError as exc:
                if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return
                exchange = "-", _text(exc.error_status_hint, f"malformed HTTP request: {exc}")
            if exchange is None:
                return
            path, answer = exchange
            label = path if path in self.handlers else "other"
            self.metrics.reviews.labels(label, answer.result).inc()
            await self._send(conn, writer, answer)
            if conn.their_state is h11.SEND_BODY:  # answered before the body was read
                await self._linger(reader)
            if answer.close or conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _exchange(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[str, _Answer] | None:
        """The next request's path and its answer; None when the peer closed between requests.

        Waits IDLE_TIMEOUT for a request head, then REQUEST_TIMEOUT for the rest of it."""
        async with asyncio.timeout(IDLE_TIMEOUT) as deadline:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request)
            deadline.reschedule(asyncio.get_running_loop().time() + REQUEST_TIMEOUT)
            path = event.target.decode("ascii", "replace").split("?", 1)[0]
            early = self._check(path, event)
            if early is not None:
                return path, early
            body = await self._body(conn, reader)
        if isinstance(body, _Answer):
            return path, body
        return path, self._review(path, body)

    async def _linger(self, reader: asyncio.StreamReader) -> None:
        """Read and drop what the client still sends (bounded), so that closing does not reset
        the connection under an answer it has not read yet (nginx's lingering close)."""
        dropped = 0
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                while dropped < LINGER_BYTES:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        return
                    dropped += len(data)

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # h11.PAUSED is not returned to a server
                return event
            conn.receive_data(await reader.read(READ_SIZE))

    def _check(self, path: str, request: h11.Request) -> _Answer | None:
        """An early answer for a request that is not a review, before its body is read."""
        if path not in self.handlers:
            known = ", ".join(sorted(self.handlers)) or "none"
            return _text(404, f"no admission webhook at {path}; served: {known}")
        if request.method != b"POST":
            return _text(405, "admission reviews are sent with POST")
        headers = {name: value for name, value in request.headers}
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            return _text(415, "an AdmissionReview is sent as Content-Type: application/json")
        length = headers.get(b"content-length")
        if length is not None and int(length) > MAX_BODY:
            return _text(413, f"the body is over the {MAX_BODY} byte limit")
        return None

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader) -> bytes | _Answer:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if isinstance(event, h11.ConnectionClosed):
                raise asyncio.IncompleteReadError(b"", None)
            assert isinstance(event, h11.Data)
            size += len(event.data)
            if size > MAX_BODY:
                return _text(413, f"the body is over the {MAX_BODY} byte limit")
            chunks.append(event.data)

    def _review(self, path: str, body: bytes) -> _Answer:
        started = time.perf_counter()
        try:
            request = read_review(body)
        except ReviewError as exc:
            if exc.uid is None:
                log.warning("webhook %s: not an AdmissionReview v1: %s", path, exc)
                return _text(400, f"not an AdmissionReview v1: {exc}")
            log.warning("webhook %s: malformed review %s: %s", path, exc.uid, exc)
            response = AdmissionResponse.deny(f"malformed AdmissionReview: {exc}", code=400)
            return _Answer(200, "application/json", render_review(exc.uid, response), "invalid")
        try:
            response = self.handlers[path](request)
        except Exception:
            log.exception("webhook %s: the handler failed on review %s", path, request.uid)
            return _text(500, "internal error (logged); failurePolicy applies", "error")
        self.metrics.duration.labels(path).observe(time.perf_counter() - started)
        if not response.allowed:
            where = f"{request.kind.kind} {request.namespace}/{request.name}"
            log.info("webhook %s denied %s: %s", path, where, response.message)
        body = render_review(request.uid, response)
        return _Answer(200, "application/json", body, _result(response))

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, answer: _Answer
    ) -> None:
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
        ]
        if answer.close:
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=answer.status, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=answer.body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await writer.drain()

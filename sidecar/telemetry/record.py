"""The span record: one finished span as the data plane hands it to the exporter process.

`tracing.py` builds it, `handoff.py` sends it, `exporter.py` and `otlp.py` read it. It crosses the
socket as a plain tuple (marshal takes no tuple subclass, so the data plane builds `Fields`, never
a `Record`); the exporter's side reads it back with `read`.

The common CLIENT span (one attempt, an answer below 400 with no flags, not gRPC) is sent
short: its `attributes` field is a `Plain` tuple of the request's raw values and its `name` is
"", and `read` builds the attributes and the name in the exporter process, off the request
path (decoding, splitting the authority and filling a dict cost every sampled request ~2-3k
instructions, and marshal then writes every key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from mesh.address import split_host_port

# A plain CLIENT span's attributes as the data plane sends them: method, path, authority (as
# received), service, attempts, the answering endpoint's host and port (None: none known), and
# the response status.
Plain = tuple[bytes, bytes, bytes, str, int, str | None, int | None, int]

# What the data plane builds: a plain tuple in `Record`'s field order (constructing the
# NamedTuple is a Python-level call, which every sampled span would pay).
Fields = tuple[
    bytes,
    bytes,
    bytes,
    bool,
    str,
    int,
    int,
    int,
    dict[str, Any] | Plain,
    list[Any],
    str | None,
    str,
]


class Record(NamedTuple):
    # Ids as lower-case hex digits (32 for the trace, 16 for a span), as the headers carry
    # them: the data plane never turns them into ints (`int(id, 16)`, `unhexlify(id)` here).
    trace_id: bytes
    span_id: bytes
    parent_id: bytes  # b"": no parent
    remote: bool  # the parent is another process's span
    name: str
    kind: int  # SpanKind value
    start: int  # ns since the epoch
    end: int
    attributes: dict[str, Any]  # a `Plain` tuple as sent, for the plain CLIENT span: `read`
    events: list[Any]  # [(time ns, name, attributes)]
    error: str | None  # the ERROR status description; None: status unset
    state: str  # W3C tracestate header, or ""


_SERVERS: dict[bytes, tuple[str, int | None]] = {}  # authority -> (host, port), bounded
_SERVERS_MAX = 1024


def _server(authority: bytes) -> tuple[str, int | None]:
    """server.address and server.port of an authority (the few a sidecar sees, remembered)."""
    text = authority.decode("ascii", "replace")
    found = split_host_port(text) or (text, None)
    if len(_SERVERS) >= _SERVERS_MAX:
        _SERVERS.clear()
    _SERVERS[authority] = found
    return found


def request_attributes(method: bytes, path: bytes, authority: bytes) -> dict[str, Any]:
    """The HTTP request's span attributes: method, path without its query, server address and
    port."""
    host, port = _SERVERS.get(authority) or _server(authority)
    attributes: dict[str, Any] = {
        "http.request.method": method.decode("ascii", "replace"),
        "url.path": path.partition(b"?")[0].decode("ascii", "replace"),
        "server.address": host,
    }
    if port is not None:
        attributes["server.port"] = port
    return attributes


def read(fields: Sequence[Any]) -> Record:
    """A record as sent, with a plain CLIENT span's attributes and name built."""
    record = Record._make(fields)
    if not isinstance(record.attributes, tuple):
        return record
    method, path, authority, service, attempts, peer_host, peer_port, status = record.attributes
    attributes = request_attributes(method, path, authority)
    attributes["outrigger.service"] = service
    attributes["outrigger.retry.attempts"] = attempts
    if peer_host is not None:
        attributes["network.peer.address"] = peer_host
        attributes["network.peer.port"] = peer_port
    attributes["http.response.status_code"] = status
    name = f"{attributes['http.request.method']} {service}"
    return record._replace(name=name, attributes=attributes)

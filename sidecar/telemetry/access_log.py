"""The access log: one JSON line per request, and one per passed-through TCP connection, on
stdout (off by default; `access_log: true`).

A line is built when its request cycle (or connection) ends and kept in `lines`; `flush` writes
them all at once (the sidecar's housekeeping does every second, and once more at exit), so a
request never waits on stdout. Request fields: time, direction, method, authority, path, status,
flags ("-" for none), duration_ms, destination (the service, "passthrough" or "inbound"; "-"
when no route), upstream (the endpoint tried last, the one that answered or failed last),
attempts, trace_id, and grpc_status for a gRPC call over HTTP/2; a request refused before its
head was whole (400 or 408, flag DPE) has "-" for method, authority and path. TCP fields
(Envoy's names where it has them): time (the connection's start), direction, protocol (what
detection saw, or the declared one: tcp, tls), downstream, upstream, destination, sni ("-" for
none), flags, bytes_received (from the client), bytes_sent (to it), duration_ms.
"""

from __future__ import annotations

import json
import sys
import time

from sidecar.exchange import Request
from sidecar.protocol.events import RequestHead
from sidecar.telemetry import trace_id
from sidecar.transport.tcp import TcpRecord


class AccessLog:
    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: list[str] = []  # built, not written yet

    def record(
        self,
        direction: str,
        head: RequestHead | None,
        destination: str,
        status: int,
        flags: str,
        duration: float,
        request: Request | None,
        grpc_status: int | None = None,
    ) -> None:
        """One request's line; `request` is None when none was built (no route), `head` when the
        request was refused before its head was whole; `grpc_status` for a gRPC call."""
        tried = request.tried if request is not None else None
        if head is not None:
            method = head.method.decode("ascii", "replace")
            authority = head.authority.decode("ascii", "replace")
            path = head.path.decode("ascii", "replace")
        else:
            method = authority = path = "-"
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "direction": direction,
            "method": method,
            "authority": authority,
            "path": path,
            "status": status,
            "flags": flags or "-",
            "duration_ms": round(duration * 1000, 3),
            "destination": destination,
            "upstream": str(tried[-1]) if tried else "-",
            "attempts": request.attempts if request is not None else 0,
            "trace_id": trace_id(request.headers) if request is not None else "-",
        }
        if grpc_status is not None:
            line["grpc_status"] = grpc_status
        self.lines.append(json.dumps(line, separators=(",", ":")))

    def tcp(self, record: TcpRecord) -> None:
        """One passed-through connection's line, once it is over."""
        self.lines.append(
            json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.started_at)),
                    "direction": record.direction,
                    "protocol": record.protocol,
                    "downstream": record.downstream,
                    "upstream": record.upstream,
                    "destination": record.destination,
                    "sni": record.server_name or "-",
                    "flags": record.flags or "-",
                    "bytes_received": record.bytes_received,
                    "bytes_sent": record.bytes_sent,
                    "duration_ms": round(record.duration * 1000, 3),
                },
                separators=(",", ":"),
            )
        )

    def flush(self) -> None:
        """Write the lines built so far to stdout (the list is emptied in place)."""
        if self.lines:
            lines, self.lines[:] = list(self.lines), []
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()

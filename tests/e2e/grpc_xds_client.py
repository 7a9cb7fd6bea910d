"""A stock grpcio xDS client, run as a subprocess by test_grpc_client.py.

GRPC_XDS_BOOTSTRAP is set in this process's environment only. Reads one command per line on
stdin and answers one JSON line on stdout:

    call SECONDS   ->  {"ok": true, "backend": NAME} | {"ok": false, "code": CODE, "details": ...}
"""

from __future__ import annotations

import json
import sys

import grpc

WHO = "/outrigger.test.Echo/Who"


def main() -> int:
    target = sys.argv[1]
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(WHO, request_serializer=None, response_deserializer=None)
    print(json.dumps({"started": target}), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command != "call":
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
            continue
        try:
            reply = who(b"", timeout=float(arg or "5"), wait_for_ready=False)
            print(json.dumps({"ok": True, "backend": reply.decode()}), flush=True)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            print(
                json.dumps({"ok": False, "code": code.name if code else "", "details": details}),
                flush=True,
            )
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

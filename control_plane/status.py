"""What `outrigger status` shows: each connected sidecar and the config it ACKed or NACKed, and
the problems the control plane's source works around (invalid annotations).

Asks the control plane's CSDS (FetchClientStatus) on the xDS port, like `istioctl
proxy-status`; see control_plane.server.CsdsServer for how the per-type state is encoded. The
problems come from `/outrigger.v1.ControlPlane/Problems` on the same port: an empty request, a
`google.protobuf.Struct` `{"problems": [{reason, object, key, value, message}, ...]}` back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import grpc
from envoy.service.status.v3 import csds_pb2
from google.protobuf import struct_pb2

from mesh.xds import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE

FETCH_METHOD = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus"
PROBLEMS_SERVICE = "outrigger.v1.ControlPlane"
PROBLEMS_METHOD = "Problems"
TIMEOUT = 5.0
TYPE_COLUMNS = (
    ("LDS", LISTENER_TYPE),
    ("RDS", ROUTE_TYPE),
    ("CDS", CLUSTER_TYPE),
    ("EDS", ENDPOINT_TYPE),
)
_STATUS_WORD = {
    csds_pb2.SYNCED: "SYNCED",
    csds_pb2.STALE: "STALE",
    csds_pb2.ERROR: "NACKED",
    csds_pb2.NOT_SENT: "NOT SENT",
}


@dataclass(frozen=True, slots=True)
class TypeStatus:
    status: str  # SYNCED | STALE | NACKED | NOT SENT
    version_sent: str
    version_acked: str
    last_nack: str


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    node_id: str
    service: str
    types: dict[str, TypeStatus]  # by column name (LDS, RDS, CDS, EDS)


def fetch_status(address: str, timeout: float = TIMEOUT) -> list[ProxyStatus]:
    """Every node the control plane at `address` has a stream from. Raises grpc.RpcError."""
    with grpc.insecure_channel(address) as channel:
        fetch = channel.unary_unary(
            FETCH_METHOD,
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        response: Any = fetch(csds_pb2.ClientStatusRequest(), timeout=timeout)
    return [_proxy(config) for config in response.config]


def _proxy(config: Any) -> ProxyStatus:
    columns = {url: name for name, url in TYPE_COLUMNS}
    types: dict[str, TypeStatus] = {}
    for generic in config.generic_xds_configs:
        extra = struct_pb2.Struct()
        if generic.HasField("xds_config"):
            generic.xds_config.Unpack(extra)
        sent = extra.fields["version_sent"].string_value if "version_sent" in extra.fields else ""
        column = columns.get(generic.type_url, generic.type_url.rsplit(".", 1)[-1])
        types[column] = TypeStatus(
            status=_STATUS_WORD.get(generic.config_status, "UNKNOWN"),
            version_sent=sent,
            version_acked=generic.version_info,
            last_nack=generic.error_state.details,
        )
    fields = config.node.metadata.fields
    service = fields["service"].string_value if "service" in fields else config.node.cluster
    return ProxyStatus(node_id=config.node.id, service=cast(str, service), types=types)


@dataclass(frozen=True, slots=True)
class ProblemStatus:
    reason: str
    object: str
    key: str
    value: str
    message: str


def fetch_problems(address: str, timeout: float = TIMEOUT) -> list[ProblemStatus]:
    """The problems the control plane at `address` works around ([] from a control plane that
    does not say). Raises grpc.RpcError."""
    with grpc.insecure_channel(address) as channel:
        ask = channel.unary_unary(
            f"/{PROBLEMS_SERVICE}/{PROBLEMS_METHOD}",
            request_serializer=lambda data: data,
            response_deserializer=struct_pb2.Struct.FromString,
        )
        try:
            response: Any = ask(b"", timeout=timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return []
            raise
    found = []
    for item in (
        response.fields["problems"].list_value.values if "problems" in response.fields else []
    ):
        fields = item.struct_value.fields
        text = {k: fields[k].string_value if k in fields else "" for k in
                ("reason", "object", "key", "value", "message")}  # fmt: skip
        found.append(ProblemStatus(**text))
    return found

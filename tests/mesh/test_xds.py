"""The shared xDS vocabulary: decoding refuses what it cannot read and names it."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2

from mesh.model import parse_mesh
from mesh.translate import translate
from mesh.xds import (
    LISTENER_TYPE,
    ROUTE_TYPE,
    ResourceError,
    pack_resources,
    resources_from_any,
    route_names_of,
)

MESH = parse_mesh({"services": [{"name": "payments", "endpoints": ["127.0.0.1:9001"]}]}, "t")


def test_an_unknown_resource_type_is_refused_by_name() -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/foo.Bar")
    with pytest.raises(ResourceError, match=r"foo\.Bar: resource type not supported"):
        resources_from_any([unknown])


def test_a_resource_sent_twice_in_one_response_is_refused() -> None:
    packed = pack_resources(translate(MESH))
    with pytest.raises(ResourceError, match="sent twice"):
        resources_from_any([packed[0], packed[0]])


def test_sidecars_follow_filter_chains_and_grpc_clients_follow_api_listeners() -> None:
    listeners = translate(MESH)[LISTENER_TYPE]
    assert route_names_of(listeners["outbound"], api_listener=False) == ["outbound"]
    assert route_names_of(listeners["payments"], api_listener=False) == []
    assert route_names_of(listeners["payments"]) == ["payments.default.svc.cluster.local:80"]
    assert set(translate(MESH)[ROUTE_TYPE]) == {"outbound", "payments.default.svc.cluster.local:80"}

"""XdsClient against a scripted ADS server: a push that crosses a subscription change.

The server ignores a request whose nonce is stale (the xDS spec; Istio and go-control-plane do
the same). So when a Cluster push adds an EDS cluster and the server pushes the endpoints of
the clusters it knows right after, the client's request for the new assignment carries a stale
nonce and is dropped; the client must ask again with the nonce of the push instead of
committing (and NACKing) a set that lacks the new assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from mesh.model import parse_mesh
from mesh.translate import translate
from sidecar.config import Snapshot
from sidecar.xds.client import ADS_METHOD, XdsClient

STEP = 5.0


def _resources(services: dict[str, list[str]]) -> Any:
    doc = {"services": [{"name": n, "endpoints": e} for n, e in services.items()]}
    return translate(parse_mesh(doc, "<test>"))


def _cluster(service: str) -> str:
    return f"outbound|80||{service}.default.svc.cluster.local"


class ScriptedAds:
    """One ADS stream at a time; the test reads the requests and says what to send."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.nonces = 0
        self.server = grpc.aio.server()
        service, method = ADS_METHOD[1:].split("/")
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _stream(self, requests: Any, context: Any) -> AsyncIterator[Any]:
        async def read() -> None:
            async for request in requests:
                self.requests.put_nowait(request)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await self.responses.get()
        finally:
            reader.cancel()

    def send(self, type_url: str, resources: dict[str, Any], version: str) -> str:
        self.nonces += 1
        response = discovery_pb2.DiscoveryResponse(
            type_url=type_url, version_info=version, nonce=str(self.nonces)
        )
        for message in resources.values():
            response.resources.add().Pack(message)
        self.responses.put_nowait(response)
        return response.nonce

    async def expect(self, type_url: str) -> Any:
        """The next request of `type_url` (others are dropped)."""
        async with asyncio.timeout(STEP):
            while True:
                request = await self.requests.get()
                if request.type_url == type_url:
                    return request


@pytest.fixture
async def ads() -> AsyncIterator[ScriptedAds]:
    server = ScriptedAds()
    await server.server.start()
    yield server
    async with asyncio.timeout(5):
        await server.server.stop(0)


@contextlib.asynccontextmanager
async def running(client: XdsClient) -> AsyncIterator[None]:
    task = asyncio.create_task(client.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task


async def _first_sync(ads: ScriptedAds, v1: Any) -> None:
    """Serve v1 to a connecting client: LDS, CDS, then the RDS and EDS it asks for."""
    await ads.expect(LISTENER_TYPE)
    ads.send(LISTENER_TYPE, v1[LISTENER_TYPE], "l1")
    ads.send(CLUSTER_TYPE, v1[CLUSTER_TYPE], "c1")
    rds = await ads.expect(ROUTE_TYPE)
    ads.send(ROUTE_TYPE, {n: v1[ROUTE_TYPE][n] for n in rds.resource_names}, "r1")
    eds = await ads.expect(ENDPOINT_TYPE)
    ads.send(ENDPOINT_TYPE, {n: v1[ENDPOINT_TYPE][n] for n in eds.resource_names}, "e1")


def _client(ads: ScriptedAds, applied: list[Snapshot], **kwargs: Any) -> XdsClient:
    return XdsClient(
        f"127.0.0.1:{ads.port}",
        node_id="a~test",
        service="a",
        namespace="default",
        apply=applied.append,
        backoff_base=0.05,
        backoff_max=0.2,
        **kwargs,
    )


async def test_a_push_that_crosses_a_new_eds_subscription_is_not_nacked(
    ads: ScriptedAds,
) -> None:
    v1 = _resources({"b": ["127.0.0.1:9001"]})
    v2 = _resources({"b": ["127.0.0.1:9001", "127.0.0.1:9002"], "c": ["127.0.0.1:9101"]})
    applied: list[Snapshot] = []
    client = _client(ads, applied)
    async with running(client):
        await _first_sync(ads, v1)
        async with asyncio.timeout(STEP):
            await client.ready.wait()
        ack = await ads.expect(ENDPOINT_TYPE)
        assert not ack.HasField("error_detail")

        # The edit: new Clusters, and at once the new endpoints of b (all the server knows
        # the client wants), before it reads the client's request for c.
        ads.send(CLUSTER_TYPE, v2[CLUSTER_TYPE], "c2")
        push = ads.send(ENDPOINT_TYPE, {_cluster("b"): v2[ENDPOINT_TYPE][_cluster("b")]}, "e2")
        stale = await ads.expect(ENDPOINT_TYPE)
        assert stale.response_nonce != push  # sent before the push was read: ignored
        assert set(stale.resource_names) == {_cluster("b"), _cluster("c")}
        again = await ads.expect(ENDPOINT_TYPE)
        assert again.response_nonce == push and not again.HasField("error_detail")
        assert set(again.resource_names) == {_cluster("b"), _cluster("c")}
        assert len(applied) == 1  # nothing committed without c's assignment

        ads.send(ENDPOINT_TYPE, v2[ENDPOINT_TYPE], "e3")
        ack = await ads.expect(ENDPOINT_TYPE)
        assert not ack.HasField("error_detail"), ack.error_detail.message
        assert ack.version_info == "e3"
        assert len(applied) == 2
        ads.send(ROUTE_TYPE, v2[ROUTE_TYPE], "r2")  # and the route to c
        ack = await ads.expect(ROUTE_TYPE)
        assert not ack.HasField("error_detail"), ack.error_detail.message
        assert len(applied) == 3
        names = {s.name: [e.port for e in s.endpoints] for s in applied[2].services.values()}
        assert names == {"b": [9001, 9002], "c": [9101]}


async def test_an_assignment_never_sent_is_taken_as_absent_and_the_set_nacked(
    ads: ScriptedAds,
) -> None:
    v1 = _resources({"b": ["127.0.0.1:9001"]})
    v2 = _resources({"b": ["127.0.0.1:9001"], "c": ["127.0.0.1:9101"]})
    applied: list[Snapshot] = []
    client = _client(ads, applied, does_not_exist_timeout=0.3)
    async with running(client):
        await _first_sync(ads, v1)
        await ads.expect(ENDPOINT_TYPE)  # the ACK
        ads.send(CLUSTER_TYPE, v2[CLUSTER_TYPE], "c2")
        ads.send(ROUTE_TYPE, v2[ROUTE_TYPE], "r2")
        await ads.expect(ENDPOINT_TYPE)  # asks for c; this server never sends it
        nack = await ads.expect(ROUTE_TYPE)
        while not nack.HasField("error_detail"):
            nack = await ads.expect(ROUTE_TYPE)
        assert "c.default.svc.cluster.local" in nack.error_detail.message
        assert len(applied) == 1  # the last good snapshot stays

"""The webhook server and /inject over real HTTPS on 127.0.0.1, as the API server calls it."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from control_plane.app import ControlPlane, ControlPlaneError
from control_plane.webhooks.inject import inject_pod
from control_plane.webhooks.review import AdmissionRequest, AdmissionResponse
from control_plane.webhooks.server import MAX_BODY, WebhookServer
from mesh.model import load_mesh
from tests.control_plane.webhooks.pods import assert_valid, large_pod, pod
from tests.control_plane.webhooks.reviews import admission_review, answer_of, patched
from tests.control_plane.webhooks.serving import MESH, Webhook, issue

Json = dict[str, Any]


async def test_a_pod_review_gets_the_patch_that_injects_it(webhook: Webhook) -> None:
    document = pod()
    review = admission_review(document)
    response = await webhook.review(review)
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    result = patched(review, response)
    assert_valid(result)
    mesh = load_mesh(webhook.mesh)
    expected = inject_pod(
        document,
        namespace="shop",
        injection=mesh.injection,
        otlp_endpoint=mesh.tracing.otlp_endpoint,
    )
    assert result == expected.pod
    proxy = result["spec"]["initContainers"][1]
    assert proxy["image"] == "registry.example/outrigger:1.0"
    args = proxy["args"]
    assert args[args.index("--control-plane") + 1] == "outrigger.mesh.svc:15010"
    assert args[args.index("--otlp-endpoint") + 1] == "http://jaeger.tracing.svc:4317"


async def test_a_large_pod_is_injected_intact(webhook: Webhook) -> None:
    review = admission_review(large_pod())
    result = patched(review, await webhook.review(review))
    assert_valid(result)
    assert len(result["spec"]["containers"]) == 20
    assert len(result["spec"]["initContainers"]) == 7


async def test_an_injected_pod_comes_back_unchanged(webhook: Webhook) -> None:
    first = admission_review(pod())
    injected = patched(first, await webhook.review(first))
    again = admission_review(injected)
    response = await webhook.review(again)
    assert response == {"uid": again["request"]["uid"], "allowed": True}


async def test_a_bad_annotation_denies_the_pod_with_the_reason(webhook: Webhook) -> None:
    review = admission_review(pod(annotations={"outrigger.dev/proxy-memory": "lots"}))
    response = await webhook.review(review)
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "outrigger sidecar injection: annotation outrigger.dev/proxy-memory: must be a "
        'Kubernetes quantity greater than zero, like "128Mi" or "1Gi", got "lots"'
    )


async def test_a_host_network_pod_is_allowed_untouched_with_a_warning(webhook: Webhook) -> None:
    response = await webhook.review(admission_review(pod(hostNetwork=True)))
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == [
        "outrigger: not injected: the pod uses hostNetwork (its rules would be the node's)"
    ]


async def test_a_non_pod_review_is_allowed_untouched_with_a_warning(webhook: Webhook) -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
    review = admission_review(deployment, group="apps", kind="Deployment")
    response = await webhook.review(review)
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == [
        "outrigger /inject changes only pods; apps/v1 Deployment (deployments) passed untouched"
    ]


async def test_a_pod_subresource_or_update_is_allowed_untouched(webhook: Webhook) -> None:
    status = await webhook.review(admission_review(pod(), sub_resource="status"))
    assert (status["allowed"], "patch" in status) == (True, False)
    update = await webhook.review(admission_review(pod(), operation="UPDATE"))
    assert update == {"uid": update["uid"], "allowed": True}


async def test_a_mesh_file_edit_changes_what_is_injected(webhook: Webhook) -> None:
    webhook.mesh.write_text(MESH.format(tag="2.0"))
    assert webhook.plane.source is not None
    assert await webhook.plane.publish(await webhook.plane.source.first())
    review = admission_review(pod())
    proxy = patched(review, await webhook.review(review))["spec"]["initContainers"][1]
    assert proxy["image"] == "registry.example/outrigger:2.0"


async def test_reviews_share_one_kept_alive_connection(webhook: Webhook) -> None:
    async with webhook.client() as client:
        for _ in range(3):
            review = admission_review(pod())
            reply = await client.post("/inject", json=review)
            assert answer_of(review, reply.content)["allowed"] is True
            assert reply.headers.get("connection") != "close"
    assert webhook.plane.webhooks is not None
    metrics = webhook.plane.metrics.render().decode()
    assert 'outrigger_webhook_reviews_total{path="/inject",result="patched"} 3.0' in metrics


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not an AdmissionReview v1: the body is not JSON"),
        (b"[]", "the body must be an AdmissionReview object, got list"),
        (b"[" * 100_000 + b"]" * 100_000, "the body is not JSON"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}),
            "expected apiVersion admission.k8s.io/v1 kind AdmissionReview, got "
            "'admission.k8s.io/v1beta1' 'AdmissionReview' (register the webhook with "
            "admissionReviewVersions: [v1])",
        ),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
            "an AdmissionReview sent to a webhook must have a request object",
        ),
        (
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}
            ),
            "request.uid: must be a non-empty string",
        ),
    ],
)
async def test_a_body_that_is_not_a_review_gets_400_with_the_reason(
    webhook: Webhook, body: bytes | str, message: str
) -> None:
    async with webhook.client() as client:
        reply = await client.post(
            "/inject", content=body, headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400
        assert message in reply.text
        # the server is still there for the next review
        review = admission_review(pod())
        follow_up = await client.post("/inject", json=review)
        assert answer_of(review, follow_up.content)["allowed"] is True


async def test_a_malformed_request_inside_a_review_is_answered_as_a_review(
    webhook: Webhook,
) -> None:
    review = admission_review(pod())
    review["request"]["kind"] = "Pod"
    async with webhook.client() as client:
        reply = await client.post("/inject", json=review)
    assert reply.status_code == 200
    response = json.loads(reply.content)["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    assert response["status"] == {
        "code": 400,
        "message": "malformed AdmissionReview: request.kind and request.resource: must be objects",
    }


async def test_a_pod_that_is_not_a_pod_object_is_denied_with_the_field(webhook: Webhook) -> None:
    review = admission_review({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})
    response = await webhook.review(review)
    assert response["allowed"] is False
    assert "spec: must be the pod's spec" in response["status"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "message"),
    [
        ("POST", "/mutate", {"content-type": "application/json"}, 404, "served: /inject"),
        ("GET", "/inject", {}, 405, "sent with POST"),
        ("POST", "/inject", {"content-type": "text/plain"}, 415, "application/json"),
    ],
)
async def test_requests_that_are_not_reviews_are_refused_clearly(
    webhook: Webhook, method: str, path: str, headers: dict[str, str], status: int, message: str
) -> None:
    async with webhook.client() as client:
        reply = await client.request(method, path, content=b"{}", headers=headers)
    assert reply.status_code == status
    assert message in reply.text


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_gets_413(webhook: Webhook, chunked: bool) -> None:
    big = b" " * (MAX_BODY + 1)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    async with webhook.client() as client:
        reply = await client.post(
            "/inject",
            content=stream() if chunked else big,
            headers={"content-type": "application/json"},
        )
    assert reply.status_code == 413
    assert "byte limit" in reply.text


async def test_garbage_instead_of_http_gets_400_and_the_server_goes_on(webhook: Webhook) -> None:
    context = ssl.create_default_context()
    webhook.ca.configure_trust(context)
    assert webhook.plane.webhooks is not None
    port = webhook.plane.webhooks.port
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        reply = await reader.read()
        writer.close()
        # plain text to the TLS port: the handshake fails, nothing else happens
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /inject HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.read()
        writer.close()
    assert reply.startswith(b"HTTP/1.1 400 ")
    response = await webhook.review(admission_review(pod()))
    assert response["allowed"] is True


async def test_a_rotated_certificate_is_served_to_new_connections(webhook: Webhook) -> None:
    new_ca = trustme.CA()
    issue(new_ca, webhook.cert, webhook.key)
    review = admission_review(pod())
    async with webhook.client(new_ca) as client:
        reply = await client.post("/inject", json=review)
    assert answer_of(review, reply.content)["allowed"] is True
    async with webhook.client() as client:  # the old CA no longer vouches for the server
        with pytest.raises(httpx.ConnectError):
            await client.post("/inject", json=review)


async def test_a_broken_certificate_pair_keeps_the_last_good_one(webhook: Webhook) -> None:
    other = trustme.CA().issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(webhook.key)  # the key no longer matches the certificate
    response = await webhook.review(admission_review(pod()))
    assert response["allowed"] is True
    metrics = webhook.plane.metrics.render().decode()
    assert 'outrigger_webhook_certificate_reloads_total{result="failed"} 1.0' in metrics


async def test_a_handler_that_fails_gets_500_so_the_failure_policy_applies(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    issue(ca, tmp_path / "c", tmp_path / "k")
    server = WebhookServer(tmp_path / "c", tmp_path / "k")

    def broken(request: AdmissionRequest) -> AdmissionResponse:
        raise RuntimeError("bug")

    server.add("/validate", broken)
    await server.start("127.0.0.1", 0)
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with httpx.AsyncClient(verify=context, timeout=5.0) as client:
            reply = await client.post(
                f"https://127.0.0.1:{server.port}/validate", json=admission_review(pod())
            )
        assert reply.status_code == 500
        assert "failurePolicy applies" in reply.text
    finally:
        await server.stop()


async def test_the_webhook_needs_a_certificate_and_a_key(tmp_path: Path) -> None:
    plane = ControlPlane(None)
    try:
        with pytest.raises(ControlPlaneError, match="--webhook needs --webhook-cert"):
            await plane.start("127.0.0.1:0", None, webhook="127.0.0.1:0")
        with pytest.raises(ControlPlaneError, match="cannot load --webhook-cert"):
            await plane.start(
                "127.0.0.1:0",
                None,
                webhook="127.0.0.1:0",
                webhook_cert=tmp_path / "missing.crt",
                webhook_key=tmp_path / "missing.key",
            )
    finally:
        await plane.stop(0)

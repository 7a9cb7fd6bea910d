"""/validate over real HTTPS: policy annotations on Services and Namespaces, checked at admission
with the words the control plane's Events and the mesh file use."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from control_plane.sources.cluster import ClusterState, cluster_mesh
from control_plane.webhooks.server import MAX_BODY
from mesh.model import Mesh, MeshError, parse_mesh
from tests.control_plane.kube_api import FakeKubeApi, namespace, service
from tests.control_plane.webhooks.pods import pod
from tests.control_plane.webhooks.reviews import admission_review
from tests.control_plane.webhooks.serving import Webhook

Json = dict[str, Any]
SOON = 'outrigger.dev/timeout: must be a duration like "250ms", "1.5s", "2s" or "1m", got "soon"'


def service_review(annotations: Json | None, *, operation: str = "CREATE", **kw: Any) -> Json:
    return admission_review(
        service("payments", "shop", annotations=annotations), kind="Service", operation=operation,
        **kw,
    )  # fmt: skip


async def validate(webhook: Webhook, review: Json) -> Json:
    return await webhook.review(review, "/validate")


async def test_a_good_annotation_is_admitted_and_a_bad_one_denied_with_the_reason(
    webhook: Webhook,
) -> None:
    good = await validate(webhook, service_review({"outrigger.dev/timeout": "2s"}))
    assert good == {"uid": good["uid"], "allowed": True}
    bad = await validate(webhook, service_review({"outrigger.dev/timeout": "soon"}))
    assert bad["allowed"] is False
    assert bad["status"] == {"code": 400, "message": SOON}


async def test_the_denial_reads_as_the_control_planes_event_and_the_mesh_file(
    webhook: Webhook,
) -> None:
    denied = await validate(webhook, service_review({"outrigger.dev/retry-attempts": "two"}))
    message = denied["status"]["message"]
    assert message == 'outrigger.dev/retry-attempts: must be a whole number >= 0, got "two"'
    # The control plane, given the same Service, posts an Event that says the same, then what
    # it uses instead.
    state = ClusterState()
    stored = FakeKubeApi().create(
        service("payments", "shop", annotations={"outrigger.dev/retry-attempts": "two"})
    )
    state.put("Service", stored)
    (event,) = cluster_mesh(state, Mesh()).problems
    assert (event.reason, event.regarding.name) == ("InvalidPolicy", "payments")
    assert event.message == message + "; using none (built-in) instead"
    # The mesh file says it after the field's own name.
    with pytest.raises(MeshError) as caught:
        parse_mesh(
            {"services": [{"name": "payments", "endpoints": [], "policy": {"retries": {
                "attempts": "two"}}}]},
            "mesh.yaml",
        )  # fmt: skip
    assert str(caught.value).endswith(message.removeprefix("outrigger.dev/retry-attempts"))


async def test_every_problem_is_named_in_one_denial(webhook: Webhook) -> None:
    annotations = {
        "outrigger.dev/timeout": "soon",
        "outrigger.dev/retry-backoff-base": "1s",
        "outrigger.dev/retry-backoff-max": "100ms",
        "outrigger.dev/retires": "2",
        "example.com/owner": "anything goes here",
    }
    denied = await validate(webhook, service_review(annotations))
    assert denied["status"]["message"].splitlines() == [
        SOON,
        "outrigger.dev/retry-backoff-max: must not be shorter than the backoff base (1s), "
        'got "100ms"',
        "outrigger.dev/retires: not a known annotation; did you mean outrigger.dev/retry-on?",
    ]


async def test_a_namespace_is_checked_as_a_service_is(webhook: Webhook) -> None:
    bad = admission_review(
        namespace("shop", {"outrigger.dev/load-balancer": "fastest"}), kind="Namespace",
        namespace="",
    )  # fmt: skip
    denied = await validate(webhook, bad)
    assert denied["allowed"] is False
    assert denied["status"]["message"] == (
        "outrigger.dev/load-balancer: must be one of round_robin, least_request, random, "
        'got "fastest"'
    )
    good = admission_review(
        namespace("shop", {"outrigger.dev/connect-timeout": "1s"}), kind="Namespace", namespace=""
    )
    assert (await validate(webhook, good))["allowed"] is True


async def test_objects_without_outrigger_annotations_pass_untouched(webhook: Webhook) -> None:
    for theirs in (None, {"example.com/owner": "team-a"}):
        review = service_review(theirs)
        assert await validate(webhook, review) == {
            "uid": review["request"]["uid"],
            "allowed": True,
        }


async def test_other_kinds_and_sub_resources_pass_untouched_with_a_warning(
    webhook: Webhook,
) -> None:
    odd = pod(annotations={"outrigger.dev/timeout": "soon"})
    answer = await validate(webhook, admission_review(odd))
    assert answer["allowed"] is True
    assert answer["warnings"] == [
        "outrigger /validate checks only Services and Namespaces; v1 Pod (pods) passed unchecked"
    ]
    status = await validate(
        webhook, service_review({"outrigger.dev/timeout": "soon"}, sub_resource="status")
    )
    assert status["allowed"] is True
    assert "(services/status) passed unchecked" in status["warnings"][0]


async def test_a_delete_is_admitted(webhook: Webhook) -> None:
    review = service_review({"outrigger.dev/timeout": "soon"}, operation="DELETE")
    review["request"]["oldObject"], review["request"]["object"] = review["request"]["object"], None
    answer = await validate(webhook, review)
    assert answer == {"uid": review["request"]["uid"], "allowed": True}


async def test_an_update_is_denied_only_for_what_it_breaks(webhook: Webhook) -> None:
    old = service("payments", "shop", annotations={"outrigger.dev/timeout": "soon"})
    relabelled = copy.deepcopy(old)
    relabelled["metadata"]["labels"] = {"team": "payments"}
    review = admission_review(relabelled, kind="Service", operation="UPDATE")
    review["request"]["oldObject"] = old
    kept = await validate(webhook, review)
    assert kept["allowed"] is True
    assert kept["warnings"] == [
        SOON + " (already on this Service before the update; the control plane falls back for "
        "this key until it is fixed)"
    ]
    worse = copy.deepcopy(old)
    worse["metadata"]["annotations"]["outrigger.dev/max-requests"] = "0"
    review = admission_review(worse, kind="Service", operation="UPDATE")
    review["request"]["oldObject"] = old
    denied = await validate(webhook, review)
    assert denied["allowed"] is False
    assert denied["status"]["message"] == (
        "outrigger.dev/max-requests: must be a whole number >= 1, got 0"
    )
    assert len(denied["warnings"]) == 1  # the old problem is still named


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"apiVersion": "v1", "kind": "Service", "metadata": "payments"},
            'request.object.metadata: a Service must have metadata (a mapping), got "payments"',
        ),
        (None, "request.object.metadata: a Service must have metadata (a mapping), got null"),
        (
            {"metadata": {"name": "payments", "annotations": ["outrigger.dev/timeout=2s"]}},
            'metadata.annotations: must be a mapping of strings, got ["outrigger.dev/timeout=2s"]',
        ),
        (
            {"metadata": {"name": "payments", "annotations": {"outrigger.dev/retry-attempts": 2}}},
            'outrigger.dev/retry-attempts: must be a string (quote it in YAML: "2"), got 2',
        ),
    ],
)
async def test_an_object_that_cannot_be_read_is_denied_naming_the_field(
    webhook: Webhook, obj: object, message: str
) -> None:
    review = service_review(None)
    review["request"]["object"] = obj
    denied = await validate(webhook, review)
    assert denied["allowed"] is False
    assert denied["status"] == {"code": 400, "message": message}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not an AdmissionReview v1: the body is not JSON"),
        (json.dumps({"kind": "Service"}).encode(), 400, "expected apiVersion admission.k8s.io/v1"),
        (b" " * (MAX_BODY + 1), 413, f"the body is over the {MAX_BODY} byte limit"),
    ],
)
async def test_a_request_that_is_not_a_review_gets_a_clear_error_and_the_server_goes_on(
    webhook: Webhook, body: bytes, status: int, message: str
) -> None:
    async with webhook.client() as client:
        reply = await client.post(
            "/validate", content=body, headers={"content-type": "application/json"}
        )
    assert reply.status_code == status
    assert message in reply.text
    review = service_review({"outrigger.dev/timeout": "2s"})
    assert (await validate(webhook, review))["allowed"] is True


async def test_reviews_are_counted_by_result(webhook: Webhook) -> None:
    await validate(webhook, service_review({"outrigger.dev/timeout": "2s"}))
    await validate(webhook, service_review({"outrigger.dev/timeout": "soon"}))
    await validate(webhook, service_review({"outrigger.dev/timeout": "soon"}))
    metrics = webhook.plane.metrics.render().decode()
    assert 'outrigger_webhook_reviews_total{path="/validate",result="allowed"} 1.0' in metrics
    assert 'outrigger_webhook_reviews_total{path="/validate",result="denied"} 2.0' in metrics

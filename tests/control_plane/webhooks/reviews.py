"""AdmissionReview requests as the API server sends them, and checks on the answers.

The request shape follows the Kubernetes API reference (kube-apiserver Admission (v1)) and the
"Dynamic Admission Control" page's example: uid, kind/resource with their request* twins, name
(empty under generateName), namespace, operation, userInfo, object, oldObject, dryRun, options.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema

from control_plane.webhooks.inject import admit
from control_plane.webhooks.review import read_review, render_review
from mesh.injection import Injection
from tests.control_plane.webhooks.pods import apply

Json = dict[str, Any]

SCHEMA = json.loads((Path(__file__).parent / "admission-review-v1.schema.json").read_text())
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

_RESOURCES = {"Pod": "pods", "Deployment": "deployments", "ConfigMap": "configmaps"}


def admission_review(
    obj: Json | None,
    *,
    operation: str = "CREATE",
    namespace: str = "shop",
    group: str = "",
    version: str = "v1",
    kind: str = "Pod",
    sub_resource: str | None = None,
    uid: str | None = None,
) -> Json:
    gvk = {"group": group, "version": version, "kind": kind}
    gvr = {"group": group, "version": version, "resource": _RESOURCES.get(kind, kind.lower() + "s")}
    request: Json = {
        "uid": uid or str(uuid.uuid4()),
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "name": "",  # a controller's pods are named by generateName after admission
        "namespace": namespace,
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "6a1c2a44-58a8-4b0e-9d5e-0c1b7a2c2f31",
            "groups": ["system:serviceaccounts", "system:authenticated"],
        },
        "object": obj,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if sub_resource is not None:
        request["subResource"] = sub_resource
        request["requestSubResource"] = sub_resource
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    check_schema(review)
    return review


def check_schema(review: Json) -> None:
    """The review has the fields, types and values of the checked-in schema."""
    errors = sorted(_VALIDATOR.iter_errors(review), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def answer_of(review: Json, body: bytes) -> Json:
    """The `response` of an AdmissionReview answer, checked against the schema and the uid."""
    answer = json.loads(body)
    check_schema(answer)
    response: Json = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    return response


def patched(review: Json, response: Json) -> Json:
    """The object with the answer's JSONPatch applied (the object itself without a patch)."""
    obj: Json = review["request"]["object"]
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    return apply(obj, json.loads(base64.b64decode(response["patch"], validate=True)))


def inject_in_process(review: Json, injection: Injection) -> Json:
    """The `/inject` answer's response, through the same functions the server calls."""
    request = read_review(json.dumps(review).encode())
    return answer_of(review, render_review(request.uid, admit(request, injection)))

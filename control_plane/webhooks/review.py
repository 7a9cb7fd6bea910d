"""AdmissionReview v1: what the API server sends an admission webhook, and the answer it expects.

`read_review(body)` checks the envelope and returns an `AdmissionRequest`. A body that is not an
AdmissionReview v1 carrying a request uid raises `ReviewError` without a uid: there is nothing an
answer could refer to, so the server says why in a plain HTTP 400. A review whose uid is readable
but whose request is malformed raises `ReviewError` with the uid, and is answered as a review
(not allowed, code 400, the reason), which the API server shows to the user.

`render_review(uid, response)` is the answer: `apiVersion`/`kind` as sent, the uid echoed,
`allowed`, for a mutation `patchType: JSONPatch` and the RFC 6902 patch base64-encoded, the
warnings, and for a denial a `status` with the code and message.

Only the fields Outrigger reads are checked; the rest of the request (userInfo, options, ...)
passes unread. The checked-in schema tests/control_plane/webhooks/
admission-review-v1.schema.json describes the same fields.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

API_VERSION: Final = "admission.k8s.io/v1"
KIND: Final = "AdmissionReview"
OPERATIONS: Final = ("CREATE", "UPDATE", "DELETE", "CONNECT")


class ReviewError(ValueError):
    """A request body that is not a usable AdmissionReview v1; `uid` when one could be read."""

    def __init__(self, message: str, uid: str | None = None) -> None:
        super().__init__(message)
        self.uid = uid


@dataclass(frozen=True, slots=True)
class GroupVersionKind:
    group: str
    version: str
    kind: str

    def __str__(self) -> str:
        return (
            f"{self.group}/{self.version} {self.kind}"
            if self.group
            else f"{self.version} {self.kind}"
        )


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    kind: GroupVersionKind
    resource: str  # e.g. "pods"
    sub_resource: str  # e.g. "status"; "" for the object itself
    operation: str  # one of OPERATIONS
    namespace: str  # "" for cluster-scoped objects
    name: str  # may be "" on CREATE (generateName)
    object: Any  # the object as JSON; None on DELETE
    dry_run: bool
    old_object: Any = None  # the object before an UPDATE (or a DELETE) as JSON; else None


@dataclass(frozen=True, slots=True)
class AdmissionResponse:
    allowed: bool
    patch: Sequence[dict[str, Any]] = ()  # RFC 6902 operations; none: no mutation
    warnings: tuple[str, ...] = ()
    code: int | None = None  # with `message`: the status a denial carries
    message: str = ""

    @classmethod
    def deny(cls, message: str, code: int = 403) -> AdmissionResponse:
        return cls(allowed=False, code=code, message=message)


def _text(value: object, field: str, uid: str | None, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ReviewError(f"request.{field}: must be a string, got {type(value).__name__}", uid)
    return value


def read_review(body: bytes) -> AdmissionRequest:
    """The request inside an AdmissionReview v1 body. Raises ReviewError."""
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReviewError(f"the body is not JSON: {exc}") from None
    if not isinstance(review, dict):
        raise ReviewError(
            f"the body must be an AdmissionReview object, got {type(review).__name__}"
        )
    if review.get("apiVersion") != API_VERSION or review.get("kind") != KIND:
        got = f"{review.get('apiVersion')!r} {review.get('kind')!r}"
        raise ReviewError(
            f"expected apiVersion {API_VERSION} kind {KIND}, got {got} "
            "(register the webhook with admissionReviewVersions: [v1])"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise ReviewError("an AdmissionReview sent to a webhook must have a request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid: must be a non-empty string")
    kind, resource = request.get("kind"), request.get("resource")
    if not isinstance(kind, dict) or not isinstance(resource, dict):
        raise ReviewError("request.kind and request.resource: must be objects", uid)
    operation = _text(request.get("operation"), "operation", uid)
    if operation not in OPERATIONS:
        raise ReviewError(f"request.operation: must be one of {', '.join(OPERATIONS)}", uid)
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise ReviewError("request.dryRun: must be true or false", uid)
    return AdmissionRequest(
        uid=uid,
        kind=GroupVersionKind(
            group=_text(kind.get("group"), "kind.group", uid),
            version=_text(kind.get("version"), "kind.version", uid),
            kind=_text(kind.get("kind"), "kind.kind", uid),
        ),
        resource=_text(resource.get("resource"), "resource.resource", uid),
        sub_resource=_text(request.get("subResource"), "subResource", uid, required=False),
        operation=operation,
        namespace=_text(request.get("namespace"), "namespace", uid, required=False),
        name=_text(request.get("name"), "name", uid, required=False),
        object=request.get("object"),
        dry_run=dry_run,
        old_object=request.get("oldObject"),
    )


def render_review(uid: str, response: AdmissionResponse) -> bytes:
    """The AdmissionReview v1 answer to the request `uid`."""
    answer: dict[str, Any] = {"uid": uid, "allowed": response.allowed}
    if response.patch:
        patch = json.dumps(list(response.patch), separators=(",", ":")).encode()
        answer["patchType"] = "JSONPatch"
        answer["patch"] = base64.b64encode(patch).decode("ascii")
    if response.warnings:
        answer["warnings"] = list(response.warnings)
    if response.code is not None or response.message:
        answer["status"] = {"code": response.code or 403, "message": response.message}
    review = {"apiVersion": API_VERSION, "kind": KIND, "response": answer}
    return json.dumps(review, separators=(",", ":")).encode()

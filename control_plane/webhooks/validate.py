"""The `/validate` admission webhook: `outrigger.dev/` annotations on Services and Namespaces,
checked when they are written.

The API server sends Services and Namespaces on CREATE and UPDATE (the chart's
ValidatingWebhookConfiguration, only objects with an `outrigger.dev/` annotation). Their
annotations go through `mesh.annotations.check`, the validator behind the control plane's
`InvalidPolicy` Events, the mesh file and `outrigger analyze`, so `kubectl apply` shows the same
words::

    Error from server (BadRequest): error when creating "svc.yaml": admission webhook
    "validate.outrigger.dev" denied the request: outrigger.dev/timeout: must be a duration like
    "250ms", "1.5s", "2s" or "1m", got "soon"

Rules, in order:

1. Anything but a Service or Namespace (v1, the object itself, not a sub-resource) is admitted
   untouched with a warning: the webhook's rules send it objects it does not check.
2. DELETE and CONNECT are admitted: nothing is written.
3. An object that is not a Kubernetes object (no metadata mapping) is denied, code 400, naming
   the field; so is an annotation value that is not a string.
4. Every problem `check` finds denies the object (code 400), all of them in one message, in
   `check`'s order, one per line.
5. Except on UPDATE, a problem the object already had before it (the same message for the old
   object): it was written before the webhook was installed, or while it was down (failurePolicy
   Ignore), and blocking every later update (a label, a controller's write) for it would not fix
   it. It is admitted with a warning that names it; the control plane keeps falling back for that
   key and reporting it (an Event, `outrigger status`).

Only the object's own annotations are checked: a value that is valid alone but conflicts with
another level (a Service's `retry-backoff-max` shorter than its Namespace's
`retry-backoff-base`) is the control plane's to report, with the value it used instead.
"""

from __future__ import annotations

from typing import Any, Final

from control_plane.webhooks.review import AdmissionRequest, AdmissionResponse
from mesh.annotations import Problem, check, read_annotations
from mesh.model import show_value

CHECKED: Final = frozenset({"Service", "Namespace"})


def _problems(obj: object) -> list[Problem]:
    annotations, shape = read_annotations(_metadata(obj))
    return shape + check(annotations)


def _metadata(obj: object) -> Any:
    return obj.get("metadata") if isinstance(obj, dict) else None


def admit(request: AdmissionRequest) -> AdmissionResponse:
    """The `/validate` answer (see the module docstring for the rules)."""
    kind = request.kind
    if kind.group != "" or kind.kind not in CHECKED or request.sub_resource:
        target = request.resource + (f"/{request.sub_resource}" if request.sub_resource else "")
        return AdmissionResponse(
            allowed=True,
            warnings=(
                f"outrigger /validate checks only Services and Namespaces; {kind} ({target}) "
                "passed unchecked",
            ),
        )
    if request.operation not in ("CREATE", "UPDATE"):
        return AdmissionResponse(allowed=True)
    obj = request.object
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        found = obj.get("metadata") if isinstance(obj, dict) else obj
        return AdmissionResponse.deny(
            f"request.object.metadata: a {kind.kind} must have metadata (a mapping), "
            f"got {show_value(found)}",
            code=400,
        )
    problems = _problems(obj)
    if not problems:
        return AdmissionResponse(allowed=True)
    before: set[str] = set()
    if request.operation == "UPDATE":
        before = {p.message for p in _problems(request.old_object)}
    new = [p.message for p in problems if p.message not in before]
    old = tuple(
        f"{p.message} (already on this {kind.kind} before the update; the control plane falls "
        "back for this key until it is fixed)"
        for p in problems
        if p.message in before
    )
    if new:
        return AdmissionResponse(allowed=False, code=400, message="\n".join(new), warnings=old)
    return AdmissionResponse(allowed=True, warnings=old)

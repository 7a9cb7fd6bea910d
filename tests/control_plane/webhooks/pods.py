"""Pods and workloads as users write them, and the checks every injected object must pass."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import kubernetes_validate

from mesh.injection import POD_TEMPLATES

Json = dict[str, Any]

# Native sidecars (init containers with restartPolicy Always) are in the schema from 1.29.
KUBERNETES_VERSION = "1.29.0"


def pod(
    *,
    name: str = "web-7d4b9c",
    namespace: str | None = "shop",
    labels: Json | None = None,
    annotations: Json | None = None,
    **spec: Any,
) -> Json:
    metadata: Json = {"name": name, "labels": {"app": "web"} if labels is None else labels}
    if namespace is not None:
        metadata["namespace"] = namespace
    if annotations is not None:
        metadata["annotations"] = annotations
    body: Json = {
        "serviceAccountName": "web-sa",
        "containers": [
            {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]},
        ],
    }
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": body}


def large_pod(containers: int = 20, env: int = 60) -> Json:
    """A pod at the large end of real ones: many containers, each with long env and mounts."""
    big = pod(annotations={f"example.com/note-{i}": "x" * 200 for i in range(40)})
    big["spec"]["initContainers"] = [
        {"name": f"setup-{i}", "image": "busybox:1.36", "command": ["sh", "-c", "true"]}
        for i in range(5)
    ]
    big["spec"]["volumes"] = [{"name": f"data-{i}", "emptyDir": {}} for i in range(20)]
    big["spec"]["containers"] = [
        {
            "name": f"app-{c}",
            "image": f"registry.example/app-{c}:1.0",
            "env": [{"name": f"SETTING_{i}", "value": "v" * 40} for i in range(env)],
            "volumeMounts": [{"name": f"data-{i}", "mountPath": f"/data/{i}"} for i in range(20)],
            "ports": [{"containerPort": 8000 + c}],
        }
        for c in range(containers)
    ]
    return big


def apply(document: Json, patch: list[Json]) -> Json:
    """The document with an RFC 6902 patch applied by an independent implementation."""
    return jsonpatch.apply_patch(copy.deepcopy(document), patch)


def template_of(document: Json) -> Json:
    """The pod template of a workload (the Pod itself for a Pod)."""
    found: Any = document
    for key in POD_TEMPLATES[document["kind"]]:
        found = found[key]
    assert isinstance(found, dict)
    return found


def assert_valid(document: Json) -> None:
    """The object is valid against the Kubernetes schemas (strict: no unknown fields)."""
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def containers_by_name(spec: Json, field: str = "initContainers") -> dict[str, Json]:
    return {c["name"]: c for c in spec.get(field, [])}

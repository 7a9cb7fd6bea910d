"""k8s/examples: valid Kubernetes objects (kubernetes-validate, strict) with valid annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh.annotations import CALLS, check, parse_calls

EXAMPLES = Path(__file__).resolve().parents[2] / "k8s" / "examples"
K8S_VERSION = "1.37.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((f"{path.name}: {doc['kind']} {doc['metadata']['name']}", doc))
    return found


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_each_object_is_valid_for_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_each_objects_outrigger_annotations_are_valid(name: str, doc: dict[str, Any]) -> None:
    assert check(doc["metadata"].get("annotations") or {}) == []


def test_the_shop_calls_frontend_orders_payments() -> None:
    services = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Service"}
    assert set(services) == {"frontend", "orders", "payments"}
    calls = {
        name: parse_calls(doc["metadata"]["annotations"][CALLS])[0]
        for name, doc in services.items()
        if CALLS in doc["metadata"].get("annotations", {})
    }
    assert calls == {"frontend": ("orders",), "orders": ("payments",)}

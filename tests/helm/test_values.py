"""values.yaml is documented key by key, and the mesh file the chart writes is one the mesh
model accepts (the keys the Kubernetes wave adds are checked as soon as the model knows them)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from mesh.model import MeshError, parse_mesh
from tests.helm.chart import CHART, SCENARIOS, find, objects

# Top-level mesh-file keys the chart writes that the mesh model gains with other issues.
ARRIVING = {"defaults": 15}
KEY = re.compile(r"^(?P<indent>\s*)(?:- )?(?P<key>[A-Za-z][A-Za-z0-9]*):")


def test_every_key_in_values_yaml_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    parents: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        parents = [(i, k) for i, k in parents if i < indent]
        inside_resources = any(k == "resources" for _, k in parents)  # Kubernetes' own keys
        parents.append((indent, match["key"]))
        previous = lines[number - 1].strip() if number else ""
        commented = previous.startswith("#") or previous.startswith("- #") or "#" in line
        if not commented and not inside_resources:
            undocumented.append(f"line {number + 1}: {match['key']}")
    assert not undocumented, undocumented


def mesh_file(values: dict[str, Any]) -> dict[str, Any]:
    config = next(
        o
        for o in objects(values)
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-mesh")
    )
    doc: dict[str, Any] = yaml.safe_load(config["data"]["mesh.yaml"])
    return doc


def known_to_the_model(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The document without the arriving keys the model still refuses as unknown."""
    doc = dict(doc)
    refused = []
    for key in ARRIVING:
        try:
            parse_mesh({key: doc[key]} if key in doc else {}, "probe")
        except MeshError as exc:
            if f"{key}: unknown key" in str(exc):
                doc.pop(key, None)
                refused.append(key)
    return doc, refused


@pytest.mark.parametrize("scenario", ["default", "jaeger", "custom"])
def test_the_chart_mesh_file_is_accepted_by_the_mesh_model(scenario: str) -> None:
    doc, _ = known_to_the_model(mesh_file(SCENARIOS[scenario]))
    mesh = parse_mesh(doc, f"chart render ({scenario})")
    assert mesh.tracing.sampling == SCENARIOS[scenario].get("tracing", {}).get("sampling", 0.01)


def test_the_arriving_sections_are_accepted_once_the_model_knows_them() -> None:
    doc = mesh_file(SCENARIOS["custom"])
    assert set(ARRIVING) <= set(doc)
    _, refused = known_to_the_model(doc)
    if refused:
        pytest.skip(
            "the mesh model does not know "
            + ", ".join(f"`{k}:` yet (issue {ARRIVING[k]})" for k in refused)
        )
    parse_mesh(doc, "chart render (custom)")


def test_the_control_plane_reads_the_file_the_configmap_holds() -> None:
    objs = objects()
    assert "mesh.yaml" in find(objs, "ConfigMap", "outrigger-mesh")["data"]

"""The demo's mesh file: the shipped template, filled with the bound endpoints, rewritten by the
story. Writes go to a temporary file renamed over the copy, so the control plane never reads half
a file."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).resolve().parent / "demo-mesh.yaml"  # package data


class MeshFile:
    def __init__(self, template: Path, path: Path) -> None:
        loaded = yaml.safe_load(template.read_text())
        if not isinstance(loaded, dict) or not isinstance(loaded.get("services"), list):
            raise ValueError(f"{template}: not a mesh file with a services list")
        self.doc: dict[str, Any] = loaded
        self.path = path
        self.writes = 0

    def service(self, name: str) -> dict[str, Any]:
        for svc in self.doc["services"]:
            if isinstance(svc, dict) and svc.get("name") == name:
                return svc
        raise KeyError(name)

    def set_endpoints(self, name: str, endpoints: list[str]) -> None:
        self.service(name)["endpoints"] = list(endpoints)

    def policy(self, name: str) -> dict[str, Any]:
        svc = self.service(name)
        policy = svc.get("policy")
        if not isinstance(policy, dict):
            policy = svc["policy"] = {}
        return policy

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.doc)

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(
            f"# written by outrigger demo (edit {self.writes})\n"
            + yaml.safe_dump(self.doc, sort_keys=False)
        )
        os.replace(tmp, self.path)
        self.writes += 1
